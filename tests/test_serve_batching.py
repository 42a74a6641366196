"""glmtune serve's continuous batching, limits and adapters, through the official openai client on a live server:
16 concurrent greedy requests answer exactly as each alone; seeded sampling repeats in any company; a full queue
gets 429, a wait too long and a shutdown 503; two LoRA adapters picked by ``model`` answer as ``glmtune chat`` on
each adapter, in one batch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import torch  # noqa: E402

from adapter_support import make_adapter  # noqa: E402
from glmtune.chat import ChatSession  # noqa: E402
from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.generate import GenerationConfig, generate  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import create_app, serving  # noqa: E402
from glmtune.serve.engine import Limits  # noqa: E402
from glmtune.serve.schemas import APIError, parse_chat_request  # noqa: E402
from glmtune.templates import Message  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402

QUESTIONS = ["你好", "写一句广告", "hello world", "今天天气很好", "python code def", "北京上海", "人工智能模型",
             "we're 42", "学习生成对话", "the model token", "请问一下", "中文英文测试", "I'm people", "stop isotope",
             "大学", "数据"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("batching") / "chatglm3", corpus_lines(seed=0),
                               generation="chatglm3", vocab_size=600)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(folder):
    return load_pretrained(folder, dtype="float32", device="cpu")


def alone(p, messages: list[Message], max_new_tokens: int) -> str:
    """The reply generate() gives this prompt by itself, greedy."""
    prompt = p.template.encode_prompt(p.tokenizer, messages)
    [ids] = generate(p.model, [prompt], GenerationConfig(max_new_tokens=max_new_tokens),
                     stop_ids=p.template.stop_ids(p.tokenizer), pad_id=p.tokenizer.pad_id)  # fmt: skip
    return p.template.postprocess(p.tokenizer.decode(ids))


def ask_all(client, asks: list[dict]) -> list:
    """Send every request at once (one thread each); the replies' texts in order."""
    got: list = [None] * len(asks)

    def ask(i: int) -> None:
        r = client.chat.completions.create(**asks[i])
        if asks[i].get("stream"):
            got[i] = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def test_sixteen_concurrent_greedy_requests_answer_as_each_alone(pretrained):
    """16 rows, prompts fed 24 tokens per round (long ones in chunks, between decode steps), replies of different
    lengths: requests join and leave the batch at different steps."""
    app = create_app(pretrained, model_name="tiny", limits=Limits(max_concurrent=16, prefill_tokens=24))
    engine = app.state.engine
    asks = []
    for i, q in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": q * (1 + i % 3)}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "你是一个助手"})
        asks.append({"model": "tiny", "messages": messages, "max_tokens": 4 + i, "temperature": 0,
                     "stream": i % 2 == 1})  # fmt: skip
    want = [alone(pretrained, [Message(m["role"], m["content"]) for m in a["messages"]], a["max_tokens"]) for a in asks]
    assert len(set(want)) > 8  # the replies differ: a mix-up between rows would show
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        got = ask_all(client, asks)
    assert got == want
    assert engine.peak_running > 1  # they did share the batch
    assert engine.running == 0 and engine.waiting == 0


def test_seeded_sampling_gives_the_same_text_in_any_company(pretrained):
    app = create_app(pretrained, model_name="tiny", limits=Limits(max_concurrent=4))
    sampled = {"model": "tiny", "messages": [{"role": "user", "content": "写一句广告"}], "max_tokens": 12,
               "temperature": 1.3, "top_p": 0.9, "seed": 5}  # fmt: skip
    others = [{"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 9, "temperature": t}
              for q, t in zip(QUESTIONS[:5], (0, 0.7, 1.0, 0, 2.0), strict=True)]  # fmt: skip
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        [by_itself] = ask_all(client, [sampled])
        together = ask_all(client, [*others, sampled, {**sampled, "stream": True}])
        other_seed = ask_all(client, [{**sampled, "seed": 6}])
    assert together[-2:] == [by_itself, by_itself]
    assert other_seed != [by_itself]


def slow_steps(monkeypatch, engine, delay: float) -> None:
    """Make each decode round of ``engine`` take ``delay`` seconds longer (its batch exists once it served)."""
    original = engine._round

    def slow(*args):
        time.sleep(delay)
        return original(*args)

    monkeypatch.setattr(engine, "_round", slow)


def test_a_full_queue_gets_429_a_long_wait_503_and_every_error_is_openai_shaped(pretrained, monkeypatch):
    import httpx

    app = create_app(pretrained, model_name="tiny", limits=Limits(max_concurrent=1, max_queue=1, queue_timeout=0.5))
    engine = app.state.engine
    slow_steps(monkeypatch, engine, 0.05)
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 40, "temperature": 0, "stream": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as running:  # takes the one row
            assert running.status_code == 200
            deadline = time.monotonic() + 10
            while engine.running < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with c.stream("POST", "/v1/chat/completions", json=body) as queued:  # the one queue place
                while engine.waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                full = c.post("/v1/chat/completions", json=body)
                assert full.status_code == 429, full.text
                assert full.json()["error"]["code"] == "queue_full"
                assert set(full.json()["error"]) == {"message", "type", "param", "code"}
                lines = [line for line in queued.iter_lines() if line]  # it waited too long: 503 in the stream
            assert any('"overloaded"' in line for line in lines), lines
            assert lines[-1] == "data: [DONE]"
            running.read()
        assert c.get("/health").json() == {"status": "ok"}
        ok = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_after_close_requests_get_503(pretrained):
    from glmtune.serve.engine import Engine

    engine = Engine(pretrained, limits=Limits(max_concurrent=1))
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3, "temperature": 0}
    job = engine.job(parse_chat_request(body))

    async def ask() -> list:
        return [item async for item in engine.run(job)]

    items = asyncio.run(ask())
    assert items[-1].completion_tokens >= 1
    engine.close()
    with pytest.raises(APIError) as e:
        asyncio.run(ask())
    assert e.value.status == 503 and e.value.code == "shutting_down"


def test_limits_are_checked_and_enforced(pretrained):
    with pytest.raises(ValueError, match="max-total-tokens"):
        Limits(max_total_tokens=10_000).resolve(256, torch.device("cpu"))
    with pytest.raises(ValueError, match="max-prompt-tokens"):
        Limits(max_total_tokens=100, max_prompt_tokens=100).resolve(256, torch.device("cpu"))
    default = Limits().resolve(256, torch.device("cpu"))
    assert (default.max_concurrent, default.max_total_tokens, default.max_prompt_tokens) == (8, 256, 255)
    gpu = torch.device("cuda")
    assert Limits().resolve(32768, gpu, token_bytes=28 * 1024, free_bytes=80 * 2**30).max_concurrent == 64
    small = Limits().resolve(32768, gpu, token_bytes=28 * 1024, free_bytes=8 * 2**30)  # 4 GiB for 8192-token rows
    assert (small.max_concurrent, small.max_total_tokens) == (18, 8192)
    assert Limits(max_concurrent=40).resolve(32768, gpu, token_bytes=28 * 1024, free_bytes=1).max_concurrent == 40
    from glmtune.serve.engine import Engine

    engine = Engine(pretrained, limits=Limits(max_total_tokens=64, max_prompt_tokens=20))
    with pytest.raises(APIError) as e:
        engine.job(parse_chat_request({"messages": [{"role": "user", "content": "你好 " * 30}]}))
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
    short = parse_chat_request({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 60})
    with pytest.raises(APIError) as e:
        engine.job(short)
    assert (e.value.status, e.value.param) == (400, "max_tokens")
    short.max_tokens = None  # up to the total limit
    job = engine.job(short)
    assert len(job.prompt) + job.gen.max_new_tokens == 64


# ---- adapters ---------------------------------------------------------------------------------------------------
def chat_reply(path, base, query: str, n: int) -> str:
    """What ``glmtune chat PATH --greedy`` answers (the adapter merged into the weights, as chat loads it)."""
    from glmtune.runs import load_for_inference

    p = load_for_inference(path, base=base, dtype="float32", device="cpu")
    return ChatSession(p, GenerationConfig(max_new_tokens=n)).reply(query)


def test_two_adapters_picked_by_model_answer_as_chat_on_each(folder, tmp_path, monkeypatch):
    a, b = tmp_path / "ad-a", tmp_path / "ad-b"
    make_adapter(folder, a, seed=1, rank=4, targets="query_key_value,dense_4h_to_h")
    make_adapter(folder, b, seed=2, rank=8, targets="all")
    queries = QUESTIONS[:4]
    want = {(m, q): chat_reply(path, folder, q, 8) for m, path in (("tiny", folder), ("a", a), ("b", b))
            for q in queries}  # fmt: skip
    assert all(len({want[m, q] for m in ("tiny", "a", "b")}) == 3 for q in queries)  # each adapter changes the reply
    seen: dict = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app))
    from glmtune.cli import main

    assert main(["serve", str(folder), "--model-name", "tiny", "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--device", "cpu", "--dtype", "fp32", "--max-concurrent", "12"]) == 0  # fmt: skip
    app = seen["app"]
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny", "a", "b"]
        keys = [(m, q) for m in ("tiny", "a", "b") for q in queries]
        asks = [{"model": m, "messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0,
                 "stream": i % 2 == 0} for i, (m, q) in enumerate(keys)]  # fmt: skip
        got = ask_all(client, asks)  # all three models in one batch
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "model_not_found"
    assert dict(zip(keys, got, strict=True)) == want
    assert app.state.engine.peak_running > 1


def test_a_ptuning_checkpoint_is_not_an_adapter(folder, tmp_path, capsys):
    from glmtune.cli import main

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 8)}, str(prefix / "model.safetensors"))
    assert main(["serve", str(folder), "--adapter", f"p={prefix}", "--device", "cpu", "--base", str(folder)]) == 2
    assert "P-Tuning checkpoint cannot share a batch" in capsys.readouterr().err
    assert main(["serve", str(folder), "--adapter", "nameless"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_a_client_that_leaves_a_non_streamed_request_frees_its_row(pretrained, monkeypatch):
    import httpx

    app = create_app(pretrained, model_name="tiny", limits=Limits(max_concurrent=2))
    engine = app.state.engine
    slow_steps(monkeypatch, engine, 0.05)  # 200 tokens: ~10 s; the client gives up after 0.5 s
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 200, "temperature": 0}
    with serving(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 5
        while engine.running or engine.cancelled == 0:
            assert time.monotonic() < deadline, "the generation went on after its client left"
            time.sleep(0.02)
    assert engine.cancelled == 1 and engine.completed == 0
