"""End to end on tiny model folders of every generation: build, load, chat through the CLI, the demo."""

import json

import pytest

from glmtune.cli import main
from glmtune.demo_data import corpus_lines
from glmtune.pretrained import load_pretrained
from glmtune.tiny import make_tiny_model_dir

GENERATIONS = ["chatglm", "chatglm2", "chatglm3", "glm4"]


@pytest.fixture(scope="module", params=GENERATIONS)
def tiny_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / request.param
    return make_tiny_model_dir(out, corpus_lines(seed=0), generation=request.param, vocab_size=600)


def test_folder_layout_and_detection(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "chatglm"
    p = load_pretrained(tiny_dir, dtype="float32", device="cpu")
    assert p.generation == tiny_dir.name
    assert p.tokenizer.vocab_size <= p.config.padded_vocab_size
    tok_file = "ice_text.model" if p.generation == "chatglm" else "tokenizer.model"
    assert (tiny_dir / tok_file).is_file()


def test_cli_chat_one_prompt_is_repeatable(tiny_dir, capsys):
    args = ["chat", str(tiny_dir), "--prompt", "你好，写一句广告", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert main([*args, "--greedy", "--raw"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_chat_interactive_history_and_clear(tiny_dir, capsys, monkeypatch):
    lines = iter(["你好", "再来一句", "clear", "最后一句", "exit"])
    monkeypatch.setattr("builtins.input", lambda *_: next(lines))
    assert main(["chat", str(tiny_dir), "--greedy", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("\n") >= 3


def test_chat_stops_on_the_generation_stop_tokens(tiny_dir):
    """Greedy generation ends right before the first stop token of the template (v1: <eop>)."""
    from glmtune.chat import ChatSession
    from glmtune.generate import GenerationConfig, generate

    p = load_pretrained(tiny_dir, dtype="float32", device="cpu")
    prompt = p.template.encode_prompt(p.tokenizer, [_user("你好")])
    free = generate(p.model, [prompt], GenerationConfig(max_new_tokens=8), stop_ids=[], pad_id=p.tokenizer.pad_id)[0]
    stops = p.template.stop_ids(p.tokenizer)
    assert stops
    if p.generation == "chatglm":
        assert stops == [p.tokenizer.eos_id]  # <eop>
    # declare the second free-running token a stop token: the reply must end right before its first occurrence
    forced = generate(p.model, [prompt], GenerationConfig(max_new_tokens=8), stop_ids=[free[1]], pad_id=0)[0]
    assert forced == free[: free.index(free[1])]
    session = ChatSession(p, GenerationConfig(max_new_tokens=8, do_sample=False))
    reply = "".join(session.reply_stream("你好"))
    assert isinstance(reply, str) and len(session.history) == 2


def _user(text):
    from glmtune.templates import Message

    return Message("user", text)


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
