"""The OpenAI-compatible HTTP API over one loaded model and its adapters: ``POST /v1/chat/completions`` (streamed
as server-sent events or not), ``GET /v1/models``, ``GET /health``.

Requests are checked (``schemas``) and handed to the continuous-batching :class:`~glmtune.serve.engine.Engine`;
a request is queued before the response starts, so a full queue is a real 429 and shutting down a real 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmtune.pretrained import Pretrained
from glmtune.serve.engine import Engine, Job, Limits, Outcome, Ticket
from glmtune.serve.schemas import APIError, parse_chat_request, parse_json

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024

__all__ = ["Engine", "Job", "Limits", "Outcome", "create_app", "serving"]


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(
    pretrained: Pretrained,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    decode: str = "auto",
    adapters: Mapping[str, str | Path] | None = None,
    limits: Limits | None = None,
    stream_every: int | None = None,
) -> FastAPI:
    """The FastAPI app serving ``pretrained`` as the model ``model_name`` and each of ``adapters`` (name -> LoRA
    folder) under its name. The engine is ``app.state.engine``; it stops when the app shuts down."""
    engine = Engine(pretrained, decode=decode, model_name=model_name, adapters=adapters, limits=limits,
                    stream_every=stream_every)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # the KV cache is allocated now: a server that cannot hold it does not start
        yield
        engine.close()

    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"the request body is larger than {max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                               code="request_too_large")  # fmt: skip
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        cards = [{"id": name, "object": "model", "created": created, "owned_by": "glmtune"} for name in engine.names]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_chat_request(parse_json(await read_body(request)))
        job = engine.job(req)
        name = req.model or model_name
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": now, "model": name, "system_fingerprint": None}
        ticket = engine.submit(job)  # 429 / 503 before the response starts
        run = engine.run(ticket)

        def usage(outcome: Outcome) -> dict:
            n, m = len(job.prompt), outcome.completion_tokens
            return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

        if not req.stream:
            pieces, outcome = [], Outcome()
            watch = asyncio.create_task(_cancel_when_gone(request, ticket))
            try:
                async for item in run:
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        pieces.append(item)
            finally:
                watch.cancel()
                await run.aclose()
            choice = {"index": 0, "message": _message(job, pieces, outcome), "finish_reason": outcome.finish_reason,
                      "logprobs": None}  # fmt: skip
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(outcome)}

        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for item in run:
                    if not isinstance(item, Outcome):
                        yield chunk({"content": item})
                        continue
                    if item.tool_calls is not None or item.content:
                        # a reply held back as a possible tool call is sent whole, as one delta
                        message = _message(job, [], item)
                        delta = {"content": message["content"]} if message["content"] else {}
                        if "tool_calls" in message:
                            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                        if delta:
                            yield chunk(delta)
                    yield chunk({}, item.finish_reason)
                    if req.include_usage:
                        body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(item)}
                        yield f"data: {json.dumps(body)}\n\n"
            except APIError as e:  # the status line is sent: the error goes into the stream
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception as e:
                log.exception("streamed generation failed")
                err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                await run.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _cancel_when_gone(request: Request, ticket: Ticket, every: float = 0.1) -> None:
    """Cancel ``ticket`` (its row is freed at once) when the client of a non-streamed request disconnects."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    ticket.cancel()


def _message(job: Job, pieces: list[str], outcome: Outcome) -> dict:
    """The assistant message of a finished generation (with tools: its content and tool_calls)."""
    if job.tools is None or (outcome.content is None and outcome.tool_calls is None):  # streamed as text
        return {"role": "assistant", "content": "".join(pieces)}
    message: dict = {"role": "assistant", "content": outcome.content}
    if outcome.tool_calls:
        message["tool_calls"] = outcome.tool_calls
    return message


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread of this process until the block ends (tests, benchmarks); yields its
    base URL. ``port`` 0: a free one."""
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="glmtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
