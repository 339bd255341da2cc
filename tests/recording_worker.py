"""The real trainer, recording what the tests compare, into the folder named by RECORD_DIR.

Each process appends to its own ``<role>_rank<r>_pid<p>.jsonl``:
- ``served``: every (epoch, index, data set size) the data set served;
- ``steps`` (every rank): each optimizer step's progress window, learning rate, global step,
  and a dropout mask drawn from the rank's torch RNG (state restored, so training is unchanged).
Faults, on the first torchrun attempt only:
- STOP_AT_STEP=n: rank 0 sends SIGTERM to the torchrun agent (which forwards it to every
  worker) as optimizer step n begins;
- KILL_AFTER_EPOCH_LINE=e: rank 0 flushes TensorBoard after writing epoch e's metrics line,
  then SIGKILLs the whole job before that epoch's checkpoint;
- KILL_AFTER_STEP=n: rank 0 waits until the threaded trackers hold step n's running values
  (MLflow's buffer sent, as at an epoch's end), then SIGKILLs itself: a run killed past its
  last checkpoint, having logged steps that a resume trains again.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.__main__ import main  # noqa: E402
from trainer.data import loaders  # noqa: E402
from trainer.observe import sinks  # noqa: E402
from trainer.train import optim  # noqa: E402

RECORD = Path(os.environ["RECORD_DIR"])
RANK = int(os.environ.get("RANK", "0"))
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
STOP_AT = int(os.environ.get("STOP_AT_STEP", "0"))
KILL_AFTER = int(os.environ.get("KILL_AFTER_EPOCH_LINE", "0"))
KILL_AFTER_STEP = int(os.environ.get("KILL_AFTER_STEP", "0"))


def record(role: str, entry: dict) -> None:
    with open(RECORD / f"{role}_rank{RANK}_pid{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


original_getitem = loaders.SeededTransformDataset.__getitem__


def recording_getitem(self, key):  # type: ignore[no-untyped-def]
    key = loaders.SampleKey(*key)
    record("served", {"epoch": key.epoch, "index": key.index, "repeat": key.repeat, "size": len(self)})
    return original_getitem(self, key)


original_set_window = optim.Schedule.set_window
steps_begun = 0


def recording_set_window(self, start, end):  # type: ignore[no-untyped-def]
    global steps_begun
    original_set_window(self, start, end)
    steps_begun += 1
    state = torch.get_rng_state()
    mask = torch.nn.functional.dropout(torch.ones(32), 0.5).bool().tolist()
    torch.set_rng_state(state)
    record("steps", {"start": start, "end": end, "lr": self.lr(), "mask": mask})
    if FIRST_ATTEMPT and RANK == 0 and STOP_AT and steps_begun == STOP_AT:
        os.kill(os.getppid(), signal.SIGTERM)


original_epoch = sinks.MetricSinks.epoch


def epoch_then_kill(self, record_: dict, step: int) -> None:  # type: ignore[no-untyped-def]
    original_epoch(self, record_, step)
    if FIRST_ATTEMPT and RANK == 0 and record_["epoch"] == KILL_AFTER:
        for sink in self.sinks:  # the TensorBoard sink's writer, if open
            if getattr(sink, "writer", None) is not None:
                sink.writer.flush()
        os.killpg(os.getpgid(0), signal.SIGKILL)


original_scalars = sinks.MetricSinks.scalars


def scalars_then_kill(self, values: dict, step: int) -> None:  # type: ignore[no-untyped-def]
    original_scalars(self, values, step)
    if FIRST_ATTEMPT and RANK == 0 and KILL_AFTER_STEP and step == KILL_AFTER_STEP:
        threaded = [sink for sink in self.sinks if isinstance(sink, sinks.BackgroundSink)]
        for sink in threaded:  # a no-op call after the send: taken from the queue once the send is done
            sink.calls.put(("_send_buffered" if sink.name == "mlflow" else "run_id", ()))
            sink.calls.put(("run_id", ()))
        while not all(sink.calls.empty() for sink in threaded):
            time.sleep(0.01)
        wait_for_wandb_run_record(threaded)
        os.kill(os.getpid(), signal.SIGKILL)


def wait_for_wandb_run_record(threaded: list) -> None:  # type: ignore[type-arg]
    """wandb's service writes the run record of an offline run on its own time (seconds later on a
    busy machine); a kill before it would leave a folder that names no run. Wait for it (30 s at most)."""
    for sink in threaded:
        if sink.name != "wandb" or (run_id := sink.run_id()) is None:
            continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            files = list(Path(sink.inner.run_dir, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
            if files and run_id.encode() in files[0].read_bytes():
                return
            time.sleep(0.1)


loaders.SeededTransformDataset.__getitem__ = recording_getitem  # type: ignore[method-assign]
optim.Schedule.set_window = recording_set_window  # type: ignore[method-assign]
sinks.MetricSinks.epoch = epoch_then_kill  # type: ignore[method-assign]
sinks.MetricSinks.scalars = scalars_then_kill  # type: ignore[method-assign]
main()
