"""Every shipped example config parses, and runs a few steps on a tiny model of its generation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glmtune.train.config import load_config
from train_support import REPO, run, tiny_model, train_losses

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
GENERATION = re.compile(r"(chatglm-6b|chatglm2|chatglm3|glm4)")


def _generation(path: Path) -> str:
    m = GENERATION.search(path.stem)
    assert m, f"{path.name}: example names carry the generation (chatglm-6b, chatglm2, chatglm3, glm4)"
    return {"chatglm-6b": "chatglm"}.get(m.group(1), m.group(1))


def test_there_are_examples_for_each_method_and_generation() -> None:
    methods = {load_config(p, check_files=False).method.name for p in EXAMPLES}
    assert {"lora", "ptuning", "freeze", "full"} <= methods
    assert {_generation(p) for p in EXAMPLES} >= {"chatglm", "chatglm2", "chatglm3"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, models: Path, tmp_path: Path) -> None:
    cfg = load_config(path, check_files=False)  # parses, types and values checked
    for f in cfg.data.train + cfg.data.dev:
        assert Path(f).is_file(), f"{path.name}: data file {f} is missing"
    overrides = [
        f"model={tiny_model(models, _generation(path))}",
        f"output_dir={tmp_path / 'run'}",
        "train.max_steps=3",
        "train.grad_accum=1",
        "data.max_dev_samples=4",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        "log.every_steps=1",
    ]
    cfg = load_config(path, overrides)
    result = run(cfg)
    assert result.steps == 3 and (tmp_path / "run" / "model").is_dir()
    assert len(train_losses(tmp_path / "run")) == 3


def test_command_line_train_check_and_resume(models: Path, tmp_path: Path, capsys) -> None:
    """`glmtune train CONFIG key=value`, `--check`, and `--resume RUN_DIR key=value` through the subcommand."""
    import argparse

    from glmtune.train import command

    parser = argparse.ArgumentParser(prog="glmtune")
    command.add_parser(parser.add_subparsers(dest="command"))
    example = REPO / "examples" / "lora-chatglm3-adgen.yaml"
    out = tmp_path / "cli-run"
    common = [f"model={tiny_model(models)}", f"output_dir={out}", "log.progress=false", "log.tensorboard=false",
              "log.plot=false", "log.every_steps=1", "data.max_dev_samples=2", "method.dropout=0.0"]  # fmt: skip

    args = parser.parse_args(["train", str(example), *common, "--check"])
    assert args.func(args) == 0
    assert "max_steps: 3000" in capsys.readouterr().out and not out.exists()

    args = parser.parse_args(["train", str(example), *common, "train.max_steps=2", "save.every_steps=1"])
    assert args.func(args) == 0
    assert [s for s, _ in train_losses(out)] == [1, 2]
    args = parser.parse_args(["train", "--resume", str(out), "train.max_steps=4"])
    assert args.func(args) == 0
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
    args = parser.parse_args(["train", "--resume", str(out), "method.rank=4"])
    with pytest.raises(ValueError, match="cannot change method.rank"):
        args.func(args)
