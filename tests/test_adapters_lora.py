"""LoRA layer numerics against a float64 reference, injection by target names, merge/unmerge, trainable state."""

from __future__ import annotations

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
