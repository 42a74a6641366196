"""THUDM's INT4/INT8 format: packing, quantize/dequantize, QuantizedLinear, quantized folders (written by
``glmtune quantize``, loaded as they are) and quantize-on-load, on tiny v1, ChatGLM3 and GLM-4 models."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmtune.cli import main
from glmtune.demo_data import corpus_lines
from glmtune.models.checkpoint import CheckpointError, read_tensor_file, read_tensor_infos, save_weights
from glmtune.models.quant import (
    QUANTIZED_WEIGHT,
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from glmtune.pretrained import load_pretrained
from glmtune.tiny import make_tiny_model_dir

GENERATIONS = ("chatglm", "chatglm3", "glm4")


def _naive_pack(q: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.int8)
    for i in range(q.shape[0]):
        for j in range(0, q.shape[1], 2):
            byte = ((int(q[i, j]) & 0xF) << 4) | (int(q[i, j + 1]) & 0xF)
            out[i, j // 2] = byte - 256 if byte > 127 else byte
    return out


def test_int4_packing_high_nibble_first_and_round_trip():
    q = torch.tensor([[3, -2, -1, 5, 7, -7, 0, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    # 3,-2 -> 0x3E = 62; -1,5 -> 0xF5 = -11; 7,-7 -> 0x79 = 121; 0,-8 -> 0x08 = 8
    assert packed.tolist() == [[62, -11, 121, 8]]
    assert torch.equal(unpack_int4(packed), q)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (7, 16), generator=gen, dtype=torch.int8)
    q[0] = 0
    q[1, ::2], q[1, 1::2] = 7, -7
    assert torch.equal(pack_int4(q), _naive_pack(q))
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_dequantize_error_bound(bits):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 32, generator=gen, dtype=torch.float64)
    w[3] = 0  # a row of zeros
    q, scale = quantize_weight(w, bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.shape == ((12, 16) if bits == 4 else (12, 32))
    values = unpack_int4(q) if bits == 4 else q
    qmax = 2 ** (bits - 1) - 1
    assert values.abs().max() <= qmax and values.abs().amax(dim=-1)[torch.arange(12) != 3].min() == qmax
    torch.testing.assert_close(scale.double(), (w.abs().amax(-1) / qmax).half().double())
    back = dequantize_weight(q, scale, bits, torch.float64)
    assert back.dtype == torch.float64 and torch.all(back[3] == 0)
    # rounding: half a step per value (plus the fp16 rounding of the scale, relative 2^-11 of absmax)
    bound = scale.double()[:, None] * (0.5 + qmax * 2**-10)
    assert torch.all((back - w).abs() <= bound)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_forward_and_gradient(bits):
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(16, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 16, generator=gen, dtype=torch.float64))
    qlinear = QuantizedLinear.from_linear(linear, bits)
    assert set(qlinear.state_dict()) == {"weight", "weight_scale", "bias"}
    assert not any(p.requires_grad for p in qlinear.parameters())
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = qlinear(x)
    expected = F.linear(x, dequantize_weight(qlinear.weight, qlinear.weight_scale, bits, torch.float64), linear.bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---- tiny model folders ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    lines = corpus_lines(seed=0)
    return {g: make_tiny_model_dir(root / g, lines, generation=g, vocab_size=600) for g in GENERATIONS}


def _ids(pre) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(5, pre.config.vocab_size, (2, 12), generator=gen)


def _logits(pre, ids) -> torch.Tensor:
    with torch.no_grad():
        return pre.model(ids).float()


@pytest.mark.parametrize("generation", GENERATIONS)
def test_quantize_on_load_quality_and_quantize_command(folders, tmp_path, generation):
    src = folders[generation]
    full = load_pretrained(src, dtype="float32", device="cpu")
    ids = _ids(full)
    ref = _logits(full, ids)
    span = (ref.max() - ref.min()).item()
    for bits, limit in ((8, 0.01), (4, 0.05)):
        pre = load_pretrained(src, dtype="float32", device="cpu", quantize=f"int{bits}")
        qlinears = [m for m in pre.model.modules() if isinstance(m, QuantizedLinear)]
        assert len(qlinears) == 4 * pre.config.num_layers and all(m.bits == bits for m in qlinears)
        assert not any(t.is_meta for t in pre.model.state_dict().values())
        on_load = _logits(pre, ids)
        # the targets, as the mean deviation relative to the logit range (on these random tiny models the
        # largest single deviation is ~1.2 % / 20 % for v1 (std 0.3 weights), ~0.5 % / 6 % for v2+)
        err = (on_load - ref).abs().mean().item() / span
        assert err < limit, f"INT{bits}: {err:.4f} of the logit range"
        assert (on_load.argmax(-1) == ref.argmax(-1)).float().mean() >= (1.0 if bits == 8 else 0.6)

        out = tmp_path / f"int{bits}"
        assert main(["quantize", str(src), str(out), "--bits", str(bits)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_bit"] == bits
        assert (out / "tokenizer_config.json").is_file()
        infos = read_tensor_infos(out)
        for m_name, m in pre.model.named_modules():
            if isinstance(m, QuantizedLinear):
                w, s = infos[f"{m_name}.weight"], infos[f"{m_name}.weight_scale"]
                cols = m.in_features // 2 if bits == 4 else m.in_features
                assert (w.dtype, w.shape) == ("int8", (m.out_features, cols))
                assert (s.dtype, s.shape) == ("float16", (m.out_features,))
        loaded = load_pretrained(out, dtype="float32", device="cpu")
        assert sum(isinstance(m, QuantizedLinear) for m in loaded.model.modules()) == len(qlinears)
        assert torch.equal(_logits(loaded, ids), on_load)
        # quantize -> save -> load is bit-identical
        sd = {k: v for k, v in loaded.model.state_dict().items() if "inv_freq" not in k}
        file = read_tensor_file(next(out.glob("*.safetensors")))
        for name, t in file.items():
            if name in sd:
                assert torch.equal(sd[name].to(t.dtype), t), name


def test_gradients_reach_the_inputs_through_a_quantized_model(folders):
    pre = load_pretrained(folders["chatglm3"], dtype="float32", device="cpu", quantize="int4")
    assert not any(p.requires_grad for p in pre.model.parameters() if p.dtype == torch.int8)
    for p in pre.model.parameters():
        p.requires_grad_(False)
    ids = _ids(pre)
    captured = {}

    def leaf(mod, inp, out):  # the embeddings as a LoRA/P-Tuning input would be: requiring grad, over a frozen base
        captured["h"] = out.detach().requires_grad_(True)
        return captured["h"]

    handle = pre.model.transformer.embedding.word_embeddings.register_forward_hook(leaf)
    try:
        pre.model(ids).float().logsumexp(-1).sum().backward()
    finally:
        handle.remove()
    assert captured["h"].grad is not None and captured["h"].grad.abs().sum() > 0


def test_bad_quantized_folders(folders, tmp_path, capsys):
    src = folders["chatglm3"]
    out = tmp_path / "int4"
    assert main(["quantize", str(src), str(out), "--bits", "4"]) == 0
    # config says 8 but the weights are INT4: the error names the file and the tensor
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_bit": 8}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.encoder\.layers\.0\..*"
                       r"weight' has shape .*quantization_bit"):  # fmt: skip
        load_pretrained(out, dtype="float32", device="cpu")
    (out / "config.json").write_text(json.dumps({**config, "quantization_bit": 3}))
    with pytest.raises(ValueError, match=r"int4/config\.json: 'quantization_bit' must be 4 or 8 \(or 0\), got 3"):
        load_pretrained(out, dtype="float32", device="cpu")
    # a weight_scale missing
    (out / "config.json").write_text(json.dumps(config))
    sd = read_tensor_file(out / "model.safetensors")
    del sd["transformer.encoder.layers.0.self_attention.dense.weight_scale"]
    save_weights(sd, out)
    with pytest.raises(CheckpointError, match=r"self_attention\.dense\.weight_scale"):
        load_pretrained(out, dtype="float32", device="cpu")
    # an already quantized folder, a quantized folder asked for other bits, bad bits
    capsys.readouterr()
    assert main(["quantize", str(out), str(tmp_path / "again"), "--bits", "8"]) != 0
    assert "int4/config.json: the weights are quantized already (quantization_bit 4)" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="quantized to 4 bits already"):
        load_pretrained(out, dtype="float32", device="cpu", quantize="int8")
    with pytest.raises(SystemExit):
        main(["quantize", str(src), str(tmp_path / "x"), "--bits", "3"])
    assert "argument --bits: invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err


def test_quantize_option_reaches_the_loader_from_chat_eval_and_serve(folders, monkeypatch, capsys):
    import glmtune.runs
    from glmtune.cli import build_parser

    for command, extra in (("chat", []), ("eval", ["--data", "dev.json"]), ("serve", [])):
        assert build_parser().parse_args([command, "m", *extra]).quantize == "none"
        assert build_parser().parse_args([command, "m", *extra, "--quantize", "int4"]).quantize == "int4"
    seen = []

    def spy(*args, **kw):
        pre = load_pretrained(*args, **kw)
        seen.append((kw.get("quantize"), sum(isinstance(m, QuantizedLinear) for m in pre.model.modules())))
        return pre

    monkeypatch.setattr(glmtune.runs, "load_pretrained", spy)
    argv = ["chat", str(folders["glm4"]), "--quantize", "int8", "--prompt", "hello", "--greedy",
            "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert seen == [("int8", 8)]


def test_lora_adapter_over_a_quantized_base_stays_beside_it(folders, tmp_path):
    from glmtune.adapters import build_method
    from glmtune.adapters.lora import LoraLinear
    from glmtune.runs import load_for_inference

    base = folders["chatglm3"]
    pre = load_pretrained(base, dtype="float32", device="cpu")
    method = build_method("lora", {"rank": 2})
    method.setup(pre.model)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, p in method.trainable_parameters(pre.model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pre.model.eval()
    adapter = tmp_path / "adapter"
    method.save(pre.model, adapter, config=pre.model.config, tokenizer_files=pre.tokenizer.files)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    ids = _ids(pre)
    ref = _logits(pre, ids)
    quantized = load_for_inference(adapter, dtype="fp32", device="cpu", quantize="int8")
    layers = [m for m in quantized.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.base_layer, QuantizedLinear) and not m.merged for m in layers)
    out = _logits(quantized, ids)
    assert (out - ref).abs().mean() / (ref.max() - ref.min()) < 0.01


# ---- an independent reading of THUDM's scheme ----------------------------------------------------------------------
def _naive_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row, value by value: scale = fp16(absmax / (2^(bits-1) - 1)), value = round-half-even(w / scale)."""
    qmax = 2 ** (bits - 1) - 1
    rows, scales = [], []
    for row in w.float().tolist():
        scale = float(np.float16(np.float32(max(abs(v) for v in row)) / np.float32(qmax)))
        scales.append(scale)
        rows.append([0 if scale == 0 else max(-qmax, min(qmax, round(float(np.float32(v) / np.float32(scale)))))
                     for v in row])  # fmt: skip
    q = torch.tensor(rows, dtype=torch.int8)
    return (_naive_pack(q) if bits == 4 else q), torch.tensor(scales, dtype=torch.float16)


def _naive_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    values = q.tolist()
    if bits == 4:  # high nibble first, each a signed 4-bit integer
        values = [[x for byte in row for x in ((byte & 0xFF) >> 4, byte & 0xF)] for row in values]
        values = [[x - 16 if x > 7 else x for x in row] for row in values]
    return torch.tensor(values, dtype=torch.float32) * scale.float()[:, None]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_is_bit_exact_against_a_naive_implementation(bits):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(9, 24, generator=gen) * 0.05
    qmax = 2 ** (bits - 1) - 1
    w[0] = 0  # a row of zeros
    w[1] = torch.linspace(-1, 1, 24)  # the extremes +-qmax, odd values between
    w[2, ::3] = 0.3  # ties of equal values
    w[3] = torch.arange(24, dtype=torch.float32) - 11.5  # half steps: rounding ties
    q, scale = quantize_weight(w, bits)
    nq, nscale = _naive_quantize(w, bits)
    assert torch.equal(scale, nscale) and torch.equal(q, nq)
    values = unpack_int4(q) if bits == 4 else q
    assert values[1, 0] == -qmax and values[1, -1] == qmax and torch.all(values[0] == 0)
    assert torch.equal(dequantize_weight(q, scale, bits, torch.float32), _naive_dequantize(q, scale, bits))


@pytest.mark.parametrize("generation", ["chatglm", "glm4"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_thudm_folder_built_here_gives_the_logits_of_its_dequantized_weights(folders, tmp_path, generation, bits):
    """A quantized folder made by the naive scheme (not by glmtune) loads as it is and computes what the same model
    in full precision computes with the dequantized weights."""
    src = folders[generation]
    sd = read_tensor_file(src / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, t in sd.items():
        if QUANTIZED_WEIGHT.match(name):
            q, scale = _naive_quantize(t, bits)
            quantized[name], quantized[name + "_scale"] = q, scale
            dequantized[name] = _naive_dequantize(q, scale, bits)
        else:
            quantized[name] = dequantized[name] = t
    config = json.loads((src / "config.json").read_text())
    for out, tensors, extra in ((tmp_path / "q", quantized, {"quantization_bit": bits}), (tmp_path / "f", dequantized,
                                                                                          {})):  # fmt: skip
        shutil.copytree(src, out)
        save_weights(tensors, out)
        (out / "config.json").write_text(json.dumps({**config, **extra}))
    q_model = load_pretrained(tmp_path / "q", dtype="float32", device="cpu")
    f_model = load_pretrained(tmp_path / "f", dtype="float32", device="cpu")
    assert sum(isinstance(m, QuantizedLinear) for m in q_model.model.modules()) == 4 * q_model.config.num_layers
    ids = _ids(q_model)
    torch.testing.assert_close(_logits(q_model, ids), _logits(f_model, ids), rtol=1e-5, atol=1e-5)


def test_a_weight_scale_of_the_wrong_shape_is_named_with_the_expected_shape(folders, tmp_path):
    out = tmp_path / "int8"
    assert main(["quantize", str(folders["chatglm3"]), str(out), "--bits", "8"]) == 0
    sd = read_tensor_file(out / "model.safetensors")
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight_scale"
    rows = sd[name].shape[0]
    sd[name] = sd[name][: rows // 2].clone()
    save_weights(sd, out)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(name)}' has shape "
                       rf"\({rows // 2}\), the model expects \({rows}\)"):  # fmt: skip
        load_pretrained(out, dtype="float32", device="cpu")


# ---- the quality target on models whose shapes make quantization meaningful ---------------------------------
QUALITY_SIZES = {
    "chatglm": {"hidden_size": 256, "ffn_hidden_size": 1024, "num_attention_heads": 4},
    "chatglm3": {"hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4, "kv_channels": 64},
    "glm4": {"hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4, "kv_channels": 64},
}


@pytest.mark.parametrize("generation", GENERATIONS)
def test_quality_int8_int4_nf4_relative_to_the_logit_range(tmp_path, generation):
    """Hidden 256 (rows of 256 values share one INT scale; NF4 blocks of 64 in whole groups), weights N(0, 0.02) as
    tiny.py draws them for v2+ (v1 too here: its tiny std 0.3 makes a chaotic net where even int8 moves the logits
    by ~1.7 % of their range). The error is the mean |logit - reference| over the reference's range (max - min) on
    random tokens: int8 < 1 %, int4 < 5 %, nf4 < 5 % and below int4 (blocks of 64 beat rows of 256)."""
    src = make_tiny_model_dir(tmp_path / "m", corpus_lines(seed=0), generation=generation, vocab_size=600,
                              sizes=QUALITY_SIZES[generation])  # fmt: skip
    full = load_pretrained(src, dtype="float32", device="cpu")
    if generation == "chatglm":
        full.model.init_weights(seed=0, std=0.02)
        save_weights(full.model, src)
    ids = torch.randint(5, full.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    ref = _logits(full, ids)
    span = (ref.max() - ref.min()).item()
    err = {}
    for scheme in ("int8", "int4", "nf4"):
        out = _logits(load_pretrained(src, dtype="float32", device="cpu", quantize=scheme), ids)
        err[scheme] = (out - ref).abs().mean().item() / span
    assert err["int8"] < 0.01 and err["int4"] < 0.05 and err["nf4"] < 0.05, err
    assert err["nf4"] < err["int4"] and err["int8"] < err["int4"], err


def test_the_quantize_choices_are_one_list():
    """The CLI (no torch at start-up) and the training config keep copies of ``quant.SCHEMES``: they must agree."""
    import typing

    from glmtune.cli_options import QUANTIZE_CHOICES
    from glmtune.models.quant import SCHEMES
    from glmtune.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert QUANTIZE_CHOICES == SCHEMES == typing.get_args(hints["quantize"]) == ("none", "int8", "int4", "nf4")


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantize_on_load_holds_one_full_precision_weight_at_a_time(tmp_path, monkeypatch, scheme):
    """Every block linear read from the checkpoint in full precision is quantized and dropped before the next one is
    read: the loader never holds more than one (weak references to each weight it read, checked at every read)."""
    import gc
    import weakref

    import glmtune.models.checkpoint as checkpoint

    src = make_tiny_model_dir(tmp_path / "m", corpus_lines(seed=0), generation="glm4", vocab_size=500,
                              sizes=QUALITY_SIZES["glm4"])  # fmt: skip
    read = checkpoint._read_converted
    alive: list[weakref.ref] = []
    most = []

    def tracking(reader, name, device, dtype):
        gc.collect()
        most.append(sum(r() is not None for r in alive))
        t = read(reader, name, device, dtype)
        if QUANTIZED_WEIGHT.match(name):
            alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(checkpoint, "_read_converted", tracking)
    pre = load_pretrained(src, dtype="float32", device="cpu", quantize=scheme)
    gc.collect()
    assert len(alive) == 4 * pre.config.num_layers and max(most) == 0
    assert all(r() is None for r in alive)
