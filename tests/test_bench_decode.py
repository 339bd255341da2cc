"""`python -m bench.decode --quick` runs and measures every decode path on the same samples, prepared
shards included.

No timing is asserted here (timings belong to the benchmark's report, not to tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_decode_bench_reports_every_path_against_the_tutorial_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "decode.json"
    result = subprocess.run([sys.executable, "-m", "bench.decode", "--quick", "--json", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text())
    rows = {row["case"]: row for row in report["rows"]}
    assert list(rows) == ["decode: PIL, uint8", "decode: torchvision.io decode_jpeg, uint8",
                          "decode: trainer, jpeg_draft=false (uint8)", "decode: trainer (PIL draft, uint8)",
                          "decode: prepared shards, --short-side 256 (trainer, uint8)"]
    for case, row in rows.items():
        assert row["worker"] > 0 and row["baseline"] > 0 and len(row["pair_ratios"]) == 2
        assert case in result.stdout
    assert rows["decode: trainer (PIL draft, uint8)"]["goal"] == 1.3
    assert rows["decode: prepared shards, --short-side 256 (trainer, uint8)"]["goal"] == 3.0
    assert all(row["metric"] == "img/s per core (1 worker, 1 thread)" for row in rows.values())
    batches = report["details"]["decode"]["batches"]
    assert batches.pop("tutorial") == ["torch.float32", [8, 3, 224, 224]]
    assert all(batch == ["torch.uint8", [8, 3, 224, 224]] for batch in batches.values()), batches
