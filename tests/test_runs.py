"""load_for_inference on everything a user may point at, and the merge / export commands on run folders."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from adapter_support import random_ids, randomize
from glmtune.adapters import build_method
from glmtune.merge_command import add_parser
from glmtune.pretrained import load_pretrained
from glmtune.runs import load_for_inference, resolve
from glmtune.tiny import make_tiny_model_dir

LINES = [f"the model {w} writes line {i} about {w} and data" for i in range(120) for w in ("chat", "glm", "tune")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {g: make_tiny_model_dir(root / g, LINES, generation=g, vocab_size=300) for g in ("chatglm3", "chatglm")}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _make_run(tmp_path: Path, base: Path, generation: str, method_name: str, options: dict) -> tuple[Path, object]:
    """A run folder as `glmtune train` leaves it: run.json, model/ (Method.save + tokenizer) and one checkpoint."""
    pre = load_pretrained(base, dtype="fp32", device="cpu")
    method = build_method(method_name, options)
    method.setup(pre.model)
    randomize(method.trainable_parameters(pre.model), seed=41, std=0.05)
    pre.model.eval()
    run = tmp_path / f"run-{method_name}-{generation}"
    method.save(pre.model, run / "model", config=pre.model.config, tokenizer_files=pre.tokenizer.files)
    step = run / "checkpoints" / "step-000002"
    shutil.copytree(run / "model", step / "model")
    (step / "state").mkdir()
    (step / "state" / "trainer.pt").write_bytes(b"")  # what makes a checkpoint complete (train/state.py)
    info = {"format": "glmtune-run", "version": 1, "base_model": str(base.resolve()), "generation": generation,
            "template": generation, "method": {"name": method_name, **options}, "dtype": "fp32"}  # fmt: skip
    (run / "run.json").write_text(json.dumps(info))
    return run, pre.model


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm"])
def test_lora_run_and_its_checkpoints(tmp_path: Path, bases: dict[str, Path], generation: str) -> None:
    run, trained = _make_run(tmp_path, bases[generation], generation, "lora", {"rank": 4, "target_modules": "all"})
    ids = random_ids(trained)
    expected = _logits(trained, ids)
    assert (
        expected - _logits(load_pretrained(bases[generation], dtype="fp32", device="cpu").model, ids)
    ).abs().max() > 1e-2
    step = run / "checkpoints" / "step-000002"
    for path in (run, run / "model", step, step / "model"):
        r = resolve(path)
        assert (r.kind, r.base_dir, r.run_dir, r.generation) == ("lora", bases[generation].resolve(), run, generation)
    pre = load_for_inference(run, dtype="fp32", device="cpu", merge=False)
    assert pre.generation == generation and pre.path == run and not pre.model.training
    torch.testing.assert_close(_logits(pre.model, ids), expected, rtol=0, atol=0)
    merged = load_for_inference(step, dtype="fp32", device="cpu")
    assert not any(".lora_" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(_logits(merged.model, ids), expected, rtol=1e-4, atol=1e-4)


def test_unfinished_run_opens_its_latest_complete_checkpoint(tmp_path: Path, bases: dict[str, Path]) -> None:
    run, _ = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "lora", {"rank": 2})
    shutil.rmtree(run / "model")
    newer = run / "checkpoints" / "step-000004"
    shutil.copytree(run / "checkpoints" / "step-000002", newer)
    assert resolve(run).result_dir == newer / "model"
    (newer / "state" / "trainer.pt").unlink()  # a checkpoint still being written (or cut short) is not one
    assert resolve(run).result_dir == run / "checkpoints" / "step-000002" / "model"
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no model/ folder and no checkpoint yet"):
        resolve(run)


def test_peft_adapter_folder_finds_its_base_or_asks_for_it(tmp_path: Path, bases: dict[str, Path]) -> None:
    run, trained = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "lora", {"rank": 2})
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "model", adapter)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    ids = random_ids(trained)
    expected = _logits(trained, ids)
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(bases["chatglm3"])}))
    pre = load_for_inference(adapter, dtype="fp32", device="cpu", merge=False)
    torch.testing.assert_close(_logits(pre.model, ids), expected, rtol=0, atol=0)
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "THUDM/chatglm3-6b"}))
    with pytest.raises(ValueError, match=r"THUDM/chatglm3-6b.*--base"):
        load_for_inference(adapter, dtype="fp32", device="cpu")
    pre = load_for_inference(adapter, dtype="fp32", device="cpu", base=bases["chatglm3"], merge=False)
    torch.testing.assert_close(_logits(pre.model, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm"])
def test_ptuning_run_and_official_folder(tmp_path: Path, bases: dict[str, Path], generation: str) -> None:
    options = {"pre_seq_len": 3, "prefix_projection": generation == "chatglm"}
    run, trained = _make_run(tmp_path, bases[generation], generation, "ptuning", options)
    ids = random_ids(trained)
    expected = _logits(trained, ids)
    pre = load_for_inference(run, dtype="fp32", device="cpu")
    assert pre.model.config.pre_seq_len == 3
    torch.testing.assert_close(_logits(pre.model, ids), expected, rtol=0, atol=0)
    official = tmp_path / "official"
    shutil.copytree(run / "model", official)
    assert resolve(official, base=bases[generation]).kind == "ptuning"
    with pytest.raises(ValueError, match="--base"):
        load_for_inference(official, dtype="fp32", device="cpu")
    pre = load_for_inference(official, dtype="fp32", device="cpu", base=bases[generation])
    torch.testing.assert_close(_logits(pre.model, ids), expected, rtol=0, atol=0)


def test_model_folders_full_runs_and_bad_runs(tmp_path: Path, bases: dict[str, Path]) -> None:
    r = resolve(bases["chatglm3"])
    assert (r.kind, r.base_dir, r.run_dir) == ("model", None, None)
    run, trained = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "freeze", {"trainable_layers": 1})
    ids = random_ids(trained)
    pre = load_for_inference(run, dtype="fp32", device="cpu")
    assert resolve(run).kind == "model"
    torch.testing.assert_close(_logits(pre.model, ids), _logits(trained, ids), rtol=0, atol=0)
    # run.json says lora but model/ holds a complete model.
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "method": {"name": "lora"}}))
    with pytest.raises(ValueError, match=r"run\.json: field 'method' says 'lora'"):
        resolve(run)
    lora_run, _ = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "lora", {})
    info = json.loads((lora_run / "run.json").read_text())
    (lora_run / "run.json").write_text(json.dumps({**info, "base_model": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match=r"'base_model'.*--base"):
        resolve(lora_run)
    assert resolve(lora_run, base=bases["chatglm3"]).base_dir == bases["chatglm3"]
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path / "nothing")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_merge_and_export_commands(tmp_path: Path, bases: dict[str, Path]) -> None:
    run, trained = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "lora", {"target_modules": "all"})
    assert _cli(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = load_pretrained(tmp_path / "merged", dtype="fp32", device="cpu")
    assert merged.generation == "chatglm3"  # the tokenizer files came along
    ids = random_ids(trained)
    torch.testing.assert_close(_logits(merged.model, ids), _logits(trained, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError):
        _cli(["merge", str(run), str(tmp_path / "merged")])
    assert _cli(["merge", str(run), str(tmp_path / "merged"), "--overwrite", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="glmtune merge"):
        _cli(["export", str(run), str(tmp_path / "export")])

    pt_run, pt_trained = _make_run(tmp_path, bases["chatglm3"], "chatglm3", "ptuning", {"pre_seq_len": 2})
    with pytest.raises(ValueError, match="glmtune export"):
        _cli(["merge", str(pt_run), str(tmp_path / "m2")])
    assert _cli(["export", str(pt_run), str(tmp_path / "export")]) == 0
    pre = load_for_inference(tmp_path / "export", dtype="fp32", device="cpu", base=bases["chatglm3"])
    torch.testing.assert_close(_logits(pre.model, ids), _logits(pt_trained, ids), rtol=0, atol=0)
    # --format peft: a PEFT PREFIX_TUNING folder that records the base, so it loads without --base.
    assert _cli(["export", str(pt_run), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    pre = load_for_inference(tmp_path / "peft", dtype="fp32", device="cpu")
    torch.testing.assert_close(_logits(pre.model, ids), _logits(pt_trained, ids), rtol=1e-6, atol=1e-6)


def test_complete_model_with_a_prefix_loads_it(tmp_path: Path, bases: dict[str, Path]) -> None:
    """ChatGLM3's official P-Tuning saves the whole model: config.json with pre_seq_len, every weight plus
    transformer.prefix_encoder.* in the shards. That folder is a model and carries its prefix."""
    from glmtune.models.checkpoint import save_pretrained

    trained = load_pretrained(bases["chatglm3"], dtype="fp32", device="cpu")
    build_method("ptuning", {"pre_seq_len": 2, "prefix_projection": False}).setup(trained.model)
    with torch.no_grad():
        trained.model.transformer.prefix_encoder.embedding.weight.normal_(0, 0.5)
    tokenizer_files = [p for p in bases["chatglm3"].iterdir() if p.name.startswith("tokeniz")]
    save_pretrained(trained.model, trained.model.config, tmp_path / "full", tokenizer_files=tokenizer_files)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["pre_seq_len"] == 2
    assert resolve(tmp_path / "full").kind == "model"
    pre = load_for_inference(tmp_path / "full", dtype="fp32", device="cpu")
    ids = random_ids(trained.model)
    torch.testing.assert_close(_logits(pre.model, ids), _logits(trained.model.eval(), ids), rtol=0, atol=0)
    assert (_logits(pre.model, ids) - _logits(load_pretrained(bases["chatglm3"], dtype="fp32", device="cpu").model,
                                              ids)).abs().max() > 1e-3  # fmt: skip


def test_adapters_never_import_runs() -> None:
    """runs.py loads adapters; nothing in the adapters package may import runs back (no import cycle)."""
    import glmtune.adapters

    pkg = Path(glmtune.adapters.__file__).parent
    for path in pkg.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "glmtune.runs" not in text and "from glmtune import runs" not in text, path
