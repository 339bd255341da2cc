"""``dist.flight_recorder``: the variables it sets (the user's win), that they reach a real gloo
process group made the trainer's way (torch keeps exactly the configured number of collectives),
and the verdict's phrase from the dumps. The dumps of real hangs are in tests/test_hangs.py; the
NCCL group in tests/test_gpu.py."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TESTS, child_env

from trainer.parallel import flight_recorder

PROBE = TESTS / "flight_recorder_probe.py"


def test_on_sets_the_buffer_the_dump_on_timeout_and_a_dump_path_in_the_run_directory(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert flight_recorder.configure("auto", 500, True, tmp_path, environ) == []
    assert environ == {"TORCH_FR_BUFFER_SIZE": "500", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                       "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "logs" / "flight_recorder" / "rank_")}
    gloo: dict[str, str] = {}
    flight_recorder.configure("auto", 500, False, tmp_path, gloo)
    assert list(gloo) == ["TORCH_FR_DUMP_TEMP_FILE"], "auto on gloo keeps torch's own buffer size"
    off: dict[str, str] = {}
    flight_recorder.configure("off", 500, True, tmp_path, off)
    assert off == {"TORCH_FR_BUFFER_SIZE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def test_a_variable_the_user_set_under_either_name_wins(tmp_path: Path) -> None:
    environ = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}
    kept = flight_recorder.configure("on", 500, True, tmp_path, environ)
    assert kept == ["TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]
    assert "TORCH_FR_BUFFER_SIZE" not in environ and "TORCH_FR_DUMP_TEMP_FILE" not in environ
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert flight_recorder.dump_prefix(environ) == "/scratch/fr_"


def test_a_start_removes_its_ranks_dump_of_an_earlier_start_and_makes_the_folder(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    flight_recorder.configure("on", 500, True, tmp_path, environ)
    folder = tmp_path / "logs" / "flight_recorder"
    flight_recorder.prepare(0, environ)
    assert folder.is_dir(), "NCCL's watchdog writes there and creates no folder"
    (folder / "rank_0").write_bytes(b"an earlier hang's")
    (folder / "rank_1").write_bytes(b"an earlier hang's")
    flight_recorder.prepare(0, environ)
    assert not (folder / "rank_0").exists() and (folder / "rank_1").exists(), "each rank removes its own"


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Two real processes, each with a one-rank gloo group: ``dist.flight_recorder=on`` with 5
    entries, and the same with the user's own TORCH_NCCL_TRACE_BUFFER_SIZE=3."""
    tmp = tmp_path_factory.mktemp("recorder")
    cases = {"on": {}, "user": {"TORCH_NCCL_TRACE_BUFFER_SIZE": "3"}}
    started = {name: subprocess.Popen([sys.executable, str(PROBE), "gloo", "on", "5", str(tmp / name)],
                                      env=child_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, extra in cases.items()}
    found = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        found[name] = json.loads(out.splitlines()[-1])
    return found


def test_the_configured_buffer_reaches_a_real_gloo_group_and_its_dump_lands_in_the_run_directory(
        probes: dict[str, dict]) -> None:
    on = probes["on"]
    assert on["entries"] == 5 and on["last_record_id"] == 9, "torch kept the last 5 of 10 all-reduces"
    assert on["ops"] == ["gloo:all_reduce"] and on["folder_exists"]
    assert on["dump"].endswith("/on/logs/flight_recorder/rank_0")
    assert on["env"]["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and on["env"]["TORCH_NCCL_TRACE_BUFFER_SIZE"] is None


def test_the_users_variable_is_what_torch_reads(probes: dict[str, dict]) -> None:
    user = probes["user"]
    assert user["kept"] == ["TORCH_NCCL_TRACE_BUFFER_SIZE"] and user["env"]["TORCH_FR_BUFFER_SIZE"] is None
    assert user["entries"] == 3


def dump_file(folder: Path, rank: int, *collectives: tuple[int, str]) -> None:
    entries = [{"process_group": ("0", "default_pg"), "collective_seq_id": seq, "profiling_name": op,
                "is_p2p": False, "record_id": seq} for seq, op in collectives]
    (folder / f"rank_{rank}").write_bytes(pickle.dumps({"version": "2.10", "entries": entries}))


def test_the_summary_names_each_ranks_last_collective_and_points_at_torchs_analyser_for_nccl(tmp_path: Path) -> None:
    """Dumps torch's analyser cannot read (no group table): the verdict's own reading of them."""
    dump_file(tmp_path, 0, (6, "nccl:broadcast"), (7, "nccl:all_reduce"))
    dump_file(tmp_path, 1, (6, "nccl:broadcast"), (7, "nccl:all_reduce"))
    dump_file(tmp_path, 2, (5, "nccl:all_reduce"))
    line = flight_recorder.summary(str(tmp_path / "rank_"), [0, 1, 2, 3], 4)
    assert line == ("flight recorder: the last collective each rank entered in default_pg: rank 0 nccl:all_reduce "
                    "#7, rank 1 nccl:all_reduce #7, rank 2 nccl:all_reduce #5; no dump from rank 3 (dumps: "
                    f"torchfrtrace {tmp_path} --prefix rank_ --allow-incomplete-ranks)")
    complete = flight_recorder.summary(str(tmp_path / "rank_"), [0, 2], 3)
    assert complete.startswith("flight recorder: the last collective each rank entered in default_pg: "
                               "rank 0 nccl:all_reduce #7, rank 2 nccl:all_reduce #5; furthest behind: rank 2 "
                               "(dumps: "), complete
    assert flight_recorder.summary(str(tmp_path / "nothing" / "rank_"), [0, 2], 3) is None
