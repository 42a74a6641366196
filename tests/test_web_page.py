"""glmtune web without a browser: the page's turns go through the serve engine (same greedy reply as a request to
the API), stream as growing prefixes, leave the oldest turns out when the context is full, and the command binds
127.0.0.1 with analytics off."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from glmtune.cli import build_parser  # noqa: E402
from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import Engine, Outcome  # noqa: E402
from glmtune.serve.schemas import APIError, parse_chat_request  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402
from glmtune.web.page import PageChat, Sampling, content_text, conversation  # noqa: E402

GREEDY = Sampling(temperature=0.0, top_p=0.7, max_tokens=10)


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def engine(request, tmp_path_factory):
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("web") / request.param, corpus_lines(seed=0),
                                 generation=request.param, vocab_size=600)  # fmt: skip
    engine = Engine(load_pretrained(folder, dtype="float32", device="cpu"))
    yield engine
    engine.close()


def api_reply(engine: Engine, messages: list[dict], max_tokens: int | None) -> str:
    """What POST /v1/chat/completions answers (greedy): the engine's pieces joined."""

    async def collect() -> str:
        body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
        job = engine.job(parse_chat_request(body))
        return "".join([item async for item in engine.run(job) if not isinstance(item, Outcome)])

    return asyncio.run(collect())


def page_replies(engine: Engine, messages: list[dict], sampling: Sampling = GREEDY) -> list[tuple[str, int]]:
    async def collect() -> list[tuple[str, int]]:
        return [x async for x in PageChat(engine).reply(messages, sampling)]

    return asyncio.run(collect())


def test_gradio_history_becomes_openai_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}], "metadata": None},
        {"role": "assistant", "content": "hi", "options": None},
        {"role": "user", "content": [{"type": "file", "file": {"path": "x.png"}}]},
    ]
    assert conversation(history, "  ") == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
                                           {"role": "user", "content": ""}]  # fmt: skip
    assert conversation(history[:1], "be brief")[0] == {"role": "system", "content": "be brief"}
    assert content_text(None) == ""


def test_page_streams_the_api_reply(engine):
    messages = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你好，写一句广告"}]
    want = api_reply(engine, messages, GREEDY.max_tokens)
    steps = page_replies(engine, messages)
    texts = [t for t, _ in steps]
    assert texts[0] == "" and texts[-1] == want and want
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts[1:], texts[2:], strict=False))
    assert len(texts) > 2 and all(d == 0 for _, d in steps)


def test_a_long_conversation_leaves_its_oldest_turns_out(engine):
    old = "我们今天天气很好 hello world " * 3
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"{i} {old}"}, {"role": "assistant", "content": old}]
    messages = [{"role": "system", "content": "s"}, *turns, {"role": "user", "content": "你好"}]
    with pytest.raises(APIError):  # the whole conversation does not fit the tiny model's context
        engine.job(parse_chat_request({"messages": messages, "max_tokens": 10}))
    steps = page_replies(engine, messages)
    dropped = steps[-1][1]
    assert 0 < dropped < 8
    kept = [messages[0], *turns[2 * dropped :], messages[-1]]
    assert steps[-1][0] == api_reply(engine, kept, GREEDY.max_tokens)
    with pytest.raises(APIError):  # one turn left out less does not fit
        engine.job(parse_chat_request({"messages": [messages[0], *turns[2 * dropped - 2 :], messages[-1]],
                                       "max_tokens": 10}))  # fmt: skip


def test_a_reply_limit_beyond_the_context_takes_the_room_left(engine):
    messages = [{"role": "user", "content": "你好"}]
    big = Sampling(temperature=0.0, top_p=1.0, max_tokens=10**6)
    assert page_replies(engine, messages, big)[-1][0] == api_reply(engine, messages, None)


def test_a_message_beyond_the_context_is_refused(engine):
    with pytest.raises(APIError) as e:
        page_replies(engine, [{"role": "user", "content": "你好 " * 400}])
    assert e.value.code == "context_length_exceeded"


def test_web_command_binds_localhost_by_default():
    args = build_parser().parse_args(["web", "some/folder"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert args.func.__module__ == "glmtune.web.command"
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.95, 0.7, 1024)


@pytest.mark.parametrize("flags, message", [(["--temperature", "2.5"], "--temperature"), (["--top-p", "0"], "--top-p"),
                                            (["--max-new-tokens", "0"], "--max-new-tokens"),
                                            (["--max-concurrent", "0"], "--max-concurrent")])  # fmt: skip
def test_web_command_refuses_bad_starting_values_before_loading(flags, message):
    args = build_parser().parse_args(["web", "no/such/folder", *flags])
    with pytest.raises(ValueError, match=message):
        args.func(args)


@pytest.mark.slow  # importing Gradio takes seconds
def test_page_builds_without_analytics(engine, monkeypatch):
    gr = pytest.importorskip("gradio")
    from glmtune.web.page import build_page

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_page(engine, title="t", system_prompt=True, sampling=GREEDY, max_total_tokens=256)
    assert isinstance(page, gr.Blocks) and page.analytics_enabled is False


@pytest.mark.slow  # importing Gradio takes seconds
def test_web_with_adapters_picks_one_per_conversation(tmp_path, monkeypatch):
    """``glmtune web PATH --adapter a=...``: the engine serves the model and the adapter; the page's picker lists
    both, and a conversation with "a" gets the API's reply from "a" (not the model's)."""
    gr = pytest.importorskip("gradio")
    from adapter_support import make_adapter

    folder = make_tiny_model_dir(tmp_path / "base", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    make_adapter(folder, tmp_path / "ad", seed=1, rank=4, targets="all")
    seen: dict = {}
    close = Engine.close  # the command closes its engine when the page stops: keep it for the checks below
    monkeypatch.setattr("glmtune.web.page.launch_page", lambda page, **kw: seen.update(page=page))
    monkeypatch.setattr("glmtune.serve.engine.Engine.close", lambda self: seen.update(engine=self))
    args = build_parser().parse_args(["web", str(folder), "--adapter", f"a={tmp_path / 'ad'}", "--device", "cpu",
                                      "--dtype", "fp32", "--max-concurrent", "2"])  # fmt: skip
    assert args.func(args) == 0
    engine = seen["engine"]
    try:
        assert list(engine.names) == ["base", "a"]
        [picker] = [b for b in seen["page"].blocks.values() if isinstance(b, gr.Dropdown)]
        assert picker.visible and picker.value == "base" and [c[0] for c in picker.choices] == ["base", "a"]
        question = [{"role": "user", "content": "你好"}]

        async def collect(model: str | None) -> str:
            replies = [x async for x in PageChat(engine).reply(question, GREEDY, model)]
            return replies[-1][0]

        from_adapter, from_base = asyncio.run(collect("a")), asyncio.run(collect(None))

        async def api(model: str) -> str:
            body = {"model": model, "messages": question, "temperature": 0, "max_tokens": GREEDY.max_tokens}
            job = engine.job(parse_chat_request(body))
            return "".join([item async for item in engine.run(job) if not isinstance(item, Outcome)])

        assert from_adapter == asyncio.run(api("a")) and from_base == asyncio.run(api("base"))
        assert from_adapter != from_base  # the adapter answers, not the model
    finally:
        close(engine)
