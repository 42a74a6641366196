"""PEFT's on-disk LoRA format, both directions, with the real ``peft`` library as the oracle on tiny glmtune models.

PEFT works on any nn.Module: ``get_peft_model`` wraps our model's linear layers in its own LoRA layers; after that
the (wrapped) base model's forward computes what PEFT means by the adapter, which is what we compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_support import PRESET_IDS, PRESETS, random_ids, randomize, tiny_model
from glmtune.adapters import build_method
from glmtune.adapters.lora import lora_layers
from glmtune.adapters.peft_format import AdapterError, load_lora_adapter, read_lora_adapter
from glmtune.models.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _for_peft(model):
    # PEFT's causal-LM wrapper reads this transformers method at construction; our model does not need it.
    model.prepare_inputs_for_generation = lambda *args, **kwargs: {}
    return model


def _peft_lora_modules(peft_model, peft) -> set[str]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name for name, m in base.named_modules() if isinstance(m, LoraLayer)}


PEFT_CONFIGS = {
    "qkv": dict(r=4, lora_alpha=32, target_modules=["query_key_value"]),
    "all-rslora": dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h",
                                                           "dense_4h_to_h"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=16, target_modules=["query_key_value", "dense_4h_to_h"],
                     rank_pattern={"dense_4h_to_h": 2}, alpha_pattern={r"layers\.1\..*query_key_value": 4}),
}  # fmt: skip


# Every variant on one generation, the widest on both: (preset, variant).
PEFT_CASES = [("tiny-chatglm", "all-rslora"), ("tiny-chatglm3", "all-rslora"), ("tiny-chatglm", "patterns"),
              ("tiny-chatglm3", "qkv")]  # fmt: skip


@pytest.mark.parametrize(("preset_name", "variant"), PEFT_CASES)
def test_peft_saved_adapter_loads_with_identical_logits(peft, tmp_path: Path, preset_name: str, variant: str) -> None:
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **PEFT_CONFIGS[variant])
    pm = peft.get_peft_model(_for_peft(tiny_model(preset_name)), config)
    randomize([(n, p) for n, p in pm.named_parameters() if "lora_" in n], seed=11)
    pm.eval()
    ids = random_ids(pm.get_base_model())
    with torch.no_grad():
        expected = pm.get_base_model()(ids)
        plain = tiny_model(preset_name)(ids)
    assert (expected - plain).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "adapter")

    model = tiny_model(preset_name)
    load_lora_adapter(model, tmp_path / "adapter")
    assert set(lora_layers(model)) == _peft_lora_modules(pm, peft)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_bin_adapter_with_adapter_name_in_keys(peft, tmp_path: Path, preset_name: str, generation: str) -> None:
    """Older tools: adapter_model.bin, keys as in memory (``lora_A.default.weight``)."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["dense_h_to_4h"])
    pm = peft.get_peft_model(_for_peft(tiny_model(preset_name)), config)
    randomize([(n, p) for n, p in pm.named_parameters() if "lora_" in n], seed=12)
    pm.eval()
    ids = random_ids(pm.get_base_model())
    with torch.no_grad():
        expected = pm.get_base_model()(ids)
    pm.save_pretrained(tmp_path / "a")
    state = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    assert all(".default." in n for n in state)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    torch.save(state, folder / "adapter_model.bin")
    model = tiny_model(preset_name)
    load_lora_adapter(model, folder)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    # Some tools store the names without PEFT's wrapper prefix.
    torch.save({k.removeprefix("base_model.model."): v for k, v in state.items()}, folder / "adapter_model.bin")
    model = tiny_model(preset_name)
    load_lora_adapter(model, folder)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


GLMTUNE_OPTIONS = {
    "qkv": {"rank": 4, "alpha": 32, "target_modules": "query_key_value"},
    "all-rslora": {"rank": 4, "alpha": 8, "target_modules": "all", "use_rslora": True},
    "list": {"rank": 2, "alpha": 6, "target_modules": ["dense", "dense_4h_to_h"]},
}


GLMTUNE_CASES = [("tiny-chatglm", "all-rslora"), ("tiny-chatglm3", "all-rslora"), ("tiny-chatglm", "list"),
                 ("tiny-chatglm3", "qkv")]  # fmt: skip


@pytest.mark.parametrize(("preset_name", "variant"), GLMTUNE_CASES)
def test_glmtune_saved_adapter_loads_in_peft_with_identical_logits(
    peft, tmp_path: Path, preset_name: str, variant: str
) -> None:
    model = tiny_model(preset_name)
    method = build_method("lora", {**GLMTUNE_OPTIONS[variant], "dropout": 0.05})
    method.setup(model)
    randomize(method.trainable_parameters(model), seed=13)
    ids = random_ids(model)
    with torch.no_grad():
        expected = model(ids)
    method.save(model, tmp_path / "adapter", config=model.config)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in saved)  # fmt: skip
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False and cfg["lora_dropout"] == 0.05

    pm = peft.PeftModel.from_pretrained(_for_peft(tiny_model(preset_name)), tmp_path / "adapter")
    pm.eval()
    assert _peft_lora_modules(pm, peft) == set(lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(pm.get_base_model()(ids), expected, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_are_written_as_patterns_peft_reads(peft, tmp_path: Path) -> None:
    """An adapter read with rank_pattern / alpha_pattern is written back so PEFT rebuilds the same layers."""
    src = peft.get_peft_model(
        _for_peft(tiny_model("tiny-chatglm3")),
        peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CONFIGS["patterns"]),
    )
    randomize([(n, p) for n, p in src.named_parameters() if "lora_" in n], seed=14)
    src.save_pretrained(tmp_path / "src")
    model = tiny_model("tiny-chatglm3")
    load_lora_adapter(model, tmp_path / "src")
    method = build_method("lora", {"target_modules": ["query_key_value", "dense_4h_to_h"]})
    method.save(model, tmp_path / "out", config=model.config)
    ids = random_ids(model)
    pm = peft.PeftModel.from_pretrained(_for_peft(tiny_model("tiny-chatglm3")), tmp_path / "out")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm.get_base_model()(ids), model(ids), rtol=1e-5, atol=1e-5)


# ---- refusals (no peft needed) -----------------------------------------------------------------------------------
def _adapter(tmp_path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


_QKV = "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value"
_OK = {f"{_QKV}.lora_A.weight": torch.zeros(2, 64), f"{_QKV}.lora_B.weight": torch.zeros(128, 2)}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["output_layer"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"r": 4}, "r"),
    ],
)
def test_unsupported_configs_name_the_field(tmp_path: Path, config: dict, field: str) -> None:
    folder = _adapter(tmp_path, config, _OK)
    with pytest.raises(AdapterError, match=f"'{field}'") as e:
        read_lora_adapter(folder)
    assert "adapter_config.json" in str(e.value)


def test_bad_tensors_and_wrong_model_are_clear_errors(tmp_path: Path) -> None:
    dora = {**_OK, f"{_QKV}.lora_magnitude_vector": torch.ones(128)}
    with pytest.raises(AdapterError, match="DoRA"):
        read_lora_adapter(_adapter(tmp_path, {}, dora))
    with pytest.raises(AdapterError, match="no lora_B"):
        read_lora_adapter(_adapter(tmp_path, {}, {f"{_QKV}.lora_A.weight": torch.zeros(2, 64)}))
    folder = _adapter(tmp_path, {}, _OK)
    with pytest.raises(AdapterError, match="another model generation"):
        load_lora_adapter(tiny_model("tiny-chatglm"), folder)  # v2 names on a v1 model
    wide = {f"{_QKV}.lora_A.weight": torch.zeros(2, 32), f"{_QKV}.lora_B.weight": torch.zeros(128, 2)}
    with pytest.raises(AdapterError, match="another model size"):
        load_lora_adapter(tiny_model("tiny-chatglm3"), _adapter(tmp_path, {}, wide))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_lora_adapter(tmp_path / "empty")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors file"):
        read_lora_adapter(folder)
