"""P-Tuning v2: the encoder attached to a plain model, fp32 over a bf16 base, the official prefix-only format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapter_support import PRESET_IDS, PRESETS, random_ids, randomize, tiny_model
from glmtune.adapters import build_method
from glmtune.adapters.ptuning import PrefixError, load_prefix, read_prefix_checkpoint
from glmtune.models import build_model
from glmtune.models.checkpoint import CheckpointError
from glmtune.models.config import preset

PREFIX = "transformer.prefix_encoder."


def _native(preset_name: str, pre_seq_len: int, projection: bool):
    """The model class itself built with pre_seq_len (as the original builds it from config.json)."""
    config = preset(preset_name).replace(pre_seq_len=pre_seq_len, prefix_projection=projection)
    model = build_model(config)
    model.init_weights(seed=0, std=0.3 if config.arch == "glm" else 0.05)
    return model.eval()


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_attached_encoder_is_the_models_own(preset_name: str, generation: str, projection: bool) -> None:
    model = tiny_model(preset_name)
    build_method("ptuning", {"pre_seq_len": 3, "prefix_projection": projection}).setup(model)
    native = _native(preset_name, 3, projection)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(PREFIX)}
    theirs = {k: tuple(v.shape) for k, v in native.state_dict().items() if k.startswith(PREFIX)}
    assert ours == theirs and ours
    # Same weights everywhere -> same logits as the model built with the prefix from the start.
    native.load_state_dict(model.state_dict())
    ids = random_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), native(ids), rtol=0, atol=0)
        assert (model(ids) - tiny_model(preset_name)(ids)).abs().max() > 1e-3  # the prefix matters


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_fp32_encoder_over_bf16_base_and_only_it_gets_gradients(preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name, dtype=torch.bfloat16)
    method = build_method("ptuning", {"pre_seq_len": 4, "prefix_projection": True})
    method.setup(model)
    trainable = dict(method.trainable_parameters(model))
    assert set(trainable) == {PREFIX + n for n in ("embedding.weight", "trans.0.weight", "trans.0.bias",
                                                   "trans.2.weight", "trans.2.bias")}  # fmt: skip
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
        assert p.requires_grad == (name in trainable), name
    model.train()
    logits = model(random_ids(model))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_save_writes_the_official_format_and_loads_back(tmp_path: Path, preset_name: str, generation: str) -> None:
    model = tiny_model(preset_name)
    method = build_method("ptuning", {"pre_seq_len": 5})
    method.setup(model)
    randomize(method.trainable_parameters(model), seed=21, std=1.0)
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"tok")
    method.save(model, tmp_path / "out", config=model.config, tokenizer_files=[tok])
    saved = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert set(saved) == {PREFIX + "embedding.weight"} and saved[PREFIX + "embedding.weight"].dtype == torch.float32
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["pre_seq_len"] == 5 and cfg["prefix_projection"] is False and cfg["model_type"] == "chatglm"
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"tok"

    ids = random_ids(model)
    fresh = tiny_model(preset_name)
    build_method("ptuning", {"pre_seq_len": 5}).load(fresh, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_official_checkpoint_loads(tmp_path: Path, preset_name: str, generation: str, projection: bool) -> None:
    """A folder as the THUDM scripts leave it: the base config.json + pre_seq_len, and a pytorch_model.bin of
    ``transformer.prefix_encoder.*`` in the half precision the model was trained in. The reference is the original
    loading recipe: a model built with pre_seq_len, its prefix_encoder.load_state_dict(stripped keys)."""
    reference = _native(preset_name, 6, projection)
    gen = torch.Generator().manual_seed(22)
    state = {
        k: torch.randn(v.shape, generator=gen).half()
        for k, v in reference.transformer.prefix_encoder.state_dict().items()
    }
    folder = tmp_path / "checkpoint-3000"
    folder.mkdir()
    torch.save({PREFIX + k: v for k, v in state.items()}, folder / "pytorch_model.bin")
    raw = preset(preset_name).to_dict()
    raw.update(pre_seq_len=6, prefix_projection=projection, architectures=["ChatGLMModel"])
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "optimizer.pt").write_bytes(b"not read")
    reference.transformer.prefix_encoder.load_state_dict({k: v.float() for k, v in state.items()})

    model = tiny_model(preset_name)
    encoder = load_prefix(model, folder)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    ids = random_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def _checkpoint(tmp_path: Path, preset_name: str, pre_seq_len: int, projection: bool = False) -> Path:
    model = tiny_model(preset_name)
    method = build_method("ptuning", {"pre_seq_len": pre_seq_len, "prefix_projection": projection})
    method.setup(model)
    out = tmp_path / f"p{pre_seq_len}{projection}{preset_name}"
    method.save(model, out, config=model.config)
    return out


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses to build it."""


def test_mismatches_are_clear_errors(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "tiny-chatglm3", 4)
    with pytest.raises(PrefixError, match=r"config\.json.*pre_seq_len=4.*pre_seq_len=8"):
        build_method("ptuning", {"pre_seq_len": 8}).load(tiny_model("tiny-chatglm3"), ckpt)
    with pytest.raises(PrefixError, match="prefix_projection"):
        build_method("ptuning", {"pre_seq_len": 4, "prefix_projection": True}).load(tiny_model("tiny-chatglm3"), ckpt)
    # A model already set up with another length.
    model = tiny_model("tiny-chatglm3")
    build_method("ptuning", {"pre_seq_len": 8}).setup(model)
    with pytest.raises(PrefixError, match="pre_seq_len=4"):
        load_prefix(model, ckpt)
    # config.json and tensors disagree.
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "pre_seq_len": 16}))
    with pytest.raises(PrefixError, match=r"config\.json: field 'pre_seq_len' is 16.*pytorch_model\.bin"):
        read_prefix_checkpoint(ckpt)
    # Trained on another model.
    v1 = _checkpoint(tmp_path, "tiny-chatglm", 4)
    with pytest.raises(PrefixError, match="ChatGLM-6B"):
        load_prefix(tiny_model("tiny-chatglm3"), v1)
    (v1 / "config.json").unlink()
    with pytest.raises(PrefixError, match=r"pytorch_model\.bin: tensor 'transformer\.prefix_encoder\.embedding"):
        load_prefix(tiny_model("tiny-chatglm3"), v1)
    # A weights file that is not plain tensors (a pickle with code) is never run.
    torch.save({"transformer.prefix_encoder.embedding.weight": _Pickled()}, v1 / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"^{v1 / 'pytorch_model.bin'}: not a readable PyTorch weights file"):
        read_prefix_checkpoint(v1)
    # Not a prefix checkpoint at all.
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrefixError, match="no P-Tuning checkpoint"):
        read_prefix_checkpoint(tmp_path / "empty")


def test_ptuning_cannot_merge() -> None:
    with pytest.raises(ValueError, match="export"):
        build_method("ptuning", {}).merge(tiny_model("tiny-chatglm3"))
