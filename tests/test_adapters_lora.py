"""LoRA layer numerics against a float64 reference, injection by target names, merge/unmerge, trainable state."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from adapter_support import PRESET_IDS, PRESETS, random_ids, randomize, tiny_model
from glmtune.adapters import LoraOptions, build_method
from glmtune.adapters.lora import LoraLinear, find_targets, lora_layers, merge_lora


def _reference(x, w, b, a_mat, b_mat, scale):  # all float64
    out = x @ w.T + scale * (x @ a_mat.T) @ b_mat.T
    return out + b if b is not None else out


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_float64_reference(use_rslora: bool, bias: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias)
    layer = LoraLinear(base, rank=4, alpha=8, use_rslora=use_rslora)
    randomize([("b", layer.lora_B.weight)], seed=3)
    x = torch.randn(3, 5, 12)
    expected_scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    assert layer.scaling == expected_scale
    ref = _reference(
        x.double(), base.weight.double(), base.bias.double() if bias else None,
        layer.lora_A.weight.double(), layer.lora_B.weight.double(), expected_scale,
    )  # fmt: skip
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_lora_linear_low_precision_base_keeps_fp32_adapter() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoraLinear(base, rank=2, alpha=4)
    randomize([("b", layer.lora_B.weight)], seed=4)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(4, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = _reference(x.double(), base.weight.double(), base.bias.double(), layer.lora_A.weight.double(),
                     layer.lora_B.weight.double(), 2.0)  # fmt: skip
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    # The adapter really is in the output (not lost to the base's precision).
    assert (y.double() - (x.double() @ base.weight.double().T + base.bias.double())).abs().max() > 0.1


def _kept(saved: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    saved.append(t)
    return t


COMPILE_BACKENDS = ["aot_eager", "aot_eager_decomp_partition", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_lora_backward_redraws_the_forwards_dropout(backend: str) -> None:
    """Compiled, A's input (dropped out) is recomputed in the backward, not saved: the backward must see the
    forward's mask. float32, so the mask can be read back from the gradients: dx = g W + s (g B A) * m / (1 - p)
    gives m (0 or 1 everywhere; A, B and g positive keep g B A away from 0), and the output and A's gradient must
    both be the float64 reference under it."""
    torch._dynamo.reset()  # (fresh: past the recompile limit a compiled layer would quietly run eagerly)
    torch.manual_seed(0)
    p, scale = 0.4, 2.0
    base = nn.Linear(24, 20)
    base.requires_grad_(False)
    layer = LoraLinear(base, rank=4, alpha=8, dropout=p)
    with torch.no_grad():
        layer.lora_A.weight.uniform_(0.5, 1.0)
        layer.lora_B.weight.uniform_(0.5, 1.0)
    step = torch.compile(layer, backend=backend)
    x = torch.randn(3, 7, 24, requires_grad=True)
    g = torch.rand(3, 7, 20) + 0.5
    y = step(x)
    y.backward(g)
    w, a_mat, b_mat = (t.detach().double() for t in (base.weight, layer.lora_A.weight, layer.lora_B.weight))
    x64, g64 = x.detach().double(), g.double()
    through = scale * (g64 @ b_mat @ a_mat) / (1 - p)  # dx's adapter part where the mask is 1 (> 2 everywhere)
    mask = (x.grad.double() - g64 @ w) / through
    assert ((mask - 1).abs() < 1e-4).logical_or(mask.abs() < 1e-4).all()  # 0 or 1: one mask for both passes
    mask = mask.round()
    assert 0.3 < mask.mean() < 0.9  # really dropped some, kept most
    dropped = x64 * mask / (1 - p)
    ref_y = x64 @ w.T + base.bias.double() + scale * (dropped @ a_mat.T) @ b_mat.T
    torch.testing.assert_close(y.detach().double(), ref_y, rtol=1e-5, atol=1e-5)
    ref_grad_a = scale * (g64 @ b_mat).reshape(-1, 4).T @ dropped.reshape(-1, 24)
    torch.testing.assert_close(layer.lora_A.weight.grad.double(), ref_grad_a, rtol=1e-4, atol=1e-4)  # (21-term sums)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_lora_over_bf16_keeps_no_float32_copy_of_its_input(backend: str) -> None:
    """Over a bf16 base a compiled graph would keep A's input, x cast to float32 and dropped out (twice x's bytes,
    plus the mask), for A's gradient: it keeps neither (the backward recomputes them), and the gradients are the
    uncompiled layer's where nothing is random (dropout 0)."""
    torch.manual_seed(0)
    for dropout in (0.0, 0.3):
        torch._dynamo.reset()  # (fresh: past the recompile limit a compiled layer would quietly run eagerly)
        base = nn.Linear(32, 48).to(torch.bfloat16)
        base.requires_grad_(False)
        layer = LoraLinear(base, rank=4, alpha=8, dropout=dropout)
        randomize([("b", layer.lora_B.weight)], seed=3)
        x = torch.randn(2, 8, 32).to(torch.bfloat16).requires_grad_(True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_kept, saved), lambda t: t):
            y = torch.compile(layer, backend=backend)(x)
        # (a float32 copy or a mask; eager backends also keep the CPU generator's state, uint8, to redraw the mask)
        big = [
            (t.dtype, tuple(t.shape))
            for t in saved
            if t.numel() >= x.numel() and t.dtype in (torch.float32, torch.bool)
        ]
        assert big == [], f"dropout {dropout}: compiled LoRA saved {big}"
        y.float().sum().backward()
        if dropout == 0.0:
            grads = [x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
            x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
            layer(x).float().sum().backward()
            # (x's gradient is bf16: the compiled graph rounds its two parts' sum once, eager twice)
            torch.testing.assert_close(
                grads, [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad], rtol=2e-2, atol=1e-3
            )


def test_fresh_adapter_changes_nothing_and_dropout_only_in_training() -> None:
    model = tiny_model("tiny-chatglm3")
    ids = random_ids(model)
    with torch.no_grad():
        before = model(ids)
    method = build_method("lora", {"rank": 4, "dropout": 0.5, "target_modules": "all"})
    method.setup(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    randomize(method.trainable_parameters(model), seed=5)
    model.train()
    with torch.no_grad():
        a, b = model(ids), model(ids)
    assert not torch.allclose(a, b)  # dropout on the adapter's input
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_targets_by_name(preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name)
    n = model.config.num_layers
    qkv = find_targets(model, "query_key_value")
    assert len(qkv) == n and all(name.endswith(".query_key_value") for name in qkv)
    every = find_targets(model, "all")
    leaves = sorted({name.rsplit(".", 1)[-1] for name in every})
    assert leaves == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert len(every) == 4 * n
    assert find_targets(model, "query_key_value, dense_4h_to_h") == find_targets(
        model, ["query_key_value", "dense_4h_to_h"]
    )
    with pytest.raises(ValueError, match="did you mean 'query_key_value'"):
        find_targets(model, "query_key_valu")
    output = "lm_head" if generation == "chatglm" else "output_layer"
    with pytest.raises(ValueError, match="output layer"):
        find_targets(model, output)
    with pytest.raises(ValueError, match="not a linear layer"):
        find_targets(model, "mlp")


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_setup_trains_only_fp32_adapters_over_bf16_base(preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name, dtype=torch.bfloat16)
    method = build_method("lora", LoraOptions(rank=4, target_modules="all", dropout=0.0))
    method.setup(model)
    names = {n for n, _ in method.trainable_parameters(model)}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 4 * model.config.num_layers
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in names else torch.bfloat16), n
    randomize(method.trainable_parameters(model), seed=6)
    model.train()
    model(random_ids(model)).float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in names), n


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_merge_gives_the_adapter_models_logits(preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name)
    original_names = list(model.state_dict())
    method = build_method("lora", {"rank": 4, "alpha": 16, "target_modules": "all", "use_rslora": True})
    method.setup(model)
    randomize(method.trainable_parameters(model), seed=7)
    ids = random_ids(model)
    with torch.no_grad():
        unmerged = model(ids)
        base_only = tiny_model(preset_name)(ids)
    assert (unmerged - base_only).abs().max() > 1e-2  # the adapter matters
    method.merge(model)
    assert not lora_layers(model)
    assert list(model.state_dict()) == original_names  # the original parameter names again
    with torch.no_grad():  # fp32 rounding, amplified by v1's large activations: 1e-4 of logits ~10
        torch.testing.assert_close(model(ids), unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no LoRA"):
        method.merge(model)


def test_merge_unmerge_round_trip_and_merged_forward() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base, rank=3, alpha=6)
    randomize([("b", layer.lora_B.weight)], seed=8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        ref = w0.double() + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        torch.testing.assert_close(base.weight.double(), ref, rtol=1e-6, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)


def test_setup_twice_and_merge_of_plain_model_refused() -> None:
    model = tiny_model("tiny-chatglm3")
    method = build_method("lora", {})
    method.setup(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        method.setup(model)
    assert merge_lora(tiny_model("tiny-chatglm3")) == 0
