"""`glmtune data inspect` through the command line."""

from pathlib import Path

import pytest

from glmtune.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_inspect_adgen(chatglm3_tokenizer_dir, capsys):
    args = ["data", "inspect", str(EXAMPLES / "adgen.json"), "--model", str(chatglm3_tokenizer_dir), "-n", "2"]
    assert main([*args, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "format 'columns'" in out and "template chatglm3" in out
    assert out.count("--- sample") == 2
    assert "[[" in out and "]]" in out  # trained tokens are marked
    assert "<|assistant|>" in out and "\ufffd" not in out  # specials by name, characters whole
    assert "prompt    max" in out and "max_source_length=256, max_target_length=512: 0 of 40" in out  # official
    assert main([*args, "--color", "always", "--max-source-length", "64", "--max-target-length", "16"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[42m" in out and "truncated at max_source_length=64, max_target_length=16: 40 of 40" in out


def test_inspect_column_mapping_and_errors(chatglm3_tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "你好", "a": "好"}\n{"q": "x"}\n')
    args = ["data", "inspect", str(data), "--model", str(chatglm3_tokenizer_dir), "--color", "never"]
    assert main([*args, "--prompt-column", "q", "--response-column", "a"]) == 0
    out = capsys.readouterr().out
    assert "1 samples" in out and "skipped" in out
    assert main(["data", "inspect", str(tmp_path / "missing.json"), "--model", str(chatglm3_tokenizer_dir)]) == 2
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".json", ".jsonl", ".csv")))
def test_inspect_every_example_file(name, chatglm3_tokenizer_dir, glm4_tokenizer_dir, capsys):
    model = glm4_tokenizer_dir if "glm4" in name else chatglm3_tokenizer_dir
    assert main(["data", "inspect", str(EXAMPLES / name), "--model", str(model), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "cannot encode" not in out and "skipped" not in out
    assert out.count("--- sample") == 3 and "[[" in out


def test_inspect_reads_a_gbk_file_with_encoding(chatglm3_tokenizer_dir, tmp_path, capsys):
    """A GBK file (Excel on Chinese Windows): the error says how to read it, --encoding reads it."""
    data = tmp_path / "gbk.json"
    data.write_bytes('{"content": "类型#裤*颜色#黑色", "summary": "这款黑色裤子"}\n'.encode("gbk"))
    assert main(["data", "inspect", str(data), "--model", str(chatglm3_tokenizer_dir), "--color", "never"]) != 0
    err = capsys.readouterr().err
    assert f"{data}:line 1" in err and "--encoding gb18030" in err
    assert main(["data", "inspect", str(data), "--model", str(chatglm3_tokenizer_dir), "--color", "never",
                 "--encoding", "gb18030"]) == 0  # fmt: skip
    assert "黑色" in capsys.readouterr().out
