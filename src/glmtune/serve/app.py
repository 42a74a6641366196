"""The OpenAI-compatible HTTP API over one loaded model: ``POST /v1/chat/completions`` (streamed as server-sent
events or not), ``GET /v1/models``, ``GET /health``.

One request generates at a time: an asyncio lock around one worker thread that owns the model and its
:class:`~glmtune.generate.Decoder`. Continuous batching and several adapters are later work (issue 13).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmtune.chat import ReplyText
from glmtune.generate import Decoder, GenerationConfig
from glmtune.pretrained import Pretrained
from glmtune.serve.schemas import APIError, ChatRequest, StopText, parse_chat_request, parse_json
from glmtune.templates import Message

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
_END = object()


@dataclass
class Job:
    """One checked request turned into a generation."""

    prompt: list[int]
    gen: GenerationConfig
    stop: list[str]


@dataclass
class Outcome:
    completion_tokens: int = 0
    finish_reason: str = "length"


class Engine:
    """The model, its template and tokenizer, and one Decoder, used from one worker thread at a time."""

    def __init__(self, pretrained: Pretrained, *, decode: str = "auto") -> None:
        self.pretrained = pretrained
        self.decoder = Decoder(pretrained.model, decode=decode)
        self.context_length = int(pretrained.config.seq_length)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmtune-generate")
        self._lock: asyncio.Lock | None = None
        self.cancelled = 0  # generations stopped early because their client left

    def job(self, req: ChatRequest) -> Job:
        """The prompt and generation settings of a request, or APIError when they do not fit the model."""
        p = self.pretrained
        try:
            messages = [Message(role, content) for role, content in req.messages]
            prompt = p.template.encode_prompt(p.tokenizer, messages)
        except ValueError as e:  # the generation's own rules (v1/v2: alternating turns, no system role...)
            raise APIError(400, f"'messages' cannot be rendered for {p.generation}: {e}", param="messages",
                           code="invalid_value") from None  # fmt: skip
        room = self.context_length - len(prompt)
        if room <= 0:
            raise APIError(400, f"the prompt is {len(prompt)} tokens and the model's context is "
                           f"{self.context_length}", param="messages", code="context_length_exceeded")  # fmt: skip
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(400, f"'max_tokens' is {req.max_tokens}, but the prompt takes {len(prompt)} of the model's "
                           f"{self.context_length} tokens: at most {room} remain", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        gen = GenerationConfig(
            max_new_tokens=req.max_tokens if req.max_tokens is not None else room,
            do_sample=req.temperature > 0,
            temperature=req.temperature if req.temperature > 0 else 1.0,
            top_p=req.top_p,
            seed=req.seed,
        )
        return Job(prompt, gen, req.stop)

    def _generate(self, job: Job, put: Callable[[object], None], cancel: threading.Event) -> None:
        """Worker thread: put text pieces, then the Outcome (or the exception), then _END."""
        p = self.pretrained
        outcome = Outcome()
        try:
            text = ReplyText(p.tokenizer, p.template.postprocess)
            stops = StopText(job.stop)
            stream = self.decoder.stream([job.prompt], job.gen, stop_ids=p.template.stop_ids(p.tokenizer),
                                         pad_id=p.tokenizer.pad_id)  # fmt: skip
            try:
                for step in stream:
                    if cancel.is_set():
                        self.cancelled += 1
                        return
                    t = int(step[0])
                    if t < 0:
                        outcome.finish_reason = "stop"
                        break
                    outcome.completion_tokens += 1
                    piece = stops.push(text.push(t))
                    if piece:
                        put(piece)
                    if stops.hit:
                        outcome.finish_reason = "stop"
                        break
            finally:
                stream.close()
            if outcome.completion_tokens < job.gen.max_new_tokens:
                outcome.finish_reason = "stop"
            if not stops.hit:
                rest = stops.push(text.finish()) + stops.flush()
                if rest:
                    put(rest)
            put(outcome)
        except Exception as e:  # reported to the client; the server goes on
            log.exception("generation failed")
            put(e)
        finally:
            put(_END)

    async def run(self, job: Job) -> AsyncIterator[str | Outcome]:
        """Text pieces, then the Outcome. Closing the iterator early (a client gone) stops the generation."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        lock = self._lock
        await lock.acquire()
        try:
            future = loop.run_in_executor(self._executor, self._generate, job, put, cancel)
        except BaseException:
            lock.release()
            raise
        future.add_done_callback(lambda _: lock.release())  # the next request waits for the thread, not the client
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(
    pretrained: Pretrained,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    decode: str = "auto",
) -> FastAPI:
    """The FastAPI app serving ``pretrained`` as the model ``model_name``."""
    engine = Engine(pretrained, decode=decode)
    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
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
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "glmtune"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_chat_request(parse_json(await read_body(request)))
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        job = engine.job(req)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": now, "model": model_name}

        def usage(outcome: Outcome) -> dict:
            n, m = len(job.prompt), outcome.completion_tokens
            return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

        if not req.stream:
            pieces, outcome = [], Outcome()
            async for item in engine.run(job):
                if isinstance(item, Outcome):
                    outcome = item
                else:
                    pieces.append(item)
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(outcome)}

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            body = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            run = engine.run(job)
            try:
                async for item in run:
                    if isinstance(item, Outcome):
                        yield chunk({}, item.finish_reason)
                        if req.include_usage:
                            body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(item)}
                            yield f"data: {json.dumps(body)}\n\n"
                    else:
                        yield chunk({"content": item})
            except Exception as e:  # the status line is sent: the error goes into the stream
                log.exception("streamed generation failed")
                err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                await run.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
