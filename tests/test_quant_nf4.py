"""NF4 with double quantization (``models/nf4.py``): torchao quantizes, glmtune dequantizes bit-identically, the
layer's backward keeps only the packed tensors, ``quantize: nf4`` loads weight by weight, and the errors."""

from __future__ import annotations

import builtins

import pytest
import torch
import torch.nn.functional as F

from glmtune.cli import main
from glmtune.demo_data import corpus_lines
from glmtune.models.nf4 import (
    BLOCK_SIZE,
    NF4Linear,
    NF4Unavailable,
    dequantize_nf4,
    nf4_round_trip,
)
from glmtune.models.quant import QUANTIZED_WEIGHT
from glmtune.pretrained import load_pretrained
from glmtune.tiny import make_tiny_model_dir

SIZES = {"hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4, "kv_channels": 64}


def _linear(out_f: int, in_f: int, dtype: torch.dtype, seed: int, bias: bool = True) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen, dtype=torch.float32) * 0.02)
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_identical_to_torchao(dtype):
    from torchao.quantization import to_nf4

    linear = _linear(128, 256, dtype, seed=0)
    layer = NF4Linear.from_linear(linear)
    reference = to_nf4(linear.weight.detach(), 64, 256)
    assert torch.equal(layer.dequantized(dtype), reference.get_original_weight())
    assert layer.quantized_data.dtype == torch.uint8 and layer.quantized_data.numel() == 128 * 256 // 2
    assert layer.quantized_scalers.dtype == torch.int8 and layer.quantized_scalers.numel() == 128 * 256 // BLOCK_SIZE


def test_codes_are_the_nearest_nf4_level_of_each_block_high_nibble_first():
    """An independent reading of the format: unpack the bytes (high nibble = the first value), and each code must be
    the nearest of the 16 levels to value / absmax(block) (up to ties), with the block scale close to the absmax."""
    w = _linear(64, 256, torch.float32, seed=1).weight.detach()
    layer = NF4Linear.from_linear(_linear(64, 256, torch.float32, seed=1))
    data = layer.quantized_data.to(torch.int64)
    codes = torch.stack([data >> 4, data & 15], dim=-1).flatten()
    blocks = w.flatten().view(-1, BLOCK_SIZE).double()
    absmax = blocks.abs().amax(-1, keepdim=True)
    levels = layer.nf4.double()
    nearest = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1).flatten()
    assert (codes == nearest).float().mean() > 0.999
    deq = layer.dequantized(torch.float64).flatten().view(-1, BLOCK_SIZE)
    scale = deq.abs().amax(-1, keepdim=True)  # level +-1 lands on the block scale for the block's absmax value
    assert torch.allclose(scale, absmax, rtol=0.02)
    gaps = (levels[1:] - levels[:-1]).max() / 2
    assert ((deq - blocks).abs() <= absmax * (gaps + 0.02)).all()


def test_forward_backward_and_what_the_backward_keeps():
    linear = _linear(128, 256, torch.float32, seed=2)
    layer = NF4Linear.from_linear(linear)
    w = layer.dequantized(torch.float32)
    x = torch.randn(3, 5, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=1e-5, atol=1e-6)
    # the backward keeps the packed tensors, never a dequantized (out, in) weight
    assert not any(t.is_floating_point() and t.shape == (128, 256) for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) < 128 * 256  # under 1 byte per weight
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ w, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert set(layer.state_dict()) == {"bias", "quantized_data", "quantized_scalers", "quantization_factor",
                                       "scaler_mean", "nf4"}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("nf4") / "m", corpus_lines(seed=0), generation="glm4",
                               vocab_size=500, sizes=SIZES)  # fmt: skip


def test_quantize_nf4_on_load_equals_the_round_trip_of_each_weight(folder):
    full = load_pretrained(folder, dtype="float32", device="cpu")
    pre = load_pretrained(folder, dtype="float32", device="cpu", quantize="nf4")
    layers = {n: m for n, m in pre.model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 4 * pre.config.num_layers
    assert not any(t.is_meta for t in [*pre.model.parameters(), *pre.model.buffers()])
    with torch.no_grad():
        for name, p in full.model.named_parameters():
            if QUANTIZED_WEIGHT.match(name):
                assert torch.equal(layers[name[: -len(".weight")]].dequantized(torch.float32), nf4_round_trip(p))
                p.copy_(nf4_round_trip(p))
        ids = torch.randint(5, pre.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(pre.model(ids), full.model(ids), rtol=1e-5, atol=1e-5)


def test_nf4_needs_whole_groups(tmp_path):
    small = make_tiny_model_dir(tmp_path / "small", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    with pytest.raises(ValueError, match=r"transformer\.encoder\.layers\.0\.self_attention\.query_key_value: NF4 "
                       r"needs a weight whose size is a multiple of 16384 values .* shape \(128, 64\) is not: use "
                       r"int8 or int4"):  # fmt: skip
        load_pretrained(small, dtype="float32", device="cpu", quantize="nf4")


def test_without_torchao_nf4_says_what_runs_instead(folder, monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    message = r"quantize nf4 needs torchao >= 0\.16 \(pip install 'torchao>=0\.16'\), which cannot be imported here"
    with pytest.raises(NF4Unavailable, match=message + r".*; int8 and int4 \(THUDM's format\) run without it"):
        load_pretrained(folder, dtype="float32", device="cpu", quantize="nf4")
    assert main(["chat", str(folder), "--quantize", "nf4", "--prompt", "hi", "--device", "cpu"]) != 0
    assert "int8 and int4 (THUDM's format) run without it" in capsys.readouterr().err


def test_a_failing_compile_falls_back_to_the_eager_dequantization(caplog):
    from glmtune.models import nf4

    layer = NF4Linear.from_linear(_linear(64, 256, torch.float32, seed=3))
    tensors = tuple(getattr(layer, n) for n in nf4._BUFFERS)
    compiled = nf4._Compiled()

    def broken(*_):
        raise RuntimeError("no triton here")

    compiled.fn = broken
    out = compiled(*tensors, (64, 256))
    assert compiled.failed and "dequantizing eagerly" in caplog.text
    assert torch.equal(out, dequantize_nf4(*tensors, (64, 256)))
    compiled.fn = None  # not tried again
    assert torch.equal(compiled(*tensors, (64, 256)), out) and compiled.fn is None


def test_under_autocast_the_layer_computes_in_the_autocast_dtype():
    linear = _linear(128, 256, torch.float32, seed=4)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = F.linear(x, layer.dequantized(torch.float32), linear.bias)  # autocast: bf16 operands
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
