"""glmtune serve on a tiny ChatGLM3 folder: greedy answers equal generate's, streams join to the same text, the
official openai client against a live server, and every malformed request gets a 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from glmtune.cli import build_parser  # noqa: E402
from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.generate import GenerationConfig, generate  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import create_app, serving  # noqa: E402
from glmtune.serve.schemas import StopText  # noqa: E402
from glmtune.templates import Message  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你好，写一句广告"}]


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def pretrained(request, tmp_path_factory):
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("serve") / request.param, corpus_lines(seed=0),
                                 generation=request.param, vocab_size=600)  # fmt: skip
    return load_pretrained(folder, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def client(pretrained):
    app = create_app(pretrained, model_name="tiny", api_key=KEY, max_body_bytes=64 * 1024)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def expected_text(pretrained, messages: list[dict], max_new_tokens: int) -> tuple[str, int, int]:
    """(reply text, prompt tokens, completion tokens) from generate() on the template's prompt, greedy."""
    p = pretrained
    prompt = p.template.encode_prompt(p.tokenizer, [Message(m["role"], m["content"]) for m in messages])
    [ids] = generate(p.model, [prompt], GenerationConfig(max_new_tokens=max_new_tokens),
                     stop_ids=p.template.stop_ids(p.tokenizer), pad_id=p.tokenizer.pad_id)  # fmt: skip
    return p.template.postprocess(p.tokenizer.decode(ids)), len(prompt), len(ids)


def sse_events(client, body: dict) -> list:
    with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_greedy_reply_equals_generate(client, pretrained):
    text, n_prompt, n_new = expected_text(pretrained, MESSAGES, 12)
    assert text
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("length" if n_new == 12 else "stop")
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def test_stream_joins_to_the_same_text(client, pretrained):
    text, n_prompt, n_new = expected_text(pretrained, MESSAGES, 12)
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(client, body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    joined = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert joined == text
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["usage"]["completion_tokens"] == n_new


def test_stop_string_cuts_the_reply(client, pretrained):
    text, _, _ = expected_text(pretrained, MESSAGES, 12)
    stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text) - 1) if not text[i : i + 2].isspace())
    want = text[: text.find(stop)]
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    r = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    events = sse_events(client, {**body, "stream": True})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_repeats(client):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/chat/completions", headers=AUTH, json=body).json()
    again = client.post("/v1/chat/completions", headers=AUTH, json=body).json()
    assert first["choices"][0]["message"] == again["choices"][0]["message"]


def test_stop_text_holds_back_a_possible_stop():
    s = StopText(["END"])
    assert s.push("abcE") == "abc"
    assert s.push("N") == ""
    assert s.push("x") == "ENx"
    assert s.push("yEND tail") == "y" and s.hit
    assert s.push("more") == "" and s.flush() == ""
    t = StopText([])
    assert t.push("E") == "E" and t.flush() == ""


def test_models_health_and_api_key(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/v1/models", headers=AUTH)
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (client.get("/v1/models", headers=headers),
                  client.post("/v1/chat/completions", headers=headers, json={"messages": MESSAGES})):  # fmt: skip
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"


LONG = "你好 " * 400  # far beyond the tiny model's 256-token context

MALFORMED = {
    "bad json": (b'{"messages": [', 400),
    "invalid utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    "not an object": ([1, 2], 400),
    "messages missing": ({"model": "tiny"}, 400),
    "messages not a list": ({"messages": "hi"}, 400),
    "empty messages": ({"messages": []}, 400),
    "message not an object": ({"messages": ["hi"]}, 400),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "tool message without a call": ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, 400),
    "content a number": ({"messages": [{"role": "user", "content": 3}]}, 400),
    "last not user": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400),
    "model not a string": ({"messages": MESSAGES, "model": 5}, 400),
    "unknown model": ({"messages": MESSAGES, "model": "gpt-4"}, 404),
    "temperature negative": ({"messages": MESSAGES, "temperature": -0.1}, 400),
    "temperature above 2": ({"messages": MESSAGES, "temperature": 2.5}, 400),
    "temperature a string": ({"messages": MESSAGES, "temperature": "hot"}, 400),
    "top_p zero": ({"messages": MESSAGES, "top_p": 0}, 400),
    "top_p above 1": ({"messages": MESSAGES, "top_p": 1.01}, 400),
    "max_tokens zero": ({"messages": MESSAGES, "max_tokens": 0}, 400),
    "max_tokens negative": ({"messages": MESSAGES, "max_tokens": -5}, 400),
    "max_tokens a string": ({"messages": MESSAGES, "max_tokens": "10"}, 400),
    "max_tokens beyond context": ({"messages": MESSAGES, "max_tokens": 100000}, 400),
    "prompt beyond context": ({"messages": [{"role": "user", "content": LONG}]}, 400),
    "stop not strings": ({"messages": MESSAGES, "stop": [1]}, 400),
    "stream not a boolean": ({"messages": MESSAGES, "stream": "yes"}, 400),
    "seed a float": ({"messages": MESSAGES, "seed": 1.5}, 400),
    "n above 1": ({"messages": MESSAGES, "n": 2}, 400),
    "huge body": ({"messages": [{"role": "user", "content": "x" * 100_000}]}, 413),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_gets_an_openai_error(client, case):
    body, status = MALFORMED[case]
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert client.get("/health").status_code == 200


def test_unknown_route_and_method_get_openai_errors(client):
    for r in (client.get("/v1/nothing"), client.get("/v1/chat/completions")):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_serve_command_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "some/folder"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.func.__module__ == "glmtune.serve.command"


@pytest.fixture(scope="module")
def live_server(pretrained):
    pytest.importorskip("uvicorn")
    app = create_app(pretrained, model_name="tiny", api_key=KEY)
    with serving(app) as url:
        app.state.port = int(url.rsplit(":", 1)[1])
        yield app


def test_openai_client_against_a_live_server(live_server, pretrained):
    openai = pytest.importorskip("openai")
    live_server = f"http://127.0.0.1:{live_server.state.port}/v1"
    text, n_prompt, n_new = expected_text(pretrained, MESSAGES, 10)
    client = openai.OpenAI(base_url=live_server, api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == n_prompt and reply.usage.completion_tokens == n_new
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_server, api_key="wrong", max_retries=0).models.list()


def test_concurrent_requests_answer_as_each_alone(live_server, pretrained):
    """Requests wait for one another (one generation at a time) and each gets its own reply."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{live_server.state.port}/v1", api_key=KEY, max_retries=0)
    asks = [[{"role": "user", "content": q}] for q in ("你好", "写一句广告", "hello world")] * 2
    want = [expected_text(pretrained, m, 6 + i)[0] for i, m in enumerate(asks)]
    got: list = [None] * len(asks)

    def ask(i: int) -> None:
        stream = i % 2 == 1
        r = client.chat.completions.create(model="tiny", messages=asks[i], max_tokens=6 + i, temperature=0,
                                           stream=stream)  # fmt: skip
        got[i] = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == want


def test_a_client_that_leaves_frees_the_server(live_server, monkeypatch):
    import httpx

    engine = live_server.state.engine
    batch = engine._batch
    step = batch.step

    def slow_step(*args, **kw):  # ~2 s for the whole context: the client leaves long before
        time.sleep(0.01)
        return step(*args, **kw)

    monkeypatch.setattr(batch, "step", slow_step)
    cancelled = engine.cancelled
    url = f"http://127.0.0.1:{live_server.state.port}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # up to the first text: the generation runs; then the client hangs up
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    deadline = time.monotonic() + 10
    while engine.running:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.01)
    assert engine.cancelled == cancelled + 1
    r = httpx.post(url, json={**body, "stream": False, "max_tokens": 3}, headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_serve_command_loads_the_model_and_binds_localhost(pretrained, monkeypatch):
    from glmtune.cli import main

    seen: dict = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", str(pretrained.path), "--device", "cpu", "--dtype", "fp32", "--api-key", "k"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8000)
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        models = c.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
    assert [m["id"] for m in models["data"]] == [pretrained.path.name]
