"""What commands leave on disk and show: file modes that follow the umask, an exported P-Tuning folder naming its
base, GLM-4 special tokens by name in `data inspect`, package metadata setuptools accepts without warnings."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from glmtune.adapters import build_method
from glmtune.cli import main
from glmtune.demo_data import corpus_lines
from glmtune.io import atomic_write_dir, atomic_write_text
from glmtune.pretrained import load_pretrained
from glmtune.tiny import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")

        def fill(folder: Path) -> None:
            (folder / "inside.txt").write_text("x")

        atomic_write_dir(tmp_path / "folder", fill)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask  # 0644 with the usual umask, not mkstemp's 0600
    assert _mode(tmp_path / "folder") == 0o777 & ~umask  # 0755, not mkdtemp's 0700
    assert _mode(tmp_path / "folder" / "inside.txt") == 0o666 & ~umask


def test_exported_ptuning_folder_names_its_base(tmp_path):
    base = make_tiny_model_dir(tmp_path / "base", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    model = load_pretrained(base, dtype="float32", device="cpu").model
    method = build_method("ptuning", {"pre_seq_len": 3, "prefix_projection": False})
    method.setup(model)
    prefix = tmp_path / "prefix"
    method.save(model, prefix, config=model.config, tokenizer_files=[base / "tokenizer.model"])
    assert main(["export", str(prefix), str(tmp_path / "out"), "--base", str(base)]) == 0
    info = json.loads((tmp_path / "out" / "glmtune.json").read_text(encoding="utf-8"))
    assert info["base_model"] == str(base.resolve()) and info["source"] == str(prefix.resolve())
    # the exported folder alone finds its base again: chat/eval load it without --base, a re-export keeps it
    from glmtune.runs import load_for_inference

    assert load_for_inference(tmp_path / "out", dtype="fp32", device="cpu").model.n_prefix() == 3
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "glmtune.json").read_text(encoding="utf-8"))["base_model"]
    assert again == str(base.resolve())
    # PEFT's format has its own field for it
    assert main(["export", str(prefix), str(tmp_path / "peft"), "--format", "peft", "--base", str(base)]) == 0
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text(encoding="utf-8"))
    assert peft["base_model_name_or_path"] == str(base.resolve())


def test_inspect_shows_glm4_special_tokens_by_name(glm4_tokenizer_dir, capsys):
    data = REPO / "examples" / "data" / "tools_glm4.jsonl"
    assert main(["data", "inspect", str(data), "--model", str(glm4_tokenizer_dir), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<id " not in out
    assert "[gMASK]<sop><|system|>" in out and "<|user|>" in out and "<|assistant|>" in out


def test_glm4_id_to_piece(glm4_tokenizer_dir):
    from glmtune.tokenizers import load_tokenizer

    tok = load_tokenizer(glm4_tokenizer_dir)
    assert tok.id_to_piece(tok.special_id("<|user|>")) == "<|user|>"
    assert "".join(tok.id_to_piece(i) for i in tok.encode("hello world")) == "hello world"
    for i in tok.encode("龘"):  # a character the tiny ranks split into bytes
        raw = tok.id_to_bytes(i)
        assert tok.id_to_piece(i) == raw.decode("utf-8", errors="backslashreplace")
    assert any("\\x" in tok.id_to_piece(i) for i in tok.encode("龘"))


def test_pyproject_license_is_an_spdx_string():
    """setuptools >= 77 warns at every install about a license table: the SPDX string form needs no warning."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"
    assert not any("License ::" in c for c in project["project"].get("classifiers", []))  # deprecated beside it
    (requirement,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert requirement == "setuptools>=77"
