"""bench/train_speed.py on the CPU with tiny models: the script runs, counts what it says it counts, and its
transformers peer computes the same loss as glmtune from the same weights (so the rows compare like with like)."""

from __future__ import annotations

import importlib.util
import inspect
import json

import benchlib  # noqa: E402
import pytest
import torch
import train_speed  # noqa: E402

from glmtune.models import build_model
from glmtune.models.config import preset
from glmtune.templates import IGNORE_INDEX
from glmtune.train.loop import LMLoss

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def test_adgen_examples_lengths_labels_and_seed():
    examples = benchlib.adgen_examples(200, vocab=512, seed=3)
    assert examples == benchlib.adgen_examples(200, vocab=512, seed=3)
    assert examples != benchlib.adgen_examples(200, vocab=512, seed=4)
    for e in examples:
        prompt = sum(1 for x in e.labels if x == IGNORE_INDEX)
        assert 20 <= prompt <= 60 and 50 <= len(e.input_ids) - prompt <= 130
        assert e.labels[:prompt] == [IGNORE_INDEX] * prompt and e.labels[prompt:] == e.input_ids[prompt:]
        assert all(10 <= x < 502 for x in e.input_ids)
    prompts = {sum(1 for x in e.labels if x == IGNORE_INDEX) for e in examples}
    assert min(prompts) < 30 and max(prompts) > 50  # the whole range is drawn, not one length


@pytest.mark.parametrize("fixed_shapes", [False, True])
@pytest.mark.parametrize("kind", ["adgen-padded", "adgen-packed", "packed"])
def test_both_sides_get_the_same_samples_and_useful_tokens_are_the_real_ones(kind, fixed_shapes):
    pool = benchlib.adgen_examples(40, vocab=512, seed=0)
    data = train_speed.make_batches(kind, pool, samples=4, rows=3, pack_length=400, n=5, seed=1,
                                    fixed_shapes=fixed_shapes)  # fmt: skip
    assert len(data.glmtune) == len(data.hf) == len(data.tokens) == len(data.samples) == 5
    for ours, theirs, n, samples in zip(data.glmtune, data.hf, data.tokens, data.samples, strict=True):
        for batch in (ours, theirs):
            real = batch["attention_mask"].bool()
            assert n == int(real.sum()) and 0 < n < real.numel()  # padding is not counted
            starts = int(((batch["position_ids"] == 0) & real).sum())  # every sample starts at position 0
            assert starts == samples
        # the same tokens go to both sides, whatever side each pads on
        assert sorted(ours["input_ids"][ours["attention_mask"].bool()].tolist()) == sorted(
            theirs["input_ids"][theirs["attention_mask"].bool()].tolist())  # fmt: skip
        if kind == "adgen-padded":
            assert samples == 4
        if kind == "packed":
            assert theirs["input_ids"].shape == (3, 400)  # fixed width for the compiled peer


def test_mfu_counts_parameters_without_the_input_embedding():
    cfg = preset("tiny-chatglm3")
    model = build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    n = benchlib.non_embedding_params(model)
    assert n == total - cfg.padded_vocab_size * cfg.hidden_size
    assert benchlib.mfu(4 * n, 1000.0, 1.0) == pytest.approx(4 * n * 1000.0 / 1e12)
    assert benchlib.mfu(4 * n, 1000.0, None) is None


def _glmtune_loss(model, batch) -> torch.Tensor:
    net = LMLoss(model, 64)
    accepted = set(inspect.signature(net.forward).parameters)
    loss_sum = net(**{k: v for k, v in batch.items() if k in accepted})
    return loss_sum / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


@pytest.mark.skipif(not HAS_HF, reason="transformers and peft are dev extras")
@pytest.mark.parametrize("kind", ["adgen-padded", "packed"])
def test_transformers_peer_gives_glmtunes_loss_from_the_same_weights(kind):
    import peer_hf

    torch.manual_seed(0)
    cfg = preset("tiny-chatglm3")
    model = build_model(cfg, device="cpu", dtype=torch.float32, generation="chatglm3")
    benchlib.random_fill(model, torch.device("cpu"), torch.float32, seed=5)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a misplaced one shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf = peer_hf.hf_model(cfg, torch.device("cpu"), torch.float32, use_cache=False)
    missing, unexpected = hf.load_state_dict(peer_hf.hf_state_dict(model), strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing)
    pool = benchlib.adgen_examples(12, vocab=cfg.padded_vocab_size, seed=2)
    data = train_speed.make_batches(kind, pool, samples=3, rows=2, pack_length=256, n=1, seed=0)
    batch = data.hf[0]  # glmtune gets the same samples as its own trainer collates them
    model.eval(), hf.eval()
    with torch.no_grad():
        ours = _glmtune_loss(model, data.glmtune[0])
        theirs = hf(**peer_hf.hf_batch(batch, packed=kind != "adgen-padded")).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    if kind == "packed":  # the peer really keeps samples apart: one causal mask over the whole row differs
        with torch.no_grad():
            crossing = hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert abs(float(crossing) - float(theirs)) > 1e-4


def test_train_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "train_speed.json"
    # every kind of ADGEN run once (the variants that train the same thing on the CPU, uncompiled, left out)
    runs = ["adgen-lora/hf-*", "adgen-lora/glmtune-padded", "adgen-lora/glmtune-packed", "adgen-lora/*-recompute",
            "adgen-lora/*-mlp-recomputed", "adgen-lora/*-mlp4", "adgen-lora/*-kv-recomputed",
            "adgen-lora/*-lora-input-saved", "adgen-ptuning/glmtune-padded", "full-1.5b/glmtune-default"]  # fmt: skip
    rows = train_speed.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--profile-steps", "0",
                             "--pool", "24", "--pack-length", "256", "--json", str(out), "--runs", *runs]
                            + ([] if HAS_HF else ["--no-hf"]))  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert [r["id"] for r in rows] == [r.id for r in train_speed.RUNS if any(
        __import__("fnmatch").fnmatch(r.id, g) for g in runs) and (HAS_HF or r.impl != train_speed.HF)]  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        assert r["useful_tokens_per_step"] == pytest.approx(r["useful_tokens_per_s"] * r["step_ms"] / 1e3)
        assert r["mfu"] is None and r["gpu_busy"] is None  # no peak and no kernels on the CPU
        assert 5 < r["first_loss"] < 10  # ~ln(512) on random weights: a real loss went through
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == len(rows) + 2 and "useful tok/s" in table


def test_kernel_summary_splits_kinds_and_ranks_kernels():
    events = [
        {"cat": "kernel", "name": "nvjet_tst_192x128_64x4", "ts": 0, "dur": 3000},
        {"cat": "kernel", "name": "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "ts": 3000,
         "dur": 400},
        {"cat": "kernel", "name": "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "ts": 3400,
         "dur": 1000},
        {"cat": "kernel", "name": "triton_poi_fused_add_mul_0", "ts": 5000, "dur": 600},
        {"cat": "kernel", "name": "triton_poi_fused_add_mul_0", "ts": 5600, "dur": 600},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 10},
    ]  # fmt: skip
    out = train_speed.kernel_summary(events, steps=2)
    kinds = out["kernel_kinds_ms"]
    assert kinds["matmul"] == 1.5 and kinds["flash attention"] == 0.7 and kinds["flash attention bwd"] == 0.5
    assert kinds["compiled elementwise"] == 0.6 and kinds["idle"] == pytest.approx(0.3)
    top = out["top_kernels"]
    assert [t["name"][:8] for t in top] == ["nvjet_ts", "triton_p", "void pyt", "void pyt"]
    assert top[1]["per_step"] == 1 and top[1]["ms"] == 0.6


def test_train_ab_interleaves_two_runs_on_cpu(tmp_path):
    """bench/train_ab.py: both runs built, then timed in alternating rounds; the summary is the rounds' medians."""
    import train_ab

    out = tmp_path / "ab.json"
    result = train_ab.main(["--tiny", "--device", "cpu", "--a", "adgen-lora/glmtune-packed", "--b",
                            "adgen-lora/glmtune-packed-mlp-recomputed", "--rounds", "3", "--steps", "1", "--warmup",
                            "1", "--batches", "3", "--pool", "24", "--json", str(out)])  # fmt: skip
    rounds, summary = result["rounds"], result["summary"]
    assert [r["first"] for r in rounds] == ["a", "b", "a"]
    assert all(r["a_ms"] > 0 and r["b_ms"] > 0 and r["ratio"] == pytest.approx(r["a_ms"] / r["b_ms"]) for r in rounds)
    assert summary["a_step_ms"] == pytest.approx(sorted(r["a_ms"] for r in rounds)[1])
    assert summary["round_ratio_min"] <= summary["round_ratio_median"] <= summary["round_ratio_max"]
    assert json.loads(out.read_text())["summary"] == summary
    with pytest.raises(SystemExit, match="different data"):
        train_ab.main(["--tiny", "--device", "cpu", "--a", "adgen-lora/glmtune-packed", "--b",
                       "adgen-lora/glmtune-padded"])  # fmt: skip
