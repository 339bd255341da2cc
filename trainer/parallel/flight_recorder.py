"""PyTorch's flight recorder: each process keeps its process groups' last collectives in a ring
buffer (name, sequence number, sizes, state, Python frames), which it dumps when a collective
times out, so that a hang can be traced to the collective the ranks disagree on.

:func:`configure` sets torch's variables before the process group exists (torch reads them when
the first group is made); a variable the user set is kept. :func:`dump` writes this rank's buffer
into the run directory when the hang verdict is made (NCCL's own watchdog also dumps there on a
timeout), and :func:`summary` turns the dumps into a phrase of the verdict.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any, MutableMapping

FOLDER = Path("logs") / "flight_recorder"
"""Where, in the run directory, the dumps go (``rank_<r>``, the file name torch's analyser expects)."""
PREFIX = "rank_"
BUFFER_SIZE = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
"""Entries kept per process: torch's current name, then the older one, which torch still reads
(with a deprecation warning) and a user may have set."""
DUMP_FILE = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
"""The dump's path, less the rank: the current name, then the older one."""
DUMP_ON_TIMEOUT = ("TORCH_NCCL_DUMP_ON_TIMEOUT",)
"""NCCL's watchdog dumps every rank's buffer when a collective times out."""
ANALYSER = "torchfrtrace"
ANALYSE_UP_TO = 64
"""torch's analyser reads every rank's dump: the verdict runs it up to this many ranks."""


def settings(mode: str, entries: int, nccl: bool, run_dir: Path) -> dict[tuple[str, ...], str]:
    """What ``dist.flight_recorder`` asks of torch: ``on`` (``auto`` on NCCL) records ``entries``
    collectives and dumps them on a timeout, ``off`` records none, ``auto`` elsewhere keeps torch's
    own buffer size; wherever it records, the dumps go into the run directory."""
    if mode == "off":
        return {BUFFER_SIZE: "0", DUMP_ON_TIMEOUT: "0"}
    where = {DUMP_FILE: str(run_dir / FOLDER / PREFIX)}
    if mode == "auto" and not nccl:
        return where
    return {BUFFER_SIZE: str(entries), DUMP_ON_TIMEOUT: "1", **where}


def configure(mode: str, entries: int, nccl: bool, run_dir: Path,
              environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Export :func:`settings` under torch's current names, except those the user set under any
    of their names; returns the user's, which win."""
    kept = []
    for names, value in settings(mode, entries, nccl, run_dir).items():
        given = [name for name in names if name in environ]
        if given:
            kept += given
        else:
            environ[names[0]] = value
    return kept


def dump_prefix(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The dump path in force, less the rank (None where :func:`configure` did not set one, nor the user)."""
    return next((environ[name] for name in DUMP_FILE if environ.get(name)), None)


def dump(rank: int, nccl: bool) -> Path | None:
    """Write this process's buffer to ``<prefix><rank>`` unless NCCL's watchdog already did; the
    path, or None when there is nothing to write."""
    prefix = dump_prefix()
    if prefix is None:
        return None
    path = Path(f"{prefix}{rank}")
    if path.exists():
        return path
    try:
        from torch._C._distributed_c10d import _dump_fr_trace, _dump_nccl_trace

        content = pickle.loads(_dump_nccl_trace() if nccl else _dump_fr_trace())
    except (ImportError, RuntimeError):
        return None
    if not content.get("entries"):
        return None
    if "" in content.get("pg_config", {}):
        content["pg_config"] = _group_table(content["entries"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(content))
    except OSError:
        return None
    return path


def _group_table(entries: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each process group of ``entries`` by name, with its description and ranks: torch 2.14's gloo
    dumps list a single nameless group, which its analyser cannot match collectives against."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    ranks = {name: dist.get_process_group_ranks(group) for group, name in _world.pg_names.items()}
    names = {entry["process_group"][0]: entry["process_group"][1] for entry in entries}
    return {name: {"name": name, "desc": desc, "ranks": str(ranks.get(name, []))} for name, desc in names.items()}


def prepare(rank: int, environ: MutableMapping[str, str] = os.environ) -> None:
    """At the start of a run: remove this rank's dump from an earlier start (it would be taken for
    this one's) and create the dumps' folder, where NCCL's watchdog writes on a timeout (it creates none)."""
    prefix = dump_prefix(environ)
    if prefix is None:
        return
    Path(f"{prefix}{rank}").unlink(missing_ok=True)
    if environ.get(DUMP_ON_TIMEOUT[0]) == "1":
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)


def summary(prefix: str, wanted: list[int], world_size: int) -> str | None:
    """One phrase from the dumps at ``prefix<rank>``: torch's analyser's first finding (up to
    :data:`ANALYSE_UP_TO` ranks), else, from the ``wanted`` ranks' dumps (those a verdict names and
    one it does not), for each process group where their last collectives differ, the last one each
    entered (the furthest behind named when every one dumped); and those without a dump; None
    without dumps."""
    dumps = _read(prefix, wanted)
    if not dumps:
        return None
    last: dict[str, dict[int, tuple[int, str]]] = defaultdict(dict)  # group -> rank -> (sequence number, name)
    nccl = False
    for rank, content in dumps.items():
        for entry in content.get("entries", []):
            if entry.get("is_p2p"):
                continue
            name, desc = entry["process_group"]
            seq, op = entry["collective_seq_id"], entry["profiling_name"]
            nccl = nccl or op.startswith("nccl:")
            if seq >= last[desc or name].get(rank, (-1, ""))[0]:
                last[desc or name][rank] = (seq, op)
    parts = []
    for group, reached in sorted(last.items()):
        if len(set(reached.values())) > 1:
            each = ", ".join(f"rank {rank} {op} #{seq}" for rank, (seq, op) in sorted(reached.items()))
            lowest = min(seq for seq, _ in reached.values())
            behind = [rank for rank, (seq, _) in reached.items() if seq == lowest]
            complete = len(reached) == len(set(wanted))
            parts.append(f"the last collective each rank entered in {group}: {each}"
                         + (f"; furthest behind: {_ranks(behind)}" if complete else ""))
    found = analyse(prefix, world_size) or "; ".join(parts)
    if not found and len(dumps) > 1:
        found = "every dump ends at the same collective"
    if missing := sorted(set(wanted) - set(dumps)):
        found = "; ".join(filter(None, [found, f"no dump from {_ranks(missing)}"]))
    folder, name = Path(prefix).parent, Path(prefix).name
    read = f"{ANALYSER} {folder} --prefix {name} --allow-incomplete-ranks" if nccl else str(folder)
    return f"flight recorder: {found} (dumps: {read})"


def analyse(prefix: str, world_size: int) -> str | None:
    """The first collective that torch's analyser finds some ranks never entered, or entered
    differently (None without the analyser, beyond :data:`ANALYSE_UP_TO` ranks, or without a finding)."""
    if world_size > ANALYSE_UP_TO:
        return None
    logging.getLogger("Flight Recorder").disabled = True  # its tables and warnings are not the verdict
    try:
        from torch.distributed.flight_recorder.components.builder import build_db
        from torch.distributed.flight_recorder.components.config_manager import JobConfig
        from torch.distributed.flight_recorder.components.loader import read_dump
    except ImportError:
        return None
    folder, name = Path(prefix).parent, Path(prefix).name
    paths = [folder / f"{name}{rank}" for rank in range(world_size)]
    try:
        details = {path.name: read_dump(name, str(path)) for path in paths if path.exists()}
        if not details:
            return None
        args = JobConfig().parse_args([str(folder), "--prefix", name, "--allow-incomplete-ranks"])
        database = build_db(details, args, str(next(iter(details.values()))["version"]))
    except Exception:  # noqa: BLE001 - another library's analysis of partial dumps must not cost the verdict
        return None
    for collective in database.collectives:
        if collective.missing_ranks or not collective.pass_check:
            what = f"{collective.collective_name} #{collective.collective_seq_id} of {collective.pg_desc}"
            if collective.missing_ranks:
                return f"torch's analyser: {_ranks(sorted(collective.missing_ranks))} never entered {what}"
            return f"torch's analyser: the ranks entered {what} differently ({collective.type_of_mismatch})"
    return None


def _read(prefix: str, ranks: list[int]) -> dict[int, dict[str, Any]]:
    found = {}
    for rank in ranks:
        try:
            found[rank] = pickle.loads(Path(f"{prefix}{rank}").read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, ValueError):
            continue
    return found


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
