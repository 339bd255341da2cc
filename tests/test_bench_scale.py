"""``python -m bench.scale --quick`` runs end to end and fills every row (its timings are not judged here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import scale


@pytest.mark.slow
def test_quick_scale_bench_fills_every_row(tmp_path: Path) -> None:
    rows = scale.measure(tmp_path, scale.QUICK, processes=2)  # also checks that no rank walked on the cached start
    assert [row.metric for row in rows] == ["s", "s", "s", "MB", "MB", "MB"]
    assert all(math.isfinite(row.worker) and math.isfinite(row.baseline) for row in rows)
    assert f"({scale.QUICK.images} images)" in rows[0].case and "2 gloo ranks" in rows[2].case
    assert "0 vs 2 resident worker processes" in rows[5].note  # validation workers exit after a pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-scale-10x20", "bench-scale-2x2"]  # kept, index cache gone
