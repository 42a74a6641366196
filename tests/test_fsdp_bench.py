"""bench/fsdp_speed.py on the CPU with a tiny model, one process: the row says what it measured, and the combined
table computes the scaling from the one-GPU row."""

from __future__ import annotations

import json
from pathlib import Path

import fsdp_speed  # noqa: E402
import pytest


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


def test_kernel_breakdown_and_variants() -> None:
    """Kernel time by kind from trace events; NCCL time under no other kernel is "exposed", time under no kernel
    "idle"."""
    events = [
        {"cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16", "ts": 0.0, "dur": 10_000.0},
        {"cat": "kernel", "name": "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "ts": 5_000.0, "dur": 10_000.0},
        {"cat": "kernel", "name": "triton_poi_fused_mul_silu_0", "ts": 20_000.0, "dur": 2_000.0},
        {"cat": "kernel", "name": "multi_tensor_apply_kernel<FusedAdamMathFunctor>", "ts": 22_000.0, "dur": 4_000.0},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 26_000.0, "dur": 1_000.0},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 99_000.0},  # not a GPU event
    ]
    got = fsdp_speed.kernel_breakdown(events, steps=2)  # ms per step
    assert got == pytest.approx({"matmul": 5.0, "nccl": 5.0, "compiled elementwise": 1.0, "optimizer": 2.0,
                                 "memcpy/memset": 0.5, "span": 13.5, "idle": 2.5, "nccl exposed": 2.5})  # fmt: skip
    assert fsdp_speed.kind_of("triton_tem_fused_flex_attention_backward_3") == "flex attention"
    assert fsdp_speed.kind_of("void pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel<Sm90>") == "flash attention"
    assert fsdp_speed.parse_variant("keep=3,units=2") == {"keep_gathered": 3, "prefetch": 1, "blocks_per_unit": 2,
                                                           "ctas": 0}  # fmt: skip
    with pytest.raises(ValueError, match="unknown variant key 'kep'"):
        fsdp_speed.parse_variant("kep=1")
    assert fsdp_speed.sharding_text({"keep_gathered": 1, "prefetch": 2, "blocks_per_unit": 1, "ctas": 8}) == (
        "keep 1, prefetch 2, 1 block/unit, 8 CTAs"
    )


def test_idle_gaps() -> None:
    """The longest stretches without any kernel, with the kernels on either side; overlapping kernels (another
    stream) close a gap."""
    events = [
        {"cat": "kernel", "name": "a", "ts": 0.0, "dur": 1_000.0},
        {"cat": "kernel", "name": "b", "ts": 500.0, "dur": 3_000.0},  # overlaps a: no gap
        {"cat": "kernel", "name": "c", "ts": 5_500.0, "dur": 1_000.0},  # 2 ms after b
        {"cat": "gpu_memset", "name": "d", "ts": 6_700.0, "dur": 100.0},  # 0.2 ms: below min_ms
        {"cat": "kernel", "name": "e", "ts": 12_000.0, "dur": 1_000.0},  # 5.2 ms after d
    ]
    got = fsdp_speed.idle_gaps(events, top=5, min_ms=0.5)
    assert got == [
        {"at_ms": pytest.approx(6.8), "ms": pytest.approx(5.2), "before": "d", "after": "e"},
        {"at_ms": pytest.approx(3.5), "ms": pytest.approx(2.0), "before": "b", "after": "c"},
    ]
    assert fsdp_speed.idle_gaps(events, top=1)[0]["after"] == "e" and fsdp_speed.idle_gaps([]) == []
