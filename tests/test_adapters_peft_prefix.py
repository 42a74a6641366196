"""PEFT's PREFIX_TUNING format (GLM-4's official P-Tuning v2), both ways, with the real ``peft`` library as the oracle.

PEFT's ``get_prompt`` returns, per layer, the (keys, values) it hands the original GLM-4 attention, each
(b, heads, P, d); a prefix read by glmtune must give the same from ``prefix_key_values``, and the logits must be the
float64 reference's with those keys/values in front of every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapter_support import random_ids, tiny_model
from glmtune.adapters import build_method
from glmtune.adapters.peft_prefix import TENSOR_NAME, read_peft_prefix, save_peft_prefix
from glmtune.adapters.ptuning import PrefixError, load_prefix, read_prefix_checkpoint
from glmtune.merge import export_ptuning
from glmtune.models.checkpoint import CheckpointError
from reference_chatglm import reference_logits

PRESETS = ["tiny-glm4", "tiny-chatglm3"]


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


class _HFConfig(dict):
    """What PEFT reads of a transformers config: ``in`` tests, ``to_dict`` and ``vocab_size``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(model_type="chatglm", vocab_size=vocab_size)
        self.model_type = "chatglm"
        self.vocab_size = vocab_size

    def to_dict(self) -> dict:
        return dict(self)


class _Wrapped(nn.Module):
    """A glmtune model behind the surface PEFT's causal-LM wrapper touches (PEFT only builds and saves the prefix
    here; the forward that consumes it is glmtune's, checked against the reference)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = _HFConfig(model.config.padded_vocab_size)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return {}

    def forward(self, *args, **kwargs):
        raise NotImplementedError


def _peft_config(peft, model, *, projection: bool, virtual: int = 3):
    cfg = model.config
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=virtual, num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_kv_heads, token_dim=cfg.num_kv_heads * cfg.head_dim,
        prefix_projection=projection, encoder_hidden_size=16,
    )  # fmt: skip


def _layers(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's past key values (a transformers cache or the legacy tuple) as [(keys, values)] per layer."""
    if isinstance(past, (tuple, list)):
        return [(k, v) for k, v in past] if not isinstance(past[0], torch.Tensor) else [(p[0], p[1]) for p in past]
    return [(layer.keys, layer.values) for layer in past.layers]


def _peft_prefix(peft, preset_name: str, projection: bool, seed: int = 3):
    """A PEFT prefix-tuning model on a tiny glmtune model, with random prefix weights."""
    pm = peft.get_peft_model(_Wrapped(tiny_model(preset_name)), _peft_config(peft, tiny_model(preset_name),
                                                                           projection=projection))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "prompt_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return pm.eval()


def _assert_same_kv(model, pm, batch: int = 2) -> None:
    ours = model.prefix_key_values(batch, dtype=torch.float32, device="cpu")
    theirs = _layers(pm.get_prompt(batch))
    assert len(ours) == len(theirs) == model.config.num_layers
    for (k, v), (pk, pv) in zip(ours, theirs, strict=True):
        assert k.shape == pk.shape  # (b, kv heads, P, d)
        torch.testing.assert_close(k, pk, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v, pv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("preset_name", PRESETS)
def test_peft_saved_prefix_loads_with_peft_keys_values(peft, tmp_path: Path, preset_name: str,
                                                       projection: bool) -> None:  # fmt: skip
    pm = _peft_prefix(peft, preset_name, projection)
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == {TENSOR_NAME}

    ckpt = read_prefix_checkpoint(tmp_path / "adapter")
    assert (ckpt.pre_seq_len, ckpt.prefix_projection) == (3, False)
    model = tiny_model(preset_name)
    load_prefix(model, ckpt)
    model.eval()
    _assert_same_kv(model, pm)

    # And the logits: the float64 reference with PEFT's keys/values in front of every layer.
    ids = random_ids(model, batch=1, length=6)[0].tolist()
    prefix_kv = [(k[0].double(), v[0].double()) for k, v in _layers(pm.get_prompt(1))]
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0]
    base = tiny_model(preset_name)
    want = reference_logits(base.state_dict(), base.config, ids, list(range(6)),
                            [list(range(q + 1)) for q in range(6)], prefix_kv=prefix_kv)  # fmt: skip
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (got - base(torch.tensor([ids]))[0]).abs().max() > 1e-3  # the prefix matters


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_glmtune_prefix_written_for_peft_loads_in_peft(peft, tmp_path: Path, projection: bool) -> None:
    model = tiny_model("tiny-glm4")
    build_method("ptuning", {"pre_seq_len": 4, "prefix_projection": projection}).setup(model)
    model.eval()
    save_peft_prefix(model, tmp_path / "adapter", base_model_name_or_path="/models/glm-4-9b-chat")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PREFIX_TUNING" and raw["base_model_name_or_path"] == "/models/glm-4-9b-chat"

    pm = peft.PeftModel.from_pretrained(_Wrapped(tiny_model("tiny-glm4")), str(tmp_path / "adapter")).eval()
    _assert_same_kv(model, pm, batch=3)


def test_export_writes_a_peft_prefix_from_a_run_checkpoint(peft, tmp_path: Path) -> None:
    """An official-format prefix folder (what a glmtune P-Tuning run holds) exported with --format peft."""
    from glmtune.adapters.ptuning import save_prefix

    model = tiny_model("tiny-glm4")
    build_method("ptuning", {"pre_seq_len": 2, "prefix_projection": True}).setup(model)
    model.eval()
    save_prefix(model, tmp_path / "official", config=model.config)
    out = export_ptuning(tmp_path / "official", tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(_Wrapped(tiny_model("tiny-glm4")), str(out)).eval()
    _assert_same_kv(model, pm)
    # ... and back: the PEFT folder exports to the official format when the base is given.
    base = tmp_path / "base"
    base.mkdir()
    model.config.replace(pre_seq_len=None, prefix_projection=False).to_json(base / "config.json")
    back = export_ptuning(out, tmp_path / "back", base=base)
    again = tiny_model("tiny-glm4")
    load_prefix(again, back)
    again.eval()
    _assert_same_kv(again, pm)


def _write_adapter(path: Path, config: dict, tensor: torch.Tensor) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({TENSOR_NAME: tensor}, str(path / "adapter_model.safetensors"))
    return path


def _good_config(model) -> dict:
    cfg = model.config
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
            "num_layers": cfg.num_layers, "token_dim": cfg.num_kv_heads * cfg.head_dim,
            "num_attention_heads": cfg.num_kv_heads, "num_transformer_submodules": 1}  # fmt: skip


def test_mismatches_name_the_field(tmp_path: Path) -> None:
    model = tiny_model("tiny-glm4")
    good = _good_config(model)
    width = good["num_layers"] * 2 * good["token_dim"]

    # GLM-4 with PEFT's defaults (all query heads, hidden_size wide) could never have run on the original model.
    wrong = dict(good, num_attention_heads=model.config.num_attention_heads, token_dim=model.config.hidden_size)
    d = _write_adapter(tmp_path / "heads", wrong, torch.zeros(2, good["num_layers"] * 2 * model.config.hidden_size))
    with pytest.raises(PrefixError, match=r"adapter_config.json: field 'num_attention_heads' is 4 .* needs 2"):
        load_prefix(tiny_model("tiny-glm4"), d)

    d = _write_adapter(tmp_path / "shape", good, torch.zeros(3, width))
    with pytest.raises(PrefixError, match=r"adapter_model.safetensors: tensor 'prompt_embeddings' has shape \(3, "):
        read_peft_prefix(d)

    d = _write_adapter(tmp_path / "layers", dict(good, num_layers=5), torch.zeros(2, 5 * 2 * good["token_dim"]))
    with pytest.raises(PrefixError, match="field 'num_layers' is 5 but the base model needs 2"):
        load_prefix(tiny_model("tiny-glm4"), d)

    d = _write_adapter(tmp_path / "seq2seq", dict(good, num_transformer_submodules=2), torch.zeros(2, width))
    with pytest.raises(PrefixError, match="field 'num_transformer_submodules' is 2"):
        read_peft_prefix(d)

    d = _write_adapter(tmp_path / "virtual", dict(good, num_virtual_tokens=0), torch.zeros(2, width))
    with pytest.raises(PrefixError, match="field 'num_virtual_tokens' must be a positive integer"):
        read_peft_prefix(d)

    v1 = tiny_model("tiny-chatglm")
    d = _write_adapter(
        tmp_path / "v1",
        _good_config(v1),
        torch.zeros(2, v1.config.num_layers * 2 * v1.config.num_kv_heads * v1.config.head_dim),
    )
    with pytest.raises(PrefixError, match=r"ChatGLM-6B \(v1\)"):
        load_prefix(v1, d)


def test_resolve_finds_the_base_and_chat_loads_it(tmp_path: Path) -> None:
    """A PEFT prefix folder is a P-Tuning source for chat/eval/export, its base from base_model_name_or_path."""
    from glmtune.runs import load_for_inference, resolve
    from glmtune.tiny import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base", ["你好 世界 hello world"] * 20, generation="glm4")
    pre = load_for_inference(base, dtype="fp32", device="cpu")
    build_method("ptuning", {"pre_seq_len": 2, "prefix_projection": False}).setup(pre.model)
    with torch.no_grad():
        pre.model.transformer.prefix_encoder.embedding.weight.normal_(0, 0.5)
    save_peft_prefix(pre.model, tmp_path / "adapter", base_model_name_or_path=str(base))

    r = resolve(tmp_path / "adapter")
    assert (r.kind, r.base_dir) == ("ptuning", Path(base))
    loaded = load_for_inference(tmp_path / "adapter", dtype="fp32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), pre.model.eval()(ids), rtol=0, atol=0)


def test_older_peft_bin_file_reads_the_same(tmp_path: Path) -> None:
    model = tiny_model("tiny-glm4")
    good = _good_config(model)
    values = torch.randn(2, good["num_layers"] * 2 * good["token_dim"])
    a = _write_adapter(tmp_path / "safe", good, values)
    b = tmp_path / "bin"
    b.mkdir()
    (b / "adapter_config.json").write_text(json.dumps(good))
    torch.save({TENSOR_NAME: values}, b / "adapter_model.bin")
    ka, kb = read_peft_prefix(a), read_peft_prefix(b)
    assert kb.weights_file.name == "adapter_model.bin"
    torch.testing.assert_close(ka.tensors["embedding.weight"], kb.tensors["embedding.weight"], rtol=0, atol=0)
    (b / "adapter_model.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"adapter_model.bin: not a readable PyTorch weights file"):
        read_peft_prefix(b)
