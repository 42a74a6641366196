"""Checkpoint loading/saving against small stand-in modules that use the original ChatGLM parameter names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import glmtune.models.checkpoint as ckpt
from glmtune.models.chatglm import ChatGLMForCausalLM
from glmtune.models.checkpoint import (
    CheckpointError,
    checkpoint_files,
    iter_checkpoint,
    load_weights,
    read_tensor_infos,
    save_pretrained,
    save_weights,
)
from glmtune.models.config import GLMConfig, preset
from glmtune.models.glm import GLMForCausalLM

V, H, F, L, QKV = 96, 16, 24, 2, 32  # vocab, hidden, ffn, layers, fused qkv width


# ---- stand-in models ------------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(H, QKV, bias=True)
        self.dense = nn.Linear(H, H, bias=False)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(H, 2 * F, bias=False)
        self.dense_4h_to_h = nn.Linear(F, H, bias=False)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.empty(H))
        self.self_attention = _Attn()
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.empty(H))
        self.mlp = _MLP()


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.empty(4))


class ChatGLM2Like(nn.Module):
    """transformer.{embedding.word_embeddings, rotary_pos_emb, encoder.layers.N..., encoder.final_layernorm,
    output_layer, [prefix_encoder]} as in ChatGLM2/3 and GLM-4."""

    def __init__(self, *, prefix: bool = False, step_buffer: bool = False) -> None:
        super().__init__()
        t = self.transformer = nn.Module()
        t.embedding = nn.Module()
        t.embedding.word_embeddings = nn.Embedding(V, H)
        t.rotary_pos_emb = _Rotary()
        t.encoder = nn.Module()
        t.encoder.layers = nn.ModuleList(_Block() for _ in range(L))
        t.encoder.final_layernorm = nn.Module()
        t.encoder.final_layernorm.weight = nn.Parameter(torch.empty(H))
        t.output_layer = nn.Linear(H, V, bias=False)
        if prefix:
            t.prefix_encoder = nn.Module()
            t.prefix_encoder.embedding = nn.Embedding(4, 2 * L * H)
        if step_buffer:
            self.register_buffer("step", torch.zeros(3, dtype=torch.int64))


class ChatGLM1Like(nn.Module):
    """ChatGLM-6B v1 names; lm_head shares word_embeddings' parameter (tied), or is absent (``head=False``)."""

    def __init__(self, head: bool = True) -> None:
        super().__init__()
        t = self.transformer = nn.Module()
        t.word_embeddings = nn.Embedding(V, H)
        t.layers = nn.ModuleList(nn.Module() for _ in range(L))
        for layer in t.layers:
            layer.attention = nn.Module()
            layer.attention.query_key_value = nn.Linear(H, 3 * H)
            layer.attention.rotary_emb = _Rotary()
            layer.mlp = nn.Module()
            layer.mlp.dense_h_to_4h = nn.Linear(H, F)
        t.final_layernorm = nn.LayerNorm(H)
        if head:
            self.lm_head = nn.Linear(H, V, bias=False)
            self.lm_head.weight = t.word_embeddings.weight


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randint(0, 100, t.shape, generator=g))
    return model


def on_meta(cls: type[nn.Module], **kw) -> nn.Module:
    with torch.device("meta"):
        return cls(**kw)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def write_sharded(state: dict[str, torch.Tensor], folder: Path, fmt: str, n: int, *, index: bool = True) -> None:
    """Split ``state`` into n shards with the original names and (optionally) an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(n):
        part = {k: state[k].contiguous() for k in names[i::n]}
        stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
        fname = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
        if fmt == "bin":
            torch.save(part, folder / fname)
        else:
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    if index:
        index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


# ---- loading -----------------------------------------------------------------------------------------------------
LAYOUTS = ["safe-single", "safe-sharded", "bin-single", "bin-sharded", "bin-legacy", "safe-noindex"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_layouts_bit_identical(tmp_path: Path, layout: str) -> None:
    ref = randomized(ChatGLM2Like(step_buffer=True))
    state = ref.state_dict()
    if layout == "safe-single":
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    elif layout == "bin-single":
        torch.save(state, tmp_path / "pytorch_model.bin")
    elif layout == "bin-legacy":
        torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif layout == "safe-noindex":
        write_sharded(state, tmp_path, "safetensors", 2, index=False)
    else:
        write_sharded(state, tmp_path, layout.split("-")[0].replace("safe", "safetensors"), 3)
    model = on_meta(ChatGLM2Like, step_buffer=True)
    report = load_weights(model, tmp_path)
    assert_same(model.state_dict(), state)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.transformer.output_layer.weight, nn.Parameter)
    assert sorted(report.loaded) == sorted(state)
    assert report.missing_optional == [] and report.tied == []
    assert report.num_bytes == sum(t.nbytes for t in state.values())


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-legacy"])
def test_load_in_small_windows_and_row_chunks(tmp_path: Path, fmt: str, monkeypatch) -> None:
    monkeypatch.setattr(ckpt, "_WINDOW_BYTES", 700)  # the file is reopened many times per shard
    monkeypatch.setattr(ckpt, "_CHUNK_BYTES", 200)  # big tensors are read in row ranges (uneven last chunk)
    ref = randomized(ChatGLM2Like())
    if fmt == "bin-legacy":
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        write_sharded(ref.state_dict(), tmp_path, fmt, 2)
    model = on_meta(ChatGLM2Like)
    load_weights(model, tmp_path)
    assert_same(model.state_dict(), ref.state_dict())
    model = on_meta(ChatGLM2Like)
    load_weights(model, tmp_path, dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref.state_dict()[name].double().to(torch.bfloat16)), name
    names = [n for n, _, _ in iter_checkpoint(tmp_path)]
    assert sorted(names) == sorted(ref.state_dict())


def test_dtype_conversion_and_dtype_rules(tmp_path: Path) -> None:
    ref = randomized(ChatGLM2Like(step_buffer=True))
    state16 = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    write_sharded(state16, tmp_path, "bin", 2)
    model = on_meta(ChatGLM2Like, step_buffer=True)
    load_weights(model, tmp_path, dtype=torch.bfloat16, keep_dtype=[r"inv_freq$"])
    got = model.state_dict()
    for name, src in state16.items():
        if name == "step":  # non-float buffer keeps the model's dtype
            assert got[name].dtype == torch.int64 and torch.equal(got[name], src)
        elif name.endswith("inv_freq"):  # keep_dtype: the model's fp32
            assert got[name].dtype == torch.float32 and torch.equal(got[name], src.double().float())
        else:  # rounding the exact fp16 value once into bf16, computed via float64
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], src.double().to(torch.bfloat16)), name
    load_weights(model2 := on_meta(ChatGLM2Like, step_buffer=True), tmp_path, dtype=torch.float32, device="cpu")
    assert model2.transformer.output_layer.weight.dtype == torch.float32
    expected = state16["transformer.output_layer.weight"].double().float()
    assert torch.equal(model2.transformer.output_layer.weight, expected)


def test_requires_grad_is_kept(tmp_path: Path) -> None:
    ref = randomized(ChatGLM2Like())
    save_weights(ref, tmp_path)
    model = on_meta(ChatGLM2Like)
    model.transformer.embedding.word_embeddings.weight.requires_grad_(False)
    load_weights(model, tmp_path)
    assert not model.transformer.embedding.word_embeddings.weight.requires_grad
    assert model.transformer.output_layer.weight.requires_grad


def test_optional_and_ignore(tmp_path: Path) -> None:
    ref = randomized(ChatGLM2Like())
    state = dict(ref.state_dict())
    state["transformer.extra_thing"] = torch.ones(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = on_meta(ChatGLM2Like, prefix=True)
    with pytest.raises(CheckpointError, match="transformer.extra_thing"):
        load_weights(model, tmp_path, optional=[r"prefix_encoder\."])
    with pytest.raises(CheckpointError, match=r"prefix_encoder\.embedding\.weight"):
        load_weights(on_meta(ChatGLM2Like, prefix=True), tmp_path, ignore=[r"extra_thing"])
    report = load_weights(model, tmp_path, optional=[r"prefix_encoder\."], ignore=[r"extra_thing"])
    assert report.missing_optional == ["transformer.prefix_encoder.embedding.weight"]
    assert report.skipped == ["transformer.extra_thing"]
    assert model.transformer.prefix_encoder.embedding.weight.is_meta
    assert torch.equal(model.transformer.output_layer.weight, ref.transformer.output_layer.weight)


def test_v1_tied_head_both_names_in_checkpoint(tmp_path: Path) -> None:
    ref = randomized(ChatGLM1Like())
    state = {k: v.clone() for k, v in ref.state_dict().items()}  # v1 checkpoints hold both names
    assert "lm_head.weight" in state and "transformer.word_embeddings.weight" in state
    write_sharded(state, tmp_path, "bin", 3)
    model = on_meta(ChatGLM1Like)
    report = load_weights(model, tmp_path, ignore=[r"rotary_emb\.inv_freq$"], optional=[r"rotary_emb\.inv_freq$"])
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, ref.transformer.word_embeddings.weight)
    assert len(report.tied) == 1
    assert len(report.missing_optional) == L  # the ignored inv_freq buffers, for the model to compute


def test_v1_tied_copies_that_differ_prefer_the_model_first_name(tmp_path: Path, caplog) -> None:
    ref = randomized(ChatGLM1Like())
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = on_meta(ChatGLM1Like)
    load_weights(model, tmp_path)
    assert torch.equal(model.lm_head.weight, ref.transformer.word_embeddings.weight)
    assert "differ" in caplog.text


def test_v1_alias_onto_a_model_without_head(tmp_path: Path) -> None:
    ref = randomized(ChatGLM1Like())
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = on_meta(ChatGLM1Like, head=False)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' in .*pytorch_model\.bin"):
        load_weights(model, tmp_path)
    report = load_weights(model, tmp_path, aliases={"lm_head.weight": "transformer.word_embeddings.weight"})
    assert report.tied == ["lm_head.weight"] or report.tied == ["transformer.word_embeddings.weight"]
    assert torch.equal(model.transformer.word_embeddings.weight, ref.transformer.word_embeddings.weight)
    with pytest.raises(ValueError, match="not a tensor of the model"):
        load_weights(on_meta(ChatGLM1Like, head=False), tmp_path, aliases={"lm_head.weight": "nope"})


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_error_unexpected_tensor_names_tensor_and_file(tmp_path: Path, fmt: str) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    state["transformer.encoder.layers.0.mlp.dense_h_to_4h.bias"] = torch.zeros(2 * F)
    write_sharded(state, tmp_path, fmt, 2)
    with pytest.raises(CheckpointError) as e:
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    assert "transformer.encoder.layers.0.mlp.dense_h_to_4h.bias" in str(e.value)
    assert "-of-00002." in str(e.value)


def test_error_unexpected_in_legacy_file_found_while_streaming(tmp_path: Path) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    state["zzz.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"'zzz\.weight' in .*pytorch_model\.bin"):
        load_weights(on_meta(ChatGLM2Like), tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_error_wrong_shape(tmp_path: Path, fmt: str) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    state["transformer.output_layer.weight"] = torch.zeros(V + 1, H)
    write_sharded(state, tmp_path, fmt, 2)
    with pytest.raises(CheckpointError) as e:
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    msg = str(e.value)
    assert "transformer.output_layer.weight" in msg and f"({V + 1}, {H})" in msg and f"({V}, {H})" in msg
    assert "-of-00002." in msg


def test_error_integer_tensor_into_float_parameter(tmp_path: Path) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    state["transformer.output_layer.weight"] = torch.zeros(V, H, dtype=torch.int8)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.output_layer\.weight'"):
        load_weights(on_meta(ChatGLM2Like), tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_error_missing_tensors_are_listed(tmp_path: Path, legacy: bool) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    del state["transformer.encoder.final_layernorm.weight"]
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as e:
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    msg = str(e.value)
    assert "2 model tensor(s) missing" in msg and "pytorch_model.bin" in msg
    assert "transformer.encoder.final_layernorm.weight" in msg
    assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight" in msg


def test_error_missing_tensor_the_index_promised(tmp_path: Path) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    write_sharded(state, tmp_path, "safetensors", 2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    part = load_file(str(shard))
    gone = sorted(part)[0]
    del part[gone]
    save_file(part, str(shard))
    with pytest.raises(CheckpointError, match=rf"'{gone}' \(the index places it in model-00002-of-00002\.safetensors"):
        load_weights(on_meta(ChatGLM2Like), tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_error_index_points_to_missing_shard(tmp_path: Path, fmt: str) -> None:
    write_sharded(dict(randomized(ChatGLM2Like()).state_dict()), tmp_path, fmt, 2)
    shard = next(p for p in tmp_path.iterdir() if "00002-of" in p.name)
    shard.unlink()
    index = json.loads(next(tmp_path.glob("*.index.json")).read_text())
    holder = next(n for n, f in index["weight_map"].items() if f == shard.name)
    with pytest.raises(CheckpointError) as e:
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    assert shard.name in str(e.value) and f"'{holder}'" in str(e.value) and "index.json" in str(e.value)


def test_error_no_weight_files_and_bad_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight files"):
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        checkpoint_files(tmp_path / "nope")
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: line 1"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="weight_map"):
        checkpoint_files(tmp_path)


@pytest.mark.parametrize(
    ("fname", "damage"),
    [
        ("model.safetensors", "garbage"),
        ("model.safetensors", "truncate"),
        ("pytorch_model.bin", "garbage"),
        ("pytorch_model.bin", "truncate"),
        ("pytorch_model.bin", "nested"),
    ],
)
def test_error_corrupt_file(tmp_path: Path, fname: str, damage: str) -> None:
    state = {k: v.contiguous() for k, v in randomized(ChatGLM2Like()).state_dict().items()}
    path = tmp_path / fname
    if fname.endswith(".bin"):
        torch.save({"model": state} if damage == "nested" else state, path)
    else:
        save_file(state, str(path))
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x13" * 64 + data[64:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_weights(on_meta(ChatGLM2Like), tmp_path)
    assert fname in str(e.value)
    if damage == "nested":
        assert "'model'" in str(e.value)


# ---- the one reader of small weight files (adapters, prefixes) -----------------------------------------------------
@pytest.mark.parametrize("fname", ["a.safetensors", "a.bin"])
def test_read_tensor_file_reads_both_formats(tmp_path: Path, fname: str) -> None:
    state = {k: v.contiguous() for k, v in randomized(ChatGLM2Like()).state_dict().items()}
    path = tmp_path / fname
    if fname.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert_same(ckpt.read_tensor_file(path), state)


class _Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""


@pytest.mark.parametrize(
    ("fname", "damage", "says"),
    [
        ("a.safetensors", "missing", "no such weight file"),
        ("a.safetensors", "garbage", "not a readable safetensors file"),
        ("a.safetensors", "truncate", "not a readable safetensors file"),
        ("a.bin", "garbage", "not a readable PyTorch weights file"),
        ("a.bin", "truncate", "not a readable PyTorch weights file"),
        ("a.bin", "object", "not a readable PyTorch weights file"),
        ("a.bin", "list", "expected a mapping of tensor names to tensors, got list"),
        ("a.bin", "nested", "entry 'model' is a dict, not a tensor"),
    ],
)
def test_read_tensor_file_errors_name_the_file(tmp_path: Path, fname: str, damage: str, says: str) -> None:
    state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    path = tmp_path / fname
    if fname.endswith(".bin"):
        obj = {"object": _Payload(), "list": [state["w"]], "nested": {"model": state}}.get(damage, state)
        torch.save(obj, path)
    elif damage != "missing":
        save_file(state, str(path))
    if damage == "garbage":
        path.write_bytes(b"\x13" * 64 + path.read_bytes()[64:])
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as e:
        ckpt.read_tensor_file(path)
    assert str(e.value).startswith(f"{path}: {says}")


# ---- the one shard writer ------------------------------------------------------------------------------------------
def test_shard_writer_fills_shards_in_order_and_indexes_them(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    with ckpt.ShardWriter(tmp_path, max_shard_bytes=900) as w:
        for name, t in tensors.items():
            w.add(name, t)
        written = w.finish()
    assert [p.name for p in written] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(load_file(str(written[0]))) == ["t0", "t1"]
    index = json.loads(written[-1].read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no part file left
    assert_same({name: t.clone() for name, t, _ in iter_checkpoint(tmp_path)}, tensors)


def test_shard_writer_one_shard_and_cleanup_on_error(tmp_path: Path) -> None:
    with ckpt.ShardWriter(tmp_path / "one") as w:
        w.add("a", torch.randn(3))
        assert w.finish() == [tmp_path / "one" / "model.safetensors"]
    with pytest.raises(CheckpointError, match="'a'"), ckpt.ShardWriter(tmp_path / "bad", max_shard_bytes=8) as w:
        w.add("a", torch.randn(4))
        w.add("b", torch.randn(4))  # writes the first shard as a part file
        w.add("a", torch.randn(4))
    assert list((tmp_path / "bad").iterdir()) == []
    with pytest.raises(CheckpointError, match="no tensors"):
        ckpt.ShardWriter(tmp_path / "empty").finish()


def test_error_same_tensor_in_two_shards(tmp_path: Path) -> None:
    state = dict(randomized(ChatGLM2Like()).state_dict())
    write_sharded(state, tmp_path, "safetensors", 2)
    extra = load_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    two = load_file(str(tmp_path / "model-00002-of-00002.safetensors"))
    name = sorted(extra)[0]
    two[name] = extra[name]
    save_file(two, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{name}' also appears in .*model-00001-of-00002"):
        load_weights(on_meta(ChatGLM2Like), tmp_path)


# ---- inspection --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_read_tensor_infos(tmp_path: Path, fmt: str) -> None:
    state = {k: v.half() for k, v in randomized(ChatGLM2Like()).state_dict().items()}
    write_sharded(state, tmp_path, fmt, 2)
    infos = read_tensor_infos(tmp_path)
    assert set(infos) == set(state)
    for name, t in state.items():
        assert infos[name].shape == tuple(t.shape) and infos[name].dtype == "float16"
        assert infos[name].numel == t.numel()
    assert len({i.file for i in infos.values()}) == 2
    files = {name: file for name, _, file in iter_checkpoint(tmp_path)}
    assert files == {n: i.file for n, i in infos.items()}


# ---- saving ------------------------------------------------------------------------------------------------------
def test_save_sharded_index_and_reload(tmp_path: Path) -> None:
    ref = randomized(ChatGLM2Like())
    written = save_weights(ref, tmp_path, max_shard_bytes=4000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    state = ref.state_dict()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert len(written) == n + 1
    for shard in tmp_path.glob("model-*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert sum(f.get_slice(k).get_shape()[0] for k in f.keys()) > 0
    model = on_meta(ChatGLM2Like)
    load_weights(model, tmp_path)
    assert_same(model.state_dict(), state)
    # A later single-file save into the same folder removes the old shards and index.
    save_weights(ref, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    load_weights(model := on_meta(ChatGLM2Like), tmp_path)
    assert_same(model.state_dict(), state)


def test_save_dtype_and_tied_saved_once(tmp_path: Path) -> None:
    ref = randomized(ChatGLM1Like())
    save_weights(ref, tmp_path, dtype=torch.bfloat16)
    infos = read_tensor_infos(tmp_path)
    assert "lm_head.weight" not in infos and "transformer.word_embeddings.weight" in infos
    assert {i.dtype for i in infos.values()} == {"bfloat16"}
    model = on_meta(ChatGLM1Like)
    load_weights(model, tmp_path)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref.state_dict()[name].double().to(torch.bfloat16)), name


def test_save_refuses_meta_and_non_tensors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"word_embeddings\.weight.*meta"):
        save_weights(on_meta(ChatGLM2Like), tmp_path)
    with pytest.raises(CheckpointError, match="'x'"):
        save_weights({"x": 3}, tmp_path)  # type: ignore[dict-item]


def _tokenizer_source(folder: Path) -> list[Path]:
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"\x00spm-bytes\xff")
    (folder / "tokenizer_config.json").write_text('{"padding_side": "left"}')
    return [folder / "tokenizer.model"]


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    ref = randomized(ChatGLM2Like())
    tok = _tokenizer_source(tmp_path / "src")
    config = preset("tiny-chatglm2")
    out = tmp_path / "out"
    save_pretrained(ref, config, out, tok, max_shard_bytes=5000, dtype=torch.float16)
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "tokenizer.model" in names and "tokenizer_config.json" in names
    assert "model.safetensors.index.json" in names
    assert (out / "tokenizer.model").read_bytes() == tok[0].read_bytes()
    loaded_cfg = GLMConfig.from_json(out)
    assert loaded_cfg.torch_dtype == "float16" and loaded_cfg.num_layers == config.num_layers
    model = on_meta(ChatGLM2Like)
    load_weights(model, out)
    expected = {k: v.half() for k, v in ref.state_dict().items()}
    assert_same(model.state_dict(), expected)
    # Saving the reloaded model again gives the same bytes per tensor.
    save_pretrained(model, loaded_cfg, tmp_path / "again", tok)
    assert_same(load_file(str(tmp_path / "again" / "model.safetensors")), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_pretrained_failure_keeps_the_existing_folder(tmp_path: Path, monkeypatch) -> None:
    tok = _tokenizer_source(tmp_path / "src")
    out = tmp_path / "out"
    save_pretrained(randomized(ChatGLM2Like(), seed=1), preset("tiny-chatglm2"), out, tok, max_shard_bytes=5000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(CheckpointError, match="missing.model"):  # fails after the weights were written
        save_pretrained(randomized(ChatGLM2Like(), seed=2), preset("tiny-chatglm2"), out, [tmp_path / "missing.model"])
    calls = {"n": 0}
    real = ckpt.save_file

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(randomized(ChatGLM2Like(), seed=2), preset("tiny-chatglm2"), out, tok, max_shard_bytes=5000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no half-written folder left beside


def test_save_pretrained_refuses_overwriting_its_own_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json"):
        save_pretrained(randomized(ChatGLM2Like()), preset("tiny-chatglm2"), tmp_path / "out", [src / "config.json"])
    assert not (tmp_path / "out").exists()


# ---- the real models -------------------------------------------------------------------------------------------------
def test_real_chatglm_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = preset("tiny-chatglm2")
    ref = randomized(ChatGLMForCausalLM(config))
    save_pretrained(ref, config, tmp_path / "m", max_shard_bytes=50_000)
    with torch.device("meta"):
        model = ChatGLMForCausalLM(config)
    report = load_weights(model, tmp_path / "m", **model.checkpoint_rules())
    assert report.missing_optional == []
    assert_same(model.state_dict(), ref.state_dict())


def test_real_glm_v1_round_trip_keeps_the_tie(tmp_path: Path) -> None:
    config = preset("tiny-chatglm")
    ref = randomized(GLMForCausalLM(config))
    ref.tie_weights()
    save_pretrained(ref, config, tmp_path / "m", max_shard_bytes=50_000)
    assert "lm_head.weight" not in read_tensor_infos(tmp_path / "m")  # the shared tensor is written once
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    load_weights(model, tmp_path / "m", **model.checkpoint_rules())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert_same(model.state_dict(), ref.state_dict())
