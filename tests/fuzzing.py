"""What the reader fuzz shares: damaged bytes as Hypothesis strategies, one guarded call per case
(a time limit, the one-line check, the folder compared before and after), and the tally that
``make fuzz`` prints (tests/conftest.py's terminal summary).

``FUZZ_SCALE`` multiplies every reader's ``max_examples`` (1 in CI; ``make fuzz`` sets more).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
TIME_LIMIT_S = float(os.environ.get("FUZZ_TIME_LIMIT_S", "30"))
"""The longest one reader call may take before it counts as a hang (generous: the machine is shared)."""

TALLY: Counter[tuple[str, str]] = Counter()
"""(reader, outcome) -> cases: outcome is ``loaded``, ``refused``, ``escaped`` or ``changed files``."""

T = TypeVar("T")


def fuzz_settings(examples: int) -> settings:
    """A fixed seed (derandomize), ``examples`` cases times :data:`SCALE`, no deadline (the time
    limit below catches hangs instead), no example database written into the checkout."""
    return settings(max_examples=max(1, round(examples * SCALE)), derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------- strategies

def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, bit in flips:
        out[position % len(out)] ^= 1 << bit
    return bytes(out)


def _overwrite(data: bytes, position: int, patch: bytes) -> bytes:
    position %= len(data)
    return data[:position] + patch + data[position + len(patch):]


def damaged(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` cut at any offset, with 1-3 flipped bits, with a span overwritten by random bytes,
    with a span removed or repeated; or random bytes of any length (the empty file included)."""
    size = len(data)
    position = st.integers(0, size - 1)
    return st.one_of(
        position.map(lambda cut: data[:cut]),
        st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=3).map(lambda f: _flip(data, f)),
        st.tuples(position, st.binary(min_size=1, max_size=64)).map(lambda p: _overwrite(data, *p)),
        st.tuples(position, st.integers(1, 256)).map(lambda p: data[:p[0]] + data[p[0] + p[1]:]),
        st.tuples(position, st.integers(1, 256)).map(lambda p: data[:p[0] + p[1]] + data[p[0]:]),
        st.binary(max_size=2048),
    )


def text_lines(alphabet: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    """Short texts of any characters (control characters, NUL, surrogates escaped away)."""
    return st.text(alphabet or st.characters(exclude_categories=["Cs"]), max_size=40)


# --------------------------------------------------------------------------------- one guarded call

class Hang(BaseException):
    """A reader call ran past :data:`TIME_LIMIT_S` (a BaseException: no reader's ``except Exception`` hides it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, mtime and SHA-256 (to see a reader modify or remove one)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_reader(reader: str, call: Callable[[], T], errors: type[BaseException] | tuple[type[BaseException], ...],
                 names: str | None, watch: Path, may_change: Callable[[str], bool] = lambda path: False
                 ) -> T | BaseException:
    """Run ``call`` once: it returns (the value comes back), or raises one of ``errors`` with a
    one-line message that contains ``names`` (the file, when given); the exception comes back.
    Anything else (another exception, a hang, a file under ``watch`` modified or removed that
    ``may_change`` does not allow) is counted and fails the case."""
    before = tree(watch)
    try:
        with time_limit(TIME_LIMIT_S):
            result: T | BaseException = call()
        outcome = "loaded"
    except errors as exc:
        message = str(exc)
        if "\n" in message or (names is not None and names not in message):
            TALLY[reader, "escaped"] += 1
            raise AssertionError(f"{reader}: not one line naming {names!r}: {message!r}") from exc
        result, outcome = exc, "refused"
    except BaseException:
        TALLY[reader, "escaped"] += 1
        raise
    after = tree(watch)
    changed = sorted(path for path in before if before[path] != after.get(path) and not may_change(path))
    TALLY[reader, outcome] += 1
    if changed:
        TALLY[reader, "changed files"] += 1
        raise AssertionError(f"{reader} modified or removed {changed}")
    return result


def summary() -> list[str]:
    """The tally as lines: per reader its cases and outcomes, then the totals."""
    readers = sorted({reader for reader, _ in TALLY})
    if not readers:
        return []
    outcomes = ("loaded", "refused", "escaped", "changed files")
    width = max(len(r) for r in readers) + 2
    lines = [f"{'reader':<{width}}{'cases':>8}" + "".join(f"{o:>15}" for o in outcomes)]
    for reader in [*readers, "all"]:
        counts = [sum(TALLY[r, o] for r in readers) if reader == "all" else TALLY[reader, o] for o in outcomes]
        lines.append(f"{reader:<{width}}{sum(counts[:3]):>8}" + "".join(f"{c:>15}" for c in counts))
    return lines
