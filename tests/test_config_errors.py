"""Config mistakes of a user's first hour (issue 11): a method switched on the command line, a typo'd section on
the command line, eval.metric checked at --check time, data.encoding checked as a codec name."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from glmtune.train.config import ConfigError, load_config

LORA_YAML = """\
model: model
data:
  train: train.json
  dev: train.json
method:
  name: lora
  rank: 16
  alpha: 32
  target_modules: [query_key_value]
"""


@pytest.fixture
def cfg_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.json").write_text('{"content": "a", "summary": "b"}\n')
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lora.yaml"
    path.write_text(LORA_YAML, encoding="utf-8")
    return path


def test_method_switched_on_the_command_line_drops_the_other_methods_options(cfg_file, caplog):
    with caplog.at_level(logging.WARNING, logger="glmtune.train.config"):
        cfg = load_config(cfg_file, ["method.name=ptuning", "method.pre_seq_len=64"])
    assert cfg.method.name == "ptuning" and cfg.method.options == {"pre_seq_len": 64}
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 3 and all(n.startswith(str(cfg_file)) for n in notes)
    assert any("'method.rank' is an option of method 'lora', not of 'ptuning': dropped" in n for n in notes)
    assert "rank" not in cfg.to_yaml()  # the saved config holds only what the run uses
    # an option of no method is still an error, with the nearest name
    with pytest.raises(ConfigError, match="unknown option of method 'ptuning' 'method.pre_seq_lne'"):
        load_config(cfg_file, ["method.name=ptuning", "method.pre_seq_lne=64"])


@pytest.mark.parametrize("override", ["trian.learning_rate=1", "trian.x.y=1"])
def test_typo_on_the_command_line_is_blamed_on_the_command_line(cfg_file, override):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    msg = str(err.value)
    assert msg.startswith(f"command line ({override!r})") and "did you mean 'train'" in msg, msg


def test_typo_in_the_file_is_still_blamed_on_the_file(cfg_file):
    cfg_file.write_text(LORA_YAML + "trian:\n  learning_rate: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, ["trian.batch_size=2"])
    assert str(err.value).startswith(str(cfg_file))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.metric=rougeL", "eval.generate_every_steps=10"], "unknown metric 'rougeL'; did you mean 'rouge-l'?"),
        (["eval.metric=ROUGE-1", "eval.generate_every_steps=10"], "did you mean 'rouge-1'?"),
        (["eval.metric=bleu", "eval.generate_every_steps=10"], "did you mean 'bleu-4'?"),
        (["eval.metric=eval_loss"], "unknown metric 'eval_loss'; did you mean 'loss'?"),
        (["eval.metric=accuracy"], "unknown metric 'accuracy'"),
        (["eval.metric=rouge-l"], "a generation metric: set eval.generate_every_steps too"),
    ],
)
def test_eval_metric_is_checked_at_check_time(cfg_file, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, overrides)
    msg = str(err.value)
    assert expected in msg and "key 'eval.metric'" in msg and msg.startswith("command line"), msg


def test_valid_metrics_pass(cfg_file, caplog):
    for metric in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert load_config(cfg_file, [f"eval.metric={metric}", "eval.generate_every_steps=5"]).eval.metric == metric
    assert load_config(cfg_file).eval.metric == "loss"
    assert not caplog.records
    with caplog.at_level(logging.WARNING):  # a custom eval hook's metric (Python API): allowed, with a warning
        load_config(cfg_file, ["eval.metric=score", "eval.generate_every_steps=5"])
    assert "only a custom eval hook can measure it" in caplog.text


def test_data_encoding_is_a_known_text_codec(cfg_file):
    for name in ("gbk", "gb18030", "utf-16", "UTF-8", "cp936"):
        assert load_config(cfg_file, [f"data.encoding={name}"]).data.encoding == name
    for bad in ("utf-9", "base64"):
        with pytest.raises(ConfigError, match=f"key 'data.encoding': '{bad}' is not a text encoding"):
            load_config(cfg_file, [f"data.encoding={bad}"])


def test_fsdp_keep_gathered_counts_blocks(cfg_file):
    assert load_config(cfg_file).train.fsdp_keep_gathered == 1
    assert load_config(cfg_file, ["train.fsdp_keep_gathered=12"]).train.fsdp_keep_gathered == 12
    with pytest.raises(ConfigError, match="key 'train.fsdp_keep_gathered': must be 0 or more"):
        load_config(cfg_file, ["train.fsdp_keep_gathered=-1"])
