"""Chat replies stream through StreamDecoder and the generation's clean-up without losing text; long chats forget
their oldest turns to fit the model's context."""

from __future__ import annotations

import random

import pytest
import torch

from glmtune.chat import ChatSession, ReplyText, run_terminal_chat
from glmtune.demo_data import corpus_lines
from glmtune.generate import GenerationConfig, generate
from glmtune.pretrained import load_pretrained
from glmtune.templates import Message, get_template
from glmtune.tiny import make_tiny_model_dir

# Text the ChatGLM-6B clean-up rewrites: ASCII punctuation beside CJK characters, the training-date placeholder.
V1_LINES = ["Python,是一种语言", "你好!我们是谁?", "[[训练时间]]的数据:你好;再见", "hello, world! ok?"] * 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-stream")
    lines = corpus_lines(seed=0) + V1_LINES
    return {g: make_tiny_model_dir(root / g, lines, generation=g, vocab_size=600)
            for g in ("chatglm", "chatglm2", "chatglm3", "glm4")}  # fmt: skip


@pytest.fixture(scope="module")
def v1(folders):
    return load_pretrained(folders["chatglm"], dtype="float32", device="cpu")


def _script(monkeypatch, ids: list[int], seen: list[GenerationConfig] | None = None) -> None:
    """generate_stream yields ``ids`` one by one (the model's choice is not what these tests are about)."""

    def fake(model, prompts, cfg, *, stop_ids, pad_id, **kw):
        if seen is not None:
            seen.append(cfg)
        for t in ids[: cfg.max_new_tokens]:
            yield torch.tensor([t])

    monkeypatch.setattr("glmtune.chat.generate_stream", fake)


def test_v1_clean_up_rewrite_does_not_cut_the_streamed_reply(v1, monkeypatch):
    """'Python,' is shown, then the clean-up makes it 'Python，' once '是' arrives: the rest must still come out."""
    ids = v1.tokenizer.encode("Python,是一种语言")
    assert v1.tokenizer.decode(ids) == "Python,是一种语言"
    _script(monkeypatch, ids)
    session = ChatSession(v1, GenerationConfig(max_new_tokens=50))
    pieces = list(session.reply_stream("你好"))
    assert "".join(pieces) == "Python，是一种语言" == session.history[-1].content
    assert sum(1 for p in pieces if p) >= 4  # streamed as it grew, not all at the end


@pytest.mark.parametrize("template_name", ["chatglm", "chatglm3"])
def test_reply_text_pieces_join_to_the_cleaned_decode(v1, template_name):
    """Random replies made of the pieces the clean-ups rewrite: streamed pieces always join to the full clean-up."""
    tok = v1.tokenizer
    clean = get_template(template_name).postprocess
    vocab = sorted({t for line in V1_LINES + ["\n", " 中文", "  ", "\n\n你"] for t in tok.encode(line)})
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 14))]
        text = ReplyText(tok, clean)
        pieces = [text.push(t) for t in ids] + [text.finish()]
        assert "".join(pieces) == clean(tok.decode(ids)) == text.text, ids


def test_raw_replies_stream_the_plain_decode(v1):
    ids = v1.tokenizer.encode("[[训练时间]]的数据:你好;再见")
    text = ReplyText(v1.tokenizer, None)
    pieces = [text.push(t) for t in ids] + [text.finish()]
    assert "".join(pieces) == v1.tokenizer.decode(ids) == "[[训练时间]]的数据:你好;再见"


@pytest.mark.parametrize("generation", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_streamed_reply_equals_the_generated_tokens(folders, generation):
    """Real sampling on every generation: what streams out is the clean-up of what generate() gives."""
    p = load_pretrained(folders[generation], dtype="float32", device="cpu")
    gen = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=1.0, seed=5)
    session = ChatSession(p, gen)
    streamed = "".join(session.reply_stream("你好"))
    prompt = p.template.encode_prompt(p.tokenizer, [Message("user", "你好")])
    ids = generate(p.model, [prompt], gen, stop_ids=p.template.stop_ids(p.tokenizer), pad_id=p.tokenizer.pad_id)[0]
    assert streamed == p.template.postprocess(p.tokenizer.decode(ids)) == session.history[-1].content


def _long_history(session: ChatSession, turns: int) -> None:
    text = "你好我们今天天气很好" * 3
    for i in range(turns):
        session.history += [Message("user", f"{i} {text}"), Message("assistant", text)]


def test_long_chat_forgets_the_oldest_turns(v1, monkeypatch):
    seen: list[GenerationConfig] = []
    _script(monkeypatch, v1.tokenizer.encode("你好"), seen)
    session = ChatSession(v1, GenerationConfig(max_new_tokens=16))
    limit = v1.config.seq_length
    _long_history(session, 12)
    history = list(session.history)

    def fits(k: int) -> bool:  # the prompt without the k oldest turns leaves room for 16 new tokens
        prompt = v1.template.encode_prompt(v1.tokenizer, history[2 * k :] + [Message("user", "再见")])
        return len(prompt) + 16 <= limit

    expected = next(k for k in range(13) if fits(k))
    assert 0 < expected < 12  # the test needs a history past the context that fits once shortened
    reply = session.reply("再见")
    assert session.dropped_turns == expected
    assert session.history == history[2 * expected :] + [Message("user", "再见"), Message("assistant", "你好")]
    assert reply == "你好" and seen[-1].max_new_tokens == 16


def test_reply_never_runs_past_the_context(v1, monkeypatch):
    seen: list[GenerationConfig] = []
    _script(monkeypatch, v1.tokenizer.encode("你好"), seen)
    limit = v1.config.seq_length
    session = ChatSession(v1, GenerationConfig(max_new_tokens=10 * limit))
    query = "你好我们" * 60
    prompt = v1.template.encode_prompt(v1.tokenizer, [Message("user", query)])
    assert limit // 2 < len(prompt) < limit
    session.reply(query)
    assert seen[-1].max_new_tokens == limit - len(prompt)


def test_terminal_notes_forgotten_turns_and_too_long_messages(v1, monkeypatch):
    _script(monkeypatch, v1.tokenizer.encode("你好"))
    session = ChatSession(v1, GenerationConfig(max_new_tokens=16))
    _long_history(session, 12)
    lines = iter(["你好我们" * 200, "再见", "exit"])
    out: list[str] = []
    run_terminal_chat(session, lambda prompt: next(lines), out.append)
    text = "".join(out)
    assert "the message is too long: its prompt is" in text and "nothing sent" in text
    assert f"no longer fits the model's context of {v1.config.seq_length} tokens" in text
    assert text.count("Assistant: ") == 1 and session.history[-1].content == "你好"
