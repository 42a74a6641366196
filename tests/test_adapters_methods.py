"""The method registry and its options, freeze (which parameters train) and full (save/load round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_support import PRESET_IDS, PRESETS, random_ids, tiny_model
from glmtune.adapters import FreezeOptions, LoraOptions, build_method, method_options
from glmtune.adapters.base import Method


def test_registry_builds_every_method_and_names_bad_options() -> None:
    for name in ("lora", "ptuning", "freeze", "full"):
        method = build_method(name, {})
        assert isinstance(method, Method) and method.name == name
    assert build_method("lora", {"rank": 16}).options == LoraOptions(rank=16)
    with pytest.raises(ValueError, match="unknown method 'loar'; did you mean 'lora'"):
        build_method("loar", {})
    with pytest.raises(ValueError, match="unknown option 'rnak' for method 'lora'; did you mean 'rank'"):
        build_method("lora", {"rnak": 4})
    with pytest.raises(ValueError, match="unknown option 'rank' for method 'full'"):
        build_method("full", {"rank": 4})
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"alpha": -1}, {"target_modules": []}, {"use_rslora": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_method("lora", bad)
    with pytest.raises(ValueError, match="pre_seq_len"):
        build_method("ptuning", {"pre_seq_len": 0})
    assert method_options("freeze", {"patterns": "mlp, final_layernorm"}).patterns == ["mlp", "final_layernorm"]


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_freeze_marks_exactly_the_right_parameters(preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name)
    n = model.config.num_layers
    method = build_method("freeze", FreezeOptions(trainable_layers=1))
    method.setup(model)
    trainable = {name for name, _ in method.trainable_parameters(model)}
    assert trainable == {name for name, _ in model.named_parameters() if _layer_of(name) == n - 1}
    assert all(p.requires_grad == (name in trainable) for name, p in model.named_parameters())

    model = tiny_model(preset_name)
    build_method(
        "freeze", {"trainable_layers": -1, "patterns": [r"final_layernorm", r"mlp\.dense_4h_to_h\.weight"]}
    ).setup(model)
    expected = {
        name
        for name, _ in model.named_parameters()
        if _layer_of(name) == 0 or "final_layernorm" in name or name.endswith("mlp.dense_4h_to_h.weight")
    }
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert any(_layer_of(name) == n - 1 for name in expected)  # the pattern reached the last layer too

    model.train()
    model(random_ids(model)).logsumexp(-1).mean().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == expected


def test_freeze_refusals_and_tied_names() -> None:
    model = tiny_model("tiny-chatglm")
    with pytest.raises(ValueError, match="has 2 layers"):
        build_method("freeze", {"trainable_layers": 3}).setup(model)
    with pytest.raises(ValueError, match="matches no parameter"):
        build_method("freeze", {"patterns": ["no_such_module"]}).setup(model)
    with pytest.raises(ValueError, match="nothing to train"):
        build_method("freeze", {"trainable_layers": 0}).setup(model)
    # ChatGLM-6B's lm_head.weight is the word embeddings: naming either trains the one tensor.
    build_method("freeze", {"trainable_layers": 0, "patterns": [r"^lm_head\."]}).setup(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.word_embeddings.weight"]


@pytest.mark.parametrize("name", ["full", "freeze"])
@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_full_results_round_trip(tmp_path: Path, preset_name: str, generation: str, name: str) -> None:
    model = tiny_model(preset_name)
    method = build_method(name, {})
    method.setup(model)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(0.01)
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"t")
    config = model.config.replace(torch_dtype="bfloat16")
    method.save(model, tmp_path / "out", config=config, tokenizer_files=[tok])
    assert (tmp_path / "out" / "tokenizer.model").is_file() and (tmp_path / "out" / "config.json").is_file()
    fresh = tiny_model(preset_name)
    method.load(fresh, tmp_path / "out")
    for (n1, p1), (n2, p2) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2.to(torch.bfloat16).float(), rtol=0, atol=0)  # written as the base's dtype
    with pytest.raises(ValueError, match="nothing to merge"):
        method.merge(model)
