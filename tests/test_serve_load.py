"""Load and abuse: 200 concurrent streaming clients and 1,000 malformed requests against a live glmtune serve on a
tiny model. Every well-formed request completes, nothing gets a 5xx, the server's memory stays bounded, and it still
answers /health afterwards."""

from __future__ import annotations

import asyncio
import gc
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import create_app, serving  # noqa: E402
from glmtune.serve.engine import Limits  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["你好", "写一句广告", "hello world", "今天天气很好", "python code", "北京上海", "人工智能", "we're 42"]
GOOD = [{"role": "user", "content": "你好"}]
HUGE = 64 * 1024  # the test server's body limit


def malformed(i: int) -> tuple[bytes, dict]:
    """The i-th malformed request: (body, headers)."""
    kinds = [
        b'{"messages": [',
        b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
        b"\xc3\x28 not utf-8 at all",
        b"[1, 2, 3]",
        b"null",
        json.dumps({"messages": "hi"}).encode(),
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
        json.dumps({"messages": [{"content": "no role"}]}).encode(),
        json.dumps({"messages": GOOD, "max_tokens": 0}).encode(),
        json.dumps({"messages": GOOD, "max_tokens": -3}).encode(),
        json.dumps({"messages": GOOD, "max_tokens": 10**9}).encode(),
        json.dumps({"messages": GOOD, "max_tokens": "ten"}).encode(),
        json.dumps({"messages": GOOD, "temperature": -1}).encode(),
        json.dumps({"messages": GOOD, "temperature": 2.01}).encode(),
        json.dumps({"messages": GOOD, "top_p": 0}).encode(),
        json.dumps({"messages": GOOD, "top_p": 1.5}).encode(),
        json.dumps({"messages": GOOD, "model": "no-such-model"}).encode(),
        json.dumps({"messages": GOOD, "stream": "yes"}).encode(),
        json.dumps({"messages": GOOD, "tools": "all of them"}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "x" * (HUGE + 10)}]}).encode(),
        b'{"messages": ' + b"[" * 100_000,
        json.dumps({"messages": [{"role": "user", "content": "你好 " * 300}]}).encode(),  # beyond the context
    ]
    return kinds[i % len(kinds)], {"Content-Type": "application/json"}


def rss_bytes() -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


async def stream_one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, str]:
    """(status, finish_reason, text) of one streamed request."""
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 4 + i % 5,
            "temperature": [0, 0.8, 1.2][i % 3], "seed": i, "stream": True}  # fmt: skip
    finish, text = None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, None, (await r.aread()).decode()
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        event = json.loads(line[6:])
        assert "error" not in event, event
        for choice in event["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return 200, finish, "".join(text)


async def abuse(url: str, n_streams: int, n_bad: int) -> tuple[list, list]:
    limits = httpx.Limits(max_connections=n_streams + 50, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        bad_sem = asyncio.Semaphore(50)

        async def bad(i: int) -> tuple[int, dict | None]:
            body, headers = malformed(i)
            async with bad_sem:
                r = await client.post("/v1/chat/completions", content=body, headers=headers)
            try:
                return r.status_code, r.json()
            except ValueError:
                return r.status_code, None

        order = [("s", i) for i in range(n_streams)] + [("b", i) for i in range(n_bad)]
        random.Random(0).shuffle(order)
        results = await asyncio.gather(*(stream_one(client, i) if k == "s" else bad(i) for k, i in order))
    streams = [r for (k, _), r in zip(order, results, strict=True) if k == "s"]
    bads = [r for (k, _), r in zip(order, results, strict=True) if k == "b"]
    return streams, bads


def test_two_hundred_streams_and_a_thousand_malformed_requests(tmp_path):
    folder = make_tiny_model_dir(tmp_path / "chatglm3", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    pretrained = load_pretrained(folder, dtype="float32", device="cpu")
    app = create_app(pretrained, model_name="tiny", max_body_bytes=HUGE,
                     limits=Limits(max_concurrent=16, max_queue=256, queue_timeout=120))  # fmt: skip
    engine = app.state.engine
    with serving(app) as url:
        asyncio.run(abuse(url, 20, 50))  # warm-up: the batch, the captured shapes, the connection pools
        gc.collect()
        before = rss_bytes()
        streams, bads = asyncio.run(abuse(url, 200, 1000))
        gc.collect()
        after = rss_bytes()
        health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert all(status == 200 for status, _, _ in streams), [s for s in streams if s[0] != 200][:3]
    assert all(finish in ("stop", "length") for _, finish, _ in streams)
    statuses = sorted({status for status, _ in bads})
    assert all(400 <= s < 500 for s in statuses), statuses
    assert all(body is not None and set(body["error"]) == {"message", "type", "param", "code"} for _, body in bads)
    assert {400, 404, 413} <= set(statuses)
    assert engine.running == 0 and engine.waiting == 0
    assert engine.peak_running == 16  # the batch was full
    if before is not None and after is not None:  # Linux: the resident memory grew by less than 100 MB
        assert after - before < 100 * 2**20, (before, after)
