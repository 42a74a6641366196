"""bench/attention_speed.py on the CPU with tiny sizes: the dense form and the varlen form's dense fallback run and
agree with the fp32 reference; the GPU variants (compiled flex, flash varlen) are left out off CUDA."""

from __future__ import annotations

import json

import attention_speed  # noqa: E402
import torch


def test_attention_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "attention.json"
    result = attention_speed.main(["--device", "cpu", "--batch", "2", "--seq", "64", "--heads", "4", "--kv-heads",
                                   "2", "--head-dim", "8", "--iters", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert "sdpa dense" in rows and not any("compiled" in name for name in rows)
    varlen = [r for name, r in rows.items() if name.startswith("varlen")]
    assert varlen and all(r["max_runs"] >= result["runs"] for r in varlen)
    for r in rows.values():
        assert "error" not in r and r["finite"] and r["max_err"] < 1e-5 and r["fwd_bwd_ms"] > 0
        assert r["max_grad_err"] < 1e-4  # q, k, v gradients too


def test_packed_segments_fill_rows_in_order():
    seg = attention_speed.packed_segments(4, 1024, seed=0)
    assert seg.shape == (4, 1024)
    for row in seg:
        real = row[row >= 0]
        assert (row[: len(real)] >= 0).all()  # padding only at the end
        assert real.tolist() == sorted(real.tolist()) and real[0] == 0
        lengths = torch.bincount(real).tolist()
        assert all(70 <= n <= 190 for n in lengths)  # ADGEN-like: prompt 20-60 + response 50-130
