"""A user's data set that goes wrong on one rank, for the hang tests: on rank ``HANG_RANK``, its
``HANG_AT_READ``-th read blocks forever (``HANG_HOW=block``) or stops the whole process with
SIGSTOP (``HANG_HOW=stop``), after writing the time to ``HANG_MARK``. With ``HANG_RECORD`` set, each
process appends every training index it reads to ``<HANG_RECORD>/rank<r>_pid<p>.txt``."""

import os
import signal
import threading
import time

import torch
from torch.utils.data import Dataset

READS = 0


class Blobs(Dataset):
    def __init__(self, size: int, image_size: int, faulty: bool) -> None:
        self.size, self.image_size, self.faulty = size, image_size, faulty

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        global READS
        READS += 1
        if self.faulty and os.environ.get("HANG_RECORD"):
            with open(f"{os.environ['HANG_RECORD']}/rank{os.environ['RANK']}_pid{os.getpid()}.txt", "a") as record:
                record.write(f"{index}\n")
        if self.faulty and READS == int(os.environ.get("HANG_AT_READ", "0")) \
                and os.environ.get("RANK") == os.environ.get("HANG_RANK"):
            with open(os.environ["HANG_MARK"], "w") as mark:
                mark.write(str(time.time()))
            if os.environ.get("HANG_HOW") == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            threading.Event().wait()  # blocks forever: the hang the verdict must point at
        image = torch.randn(3, self.image_size, self.image_size) * 0.5
        image[index % 3] += 1.0
        return image, index % 3


def build(cfg):  # type: ignore[no-untyped-def]
    return Blobs(192, cfg.image_size, True), Blobs(30, cfg.image_size, False), ["a", "b", "c"]
