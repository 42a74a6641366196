"""merge_lora_to_checkpoint (shard by shard into the original format) and export_ptuning (official demo layout)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter_support import PRESET_IDS, PRESETS, random_ids, randomize, tiny_model
from glmtune.adapters import build_method
from glmtune.adapters.peft_format import AdapterError
from glmtune.merge import export_ptuning, merge_lora_to_checkpoint
from glmtune.models.checkpoint import save_pretrained
from glmtune.models.config import GLMConfig
from glmtune.pretrained import load_model

GENERATION = {"tiny-chatglm": "chatglm", "tiny-chatglm3": "chatglm3"}


def _base_dir(tmp_path: Path, preset_name: str) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(preset_name)
    side = tmp_path / "side"
    side.mkdir(exist_ok=True)
    (side / "tokenizer.model").write_bytes(b"sp")
    (side / "modeling_chatglm.py").write_text("# the original code file, copied, never run\n")
    base = tmp_path / "base"
    # Small shards: the merge must follow tensors across several files.
    save_pretrained(model, model.config, base, [side / "tokenizer.model"], extra_files=[side / "modeling_chatglm.py"],
                    max_shard_bytes=200_000)  # fmt: skip
    return base, model


def _adapter(tmp_path: Path, preset_name: str, targets: str = "all") -> tuple[Path, torch.nn.Module]:
    model = tiny_model(preset_name)
    method = build_method("lora", {"rank": 4, "alpha": 8, "target_modules": targets})
    method.setup(model)
    randomize(method.trainable_parameters(model), seed=31)
    method.save(model, tmp_path / "adapter", config=model.config)
    return tmp_path / "adapter", model


def _load(folder: Path, generation: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return load_model(folder, GLMConfig.from_json(folder), dtype=dtype, device=torch.device("cpu"),
                      generation=generation)  # fmt: skip


@pytest.mark.parametrize(("preset_name", "generation"), PRESETS, ids=PRESET_IDS)
def test_merged_checkpoint_reloads_with_base_plus_adapter_logits(
    tmp_path: Path, preset_name: str, generation: str
) -> None:
    base, _ = _base_dir(tmp_path, preset_name)
    adapter, with_adapter = _adapter(tmp_path, preset_name)
    out = merge_lora_to_checkpoint(base, adapter, tmp_path / "merged", max_shard_bytes=150_000)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert {"config.json", "tokenizer.model", "modeling_chatglm.py"} <= set(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {n for s in shards for n in load_file(str(out / s))}
    assert set(index["weight_map"]) == stored and set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())

    merged = _load(out, generation)
    ids = random_ids(merged)
    with torch.no_grad():
        expected = with_adapter(ids)
        assert (expected - _load(base, generation)(ids)).abs().max() > 1e-2
        torch.testing.assert_close(merged(ids), expected, rtol=1e-4, atol=1e-4)


def test_dtype_conversion_and_side_buffers(tmp_path: Path) -> None:
    base, _ = _base_dir(tmp_path, "tiny-chatglm")
    adapter, with_adapter = _adapter(tmp_path, "tiny-chatglm", targets="query_key_value")
    out = merge_lora_to_checkpoint(base, adapter, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    for name, t in tensors.items():
        # v1's rotary inv_freq buffers keep their float16 (the model does not read them; no silent change).
        assert t.dtype == (torch.float16 if name.endswith("inv_freq") else torch.bfloat16), name
    w = tensors["transformer.layers.0.attention.query_key_value.weight"].double()
    layer = with_adapter.transformer.layers[0].attention.query_key_value
    ref = layer.base_layer.weight.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    torch.testing.assert_close(w, ref, rtol=2**-8, atol=1e-6)  # bf16 rounding of the float32 sum
    assert (w - layer.base_layer.weight.double()).abs().max() > 1e-2


def test_refusals(tmp_path: Path) -> None:
    base, _ = _base_dir(tmp_path, "tiny-chatglm3")
    v1_adapter, _ = _adapter(tmp_path / "v1", "tiny-chatglm")
    with pytest.raises(AdapterError, match=r"module 'transformer\.layers\.0\.attention.*another model generation"):
        merge_lora_to_checkpoint(base, v1_adapter, tmp_path / "x")
    adapter, _ = _adapter(tmp_path, "tiny-chatglm3")
    with pytest.raises(ValueError, match="input folder"):
        merge_lora_to_checkpoint(base, adapter, base)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_lora_to_checkpoint(base, adapter, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown dtype"):
        merge_lora_to_checkpoint(base, adapter, tmp_path / "y", dtype="int4")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    from glmtune.merge import merge_lora_to_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merge_lora_to_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_bytes=16 * 2**20)
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.slow  # a subprocess that imports torch and merges a 100 MB model: ~2.5 s
def test_merge_memory_stays_well_under_the_model_size(tmp_path: Path) -> None:
    """A 128 MiB checkpoint in 4 shards merged in a fresh process: the peak RSS grows by far less than 1.5x its
    size (the host holds one output shard, the reader's window and one float32 matrix)."""
    base = tmp_path / "base"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    rows, cols = 1024, 4096  # 16 MiB per float32 matrix, 8 matrices
    weight_map = {}
    for shard in range(4):
        tensors = {f"transformer.encoder.layers.{2 * shard + i}.mlp.dense_4h_to_h.weight":
                   torch.randn(rows, cols, generator=gen) for i in range(2)}  # fmt: skip
        name = f"model-{shard + 1:05d}-of-00004.safetensors"
        save_file(tensors, str(base / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {}
    for layer in (1, 6):
        key = f"base_model.model.transformer.encoder.layers.{layer}.mlp.dense_4h_to_h"
        lora[f"{key}.lora_A.weight"] = torch.randn(8, cols, generator=gen)
        lora[f"{key}.lora_B.weight"] = torch.randn(rows, 8, generator=gen)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    model_bytes = 8 * rows * cols * 4
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(base), str(adapter), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    before, after = (int(x) * 1024 for x in proc.stdout.split())  # ru_maxrss is in KiB on Linux
    assert after - before < 0.75 * model_bytes, (after - before) / 2**20
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 8  # one 16 MiB matrix per output shard
    merged = load_file(str(tmp_path / "out" / index["weight_map"][name]))
    a, b = lora[f"base_model.model.{name[:-7]}.lora_A.weight"], lora[f"base_model.model.{name[:-7]}.lora_B.weight"]
    original = load_file(str(base / "model-00001-of-00004.safetensors"))[name]
    torch.testing.assert_close(merged[name], original + 2.0 * b @ a, rtol=1e-5, atol=1e-3)


# ---- export_ptuning --------------------------------------------------------------------------------------------
def _ptuning_run(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    base, _ = _base_dir(tmp_path, "tiny-chatglm3")
    model = tiny_model("tiny-chatglm3")
    method = build_method("ptuning", {"pre_seq_len": 3, "prefix_projection": True})
    method.setup(model)
    randomize(method.trainable_parameters(model), seed=32)
    run = tmp_path / "run"
    method.save(model, run / "model", config=model.config, tokenizer_files=[base / "tokenizer.model"])
    info = {"format": "glmtune-run", "version": 1, "base_model": str(base.resolve()), "generation": "chatglm3",
            "template": "chatglm3", "method": {"name": "ptuning", "pre_seq_len": 3, "prefix_projection": True},
            "dtype": "fp32"}  # fmt: skip
    (run / "run.json").write_text(json.dumps(info))
    return run, base, model


def test_export_ptuning_writes_the_official_demo_layout(tmp_path: Path) -> None:
    run, base, model = _ptuning_run(tmp_path)
    out = export_ptuning(run, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "pytorch_model.bin", "tokenizer.model", "modeling_chatglm.py"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base / "config.json").read_text())
    assert cfg == {**base_cfg, "pre_seq_len": 3, "prefix_projection": True}
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    expected = {f"transformer.prefix_encoder.{k}": v for k, v in model.transformer.prefix_encoder.state_dict().items()}
    assert saved.keys() == expected.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], expected[k], rtol=0, atol=0)
    # A prefix folder alone (no base) exports too, from its own config.json.
    again = export_ptuning(out, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == cfg


def test_export_refuses_a_lora_run(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path, "tiny-chatglm3")
    with pytest.raises(ValueError, match="not a P-Tuning"):
        export_ptuning(adapter, tmp_path / "out", base=tmp_path)
