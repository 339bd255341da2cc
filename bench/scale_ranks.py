"""One rank of the scale benchmark's multi-process start (run under torchrun by :mod:`bench.scale`).

After the process group is up and every rank has passed a barrier, each rank opens the data sets
the way the Worker does (:func:`trainer.data.sources.prepared_splits`); rank 0 prints, as one JSON line,
the seconds from the barrier to the moment the last rank had its index, and how many splits
each rank walked itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from trainer import config
from trainer.data import image_index, sources
from trainer.parallel import distributed


class _ScanCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.scans = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.scans += record.getMessage().startswith("indexed ")


def main(overrides: list[str]) -> None:
    cfg = config.load([], overrides)
    counter = _ScanCounter()
    logger = logging.getLogger(image_index.__name__)
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    env = distributed.setup("cpu", "gloo", cfg.dist.timeout_s)
    distributed.barrier(env)
    started = time.time()
    splits = sources.prepared_splits(cfg.data, env)
    ready = time.time()
    results = distributed.all_gather_objects(env, (started, ready, counter.scans, len(splits.train)))
    if env.is_main:
        print(json.dumps({"ready_s": max(r[1] for r in results) - min(r[0] for r in results),
                          "scans": [r[2] for r in results], "train": [r[3] for r in results]}), flush=True)
    distributed.teardown(env)


if __name__ == "__main__":
    main(sys.argv[1:])
