"""Training over a frozen quantized base: LoRA over int8/int4/nf4 (QLoRA) and P-Tuning v2 over int8/int4 (and a
THUDM int4 folder) train through ``glmtune.train`` and their loss falls; the base stays frozen and quantized, the
trainable tensors float32; a quantized base with method full/freeze is refused; ``glmtune merge`` of an adapter
trained on a quantized base (full precision, or ``--bits``) equals the dequantized base + the adapter's delta."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmtune.cli import main
from glmtune.demo_data import corpus_lines
from glmtune.models.checkpoint import read_tensor_file, save_weights
from glmtune.models.nf4 import NF4Linear
from glmtune.models.quant import QuantizedLinear, dequantize_weight, is_quantized, quantize_weight
from glmtune.tiny import make_tiny_model_dir
from glmtune.train.config import ConfigError
from train_support import run, small_config, train_losses

# A tiny ChatGLM3 whose block linears NF4 can quantize (whole groups of 64 x 256 values): hidden 256.
SIZES = {"hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4, "kv_channels": 64}


# the same two examples every step: the loss of a working method falls fast
SAME_BATCH = ("data.max_samples=2", "train.batch_size=2", "train.max_steps=8")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("qtrain") / "base", corpus_lines(seed=0), generation="chatglm3",
                               vocab_size=600, sizes=SIZES)  # fmt: skip


@pytest.fixture(scope="module")
def int4_folder(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("qtrain-int4") / "int4"
    assert main(["quantize", str(base), str(out), "--bits", "4"]) == 0
    return out


def _check_frozen_base(trainer_model, scheme):
    layers = [m for m in trainer_model.modules() if is_quantized(m)]
    assert len(layers) == 8  # 4 linears x 2 blocks, still quantized after training
    kind = NF4Linear if scheme == "nf4" else QuantizedLinear
    assert all(isinstance(m, kind) for m in layers)
    for m in layers:
        assert not any(p.requires_grad for p in m.parameters(recurse=False))


@pytest.mark.parametrize(
    ("method", "quantize"),
    [("lora", "int8"), ("lora", "int4"), ("lora", "nf4"), ("ptuning", "int8"), ("ptuning", "int4")],
)
def test_training_over_a_quantized_base_lowers_the_loss(base, tmp_path, method, quantize):
    options = ["method.rank=4", "method.alpha=16", "train.learning_rate=1e-2"] if method == "lora" else [
        "method.pre_seq_len=8", "train.learning_rate=1e-1"]  # fmt: skip
    cfg = small_config(base, tmp_path / "run", f"method.name={method}", f"quantize={quantize}", *options,
                       *SAME_BATCH)  # fmt: skip
    result = run(cfg)
    losses = [loss for _, loss in train_losses(result.run_dir)]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses  # a frozen or broken method would stay put on the same batch
    # the resolved config keeps the quantization (a resume loads the same base)
    assert f"quantize: {quantize}" in (result.run_dir / "config.yaml").read_text()


def test_a_thudm_int4_folder_trains_as_it_is(int4_folder, tmp_path):
    from glmtune.train.distributed import DistInfo
    from glmtune.train.loop import Trainer

    cfg = small_config(int4_folder, tmp_path / "run", "method.name=ptuning", "method.pre_seq_len=8",
                       "train.learning_rate=1e-1", *SAME_BATCH)  # fmt: skip
    result = run(cfg)
    losses = [loss for _, loss in train_losses(result.run_dir)]
    assert losses[-1] < losses[0] - 0.3, losses  # a frozen or broken method would stay put on the same batch
    trainer = Trainer(cfg, DistInfo())
    trainer.load_model()
    _check_frozen_base(trainer.model, "int4")
    trainable = [p for p in trainer.named.values()]
    assert trainable and all(p.dtype == torch.float32 and p.requires_grad for p in trainable)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_lora_over_a_quantized_base_trains_only_float32_adapters(base, tmp_path, quantize):
    from glmtune.train.distributed import DistInfo
    from glmtune.train.loop import Trainer

    cfg = small_config(base, tmp_path / "run", f"quantize={quantize}", "method.rank=4",
                       "train.precision=auto")  # fmt: skip
    trainer = Trainer(cfg, DistInfo())
    trainer.load_model()
    _check_frozen_base(trainer.model, quantize)
    names = list(trainer.named)
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in trainer.named.values())


def test_a_quantized_base_with_method_full_or_freeze_is_refused(base, int4_folder, tmp_path):
    from glmtune.train.distributed import DistInfo
    from glmtune.train.loop import Trainer

    for method in ("full", "freeze"):
        with pytest.raises(ConfigError, match=rf"key 'quantize': int4 keeps the base frozen.*method '{method}'"):
            small_config(base, tmp_path / "run", f"method.name={method}", "quantize=int4")
        cfg = small_config(int4_folder, tmp_path / "run", f"method.name={method}")
        with pytest.raises(ValueError, match=rf"int4/config\.json: quantization_bit 4: a quantized base is frozen; "
                           rf"method '{method}' trains base weights"):  # fmt: skip
            Trainer(cfg, DistInfo()).load_model()


# ---- merge -------------------------------------------------------------------------------------------------------
def _lora_run(base, tmp_path, quantize):
    cfg = small_config(base, tmp_path / f"run-{quantize}", f"quantize={quantize}", "method.rank=4",
                       "method.target_modules=query_key_value,dense_4h_to_h", "train.max_steps=3")  # fmt: skip
    return run(cfg).run_dir


def _adapter_delta(run_dir, module):
    from glmtune.adapters.peft_format import read_lora_adapter
    from glmtune.runs import resolve

    adapter = read_lora_adapter(resolve(run_dir).result_dir)
    return adapter.modules[module].delta()


@pytest.mark.parametrize("quantize", ["int4", "nf4"])
def test_merge_of_an_adapter_trained_on_a_quantized_base(base, tmp_path, quantize):
    run_dir = _lora_run(base, tmp_path, quantize)
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), str(out), "--dtype", "fp32"]) == 0
    merged = read_tensor_file(out / "model.safetensors")
    original = read_tensor_file(base / "model.safetensors")
    assert not json.loads((out / "config.json").read_text()).get("quantization_bit")
    name = "transformer.encoder.layers.0.self_attention.query_key_value"
    w = original[name + ".weight"].float()
    if quantize == "nf4":
        layer = NF4Linear.from_linear(_linear(w))
        dequantized = layer.dequantized(torch.float32)
    else:
        dequantized = dequantize_weight(*quantize_weight(w, 4), 4, torch.float32)
    expected = dequantized + _adapter_delta(run_dir, name)
    torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-6)
    assert not torch.equal(merged[name + ".weight"], dequantized)  # the adapter trained
    # a linear the adapter does not touch: the dequantized base; everything else as it was
    dense = "transformer.encoder.layers.1.self_attention.dense.weight"
    assert not torch.equal(merged[dense], original[dense])
    emb = "transformer.embedding.word_embeddings.weight"
    assert torch.equal(merged[emb], original[emb])

    # --bits 8: THUDM's INT8 of the merged weights, loadable as it is
    out8 = tmp_path / "merged8"
    assert main(["merge", str(run_dir), str(out8), "--bits", "8"]) == 0
    assert json.loads((out8 / "config.json").read_text())["quantization_bit"] == 8
    q8 = read_tensor_file(out8 / "model.safetensors")
    q, scale = quantize_weight(merged[name + ".weight"], 8)
    assert torch.equal(q8[name + ".weight"], q) and torch.equal(q8[name + ".weight_scale"], scale)
    from glmtune.pretrained import load_pretrained

    pre = load_pretrained(out8, dtype="float32", device="cpu")
    assert sum(isinstance(m, QuantizedLinear) for m in pre.model.modules()) == 8


def _linear(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def test_merge_into_a_thudm_quantized_folder(int4_folder, base, tmp_path):
    """An adapter over a THUDM int4 folder: merge dequantizes the stored integers and adds the delta."""
    cfg = small_config(int4_folder, tmp_path / "run", "method.rank=4", "train.max_steps=2")
    run_dir = run(cfg).run_dir
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), str(out)]) == 0
    merged = read_tensor_file(out / "model.safetensors")
    stored = read_tensor_file(int4_folder / "model.safetensors")
    name = "transformer.encoder.layers.1.self_attention.query_key_value"
    expected = dequantize_weight(stored[name + ".weight"], stored[name + ".weight_scale"], 4, torch.float32)
    expected = expected + _adapter_delta(run_dir, name)
    assert merged[name + ".weight"].dtype == torch.float32  # the base's torch_dtype
    torch.testing.assert_close(merged[name + ".weight"], expected, rtol=0, atol=1e-6)
    assert name + ".weight_scale" not in merged
    assert not json.loads((out / "config.json").read_text()).get("quantization_bit")


def test_merge_of_a_bare_adapter_names_its_quantization_and_checks_the_scales(base, int4_folder, tmp_path, capsys):
    """--base-quantize names what the adapter was trained over (a bare PEFT folder has no run to say it; here it
    overrides the run's, with a warning)."""
    from glmtune.runs import resolve

    run_dir = _lora_run(base, tmp_path, "int8")
    adapter_dir = resolve(run_dir).result_dir
    out = tmp_path / "merged"
    assert main(["merge", str(adapter_dir), str(out), "--base", str(base), "--base-quantize", "int8"]) == 0
    name = "transformer.encoder.layers.0.self_attention.query_key_value"
    w = read_tensor_file(base / "model.safetensors")[name + ".weight"]
    expected = dequantize_weight(*quantize_weight(w, 8), 8, torch.float32) + _adapter_delta(run_dir, name)
    merged = read_tensor_file(out / "model.safetensors")[name + ".weight"]
    torch.testing.assert_close(merged.float(), expected.to(merged.dtype).float(), rtol=0, atol=1e-6)
    # a THUDM folder without a weight_scale: the merge names the tensor and what it expected
    broken = tmp_path / "broken"
    shutil.copytree(int4_folder, broken)
    sd = read_tensor_file(broken / "model.safetensors")
    del sd[name + ".weight_scale"]
    save_weights(sd, broken)
    capsys.readouterr()
    argv = ["merge", str(adapter_dir), str(tmp_path / "m2"), "--base", str(broken), "--base-quantize", "none"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert f"INT4 weight '{name}.weight' has no '{name}.weight_scale' (fp16, shape (512,))" in err


def test_chat_over_a_qlora_run_keeps_the_adapter_beside_the_nf4_layers(base, tmp_path):
    from glmtune.adapters.lora import LoraLinear
    from glmtune.runs import load_for_inference

    run_dir = _lora_run(base, tmp_path, "nf4")
    pre = load_for_inference(run_dir, dtype="fp32", device="cpu", quantize="nf4")
    layers = [m for m in pre.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) and not m.merged for m in layers)
    merged = load_for_inference(run_dir, dtype="fp32", device="cpu")  # full precision: merged as usual
    assert not any(isinstance(m, LoraLinear) for m in merged.model.modules())
