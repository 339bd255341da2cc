"""A one-rank process group made the trainer's way, with ``dist.flight_recorder`` applied, for the
flight recorder tests: ``python tests/flight_recorder_probe.py BACKEND MODE ENTRIES RUN_DIR``. It runs
10 all-reduces, dumps its buffer as a hang would, and prints what torch kept and the variables in
force, as JSON."""

import json
import os
import pickle
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.parallel import distributed, flight_recorder  # noqa: E402

backend, mode, entries, run_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
kept: list[str] = []
env = distributed.setup("cuda" if backend == "nccl" else "cpu", backend, 60.0,
                        before_group=lambda chosen: kept.extend(
                            flight_recorder.configure(mode, entries, chosen == "nccl", run_dir)))
for _ in range(10):
    dist.all_reduce(torch.ones(4, device=env.device))
if env.device.type == "cuda":
    torch.cuda.synchronize()
flight_recorder.prepare(0)
path = flight_recorder.dump(0, backend == "nccl")
records = pickle.loads(path.read_bytes())["entries"] if path else []
names = flight_recorder.BUFFER_SIZE + flight_recorder.DUMP_FILE + flight_recorder.DUMP_ON_TIMEOUT
print(json.dumps({"kept": kept, "dump": str(path) if path else None, "entries": len(records),
                  "ops": sorted({r["profiling_name"] for r in records}),
                  "last_record_id": max((r["record_id"] for r in records), default=-1),
                  "env": {name: os.environ.get(name) for name in names},
                  "folder_exists": (run_dir / flight_recorder.FOLDER).is_dir()}))
distributed.teardown(env)
