"""bench/fsdp_speed.py on the CPU with a tiny model, one process: the row says what it measured, and the combined
table computes the scaling from the one-GPU row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import fsdp_speed  # noqa: E402


def test_fsdp_speed_runs_and_combines(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    args = ["--tiny", "--device", "cpu", "--no-compile", "--rows", "2", "--pack-length", "256", "--warmup", "1",
            "--steps", "2", "--profile-steps", "0", "--json", str(one)]  # fmt: skip
    (row,) = fsdp_speed.main(args)["rows"]
    assert "error" not in row, row
    assert row["gpus"] == 1 and row["mode"] == "single" and row["checkpointing"] is True
    assert row["useful_tokens_per_s_per_gpu"] > 0 and row["mfu"] is None and row["peak_gib_per_gpu"] is None
    assert 3.0 < row["first_loss"] < 10.0  # log(vocab) of a random tiny model, not nan
    # a pretend 2-GPU row at 1.8x the throughput of the first: the combined table's scaling is 1.8
    two = tmp_path / "two.json"
    data = json.loads(one.read_text())
    data["rows"][0].update(gpus=2, mode="fsdp", useful_tokens_per_s_total=1.8 * row["useful_tokens_per_s_total"])
    two.write_text(json.dumps(data))
    out = tmp_path / "all.json"
    rows = fsdp_speed.main(["--combine", str(one), str(two), "--json", str(out)])["rows"]
    assert [r["scaling"] for r in rows] == pytest.approx([1.0, 1.8])
    data["rows"][0]["checkpointing"] = "mlp"  # no 1-GPU row of these settings: no scaling
    two.write_text(json.dumps(data))
    rows = fsdp_speed.main(["--combine", str(one), str(two)])["rows"]
    assert "scaling" not in rows[1]
    assert "| 2 | fsdp |" in out.with_suffix(".md").read_text()
