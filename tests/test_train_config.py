"""Training config: YAML + overrides, types, nearest-name errors, paths, files, resume rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.train.config import ConfigError, TrainConfig, load_config, parse_override, resume_config


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config folder with a model folder and a data file beside it; the cwd is elsewhere."""
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "model").mkdir(parents=True)
    (cfg_dir / "model" / "config.json").write_text("{}")
    (cfg_dir / "train.json").write_text('{"content": "a", "summary": "b"}\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "other.json").write_text('{"content": "a", "summary": "b"}\n')
    monkeypatch.chdir(elsewhere)
    return cfg_dir


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BASE = """\
model: model
output_dir: runs/x
data:
  train: train.json
  max_source_length: 64
method:
  name: ptuning
  pre_seq_len: 128
train:
  learning_rate: 2e-2
  batch_size: 1
  grad_accum: 16
"""


def test_yaml_types_paths_and_overrides(layout: Path) -> None:
    cfg_file = _write(layout / "a.yaml", BASE)
    cfg = load_config(cfg_file, ["train.batch_size=4", "data.dev=other.json", "method.pre_seq_len=64",
                                 "eval.every_steps=50", "log.progress=false", "train.max_grad_norm=null"])  # fmt: skip
    assert isinstance(cfg, TrainConfig)
    assert cfg.train.learning_rate == pytest.approx(0.02) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 4 and cfg.train.grad_accum == 16
    assert cfg.train.max_grad_norm is None and cfg.log.progress is False
    assert cfg.method.name == "ptuning" and cfg.method.options["pre_seq_len"] == 64
    # file paths relative to the YAML file, command-line paths relative to the current folder
    assert cfg.model == str((layout / "model").resolve())
    assert cfg.data.train == [str((layout / "train.json").resolve())]
    assert cfg.data.dev == [str((Path.cwd() / "other.json").resolve())]
    assert cfg.output_dir == str((Path.cwd() / "runs" / "x").resolve())
    # the resolved config reads back to the same values
    again = load_config(_write(layout / "resolved.yaml", cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("text", "override", "expected", "where"),
    [
        (BASE + "modle: x\n", None, "unknown key 'modle'; did you mean 'model'", "file"),
        (BASE + "train: 3\n", None, "key 'train' must be a section", "file"),
        (BASE, "train.learnig_rate=1", "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'", "cli"),
        (BASE, "data.max_source_lenght=3", "did you mean 'data.max_source_length'", "cli"),
        (BASE, "train.batch_size=four", "key 'train.batch_size' should be an integer, got 'four'", "cli"),
        (BASE, "train.scheduler=cosin", "did you mean 'cosine'", "cli"),
        (BASE, "log.tensorboard=maybe", "key 'log.tensorboard' should be true or false", "cli"),
        (BASE, "train.grad_accum=0", "key 'train.grad_accum': must be at least 1", "cli"),
        (BASE, "data.train=missing.json", "key 'data.train': file not found", "cli"),
        (BASE, "model=nowhere", "key 'model': names no folder", "cli"),
        (BASE, "eval.patience=2", "needs a dev set", "cli"),
        (BASE, "train", "is not a key=value override", "cli"),
    ],
)
def test_errors_name_the_source_and_the_key(
    layout: Path, text: str, override: str | None, expected: str, where: str
) -> None:
    cfg_file = _write(layout / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override] if override else [])
    msg = str(e.value)
    assert expected in msg
    assert msg.startswith(str(cfg_file) if where == "file" else "command line"), msg


def test_error_from_the_file_names_the_file(layout: Path) -> None:
    cfg_file = _write(layout / "c.yaml", BASE.replace("batch_size: 1", "batch_size: 1.5"))
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train\.batch_size' should be an integer, got 1\.5"):
        load_config(cfg_file)
    bad_yaml = _write(layout / "d.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: line \d+: invalid YAML"):
        load_config(bad_yaml)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(layout / "nope.yaml")


def test_parse_override() -> None:
    assert parse_override("a.b=c=d") == ("a.b", "c=d")
    assert parse_override("x=") == ("x", "")
    for bad in ("noequals", "=v", "a..b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_text_values_stay_text_and_null_clears(layout: Path) -> None:
    cfg = load_config(_write(layout / "e.yaml", BASE), ["data.source_prefix=123", "data.max_source_length=null",
                                                         "data.columns={prompt: q, response: a}"])  # fmt: skip
    assert cfg.data.source_prefix == "123"
    assert cfg.data.max_source_length is None
    assert cfg.data.columns == {"prompt": "q", "response": "a"}


def test_resume_allows_length_changes_only(layout: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(_write(layout / "f.yaml", BASE))
    _write(run / "config.yaml", cfg.to_yaml())
    again = resume_config(run, ["train.max_steps=10", "save.every_steps=5"])
    assert again.train.max_steps == 10 and again.output_dir == str(run.resolve())
    with pytest.raises(ConfigError, match=r"cannot change method\.pre_seq_len: 128 -> 64"):
        resume_config(run, ["method.pre_seq_len=64"])
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        resume_config(run, ["train.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="no config.yaml"):
        resume_config(tmp_path / "nothing")
