"""The serving engine: continuous batching of chat requests over one model (and its LoRA adapters).

One worker thread owns the model and one :class:`~glmtune.generate.DecodeBatch` of ``max_concurrent`` rows.
Requests wait in a bounded queue; at every round the worker

1. drops requests whose client left (their row is free at once) and fails those that waited too long (503);
2. prefills waiting requests into free rows, at most ``prefill_tokens`` prompt tokens per round (a long prompt is
   fed in chunks over several rounds, so running streams wait one chunk at a time, never a whole long prompt);
3. runs ``stream_every`` decode steps for every row (one captured step; rows attend only to their own slots) and
   reads the new tokens back once;
4. turns each row's tokens into text (stop strings, the generation's clean-up, tool calls) and hands the pieces
   to the requests' event loops.

Each row keeps its own sampling settings and adapter, so greedy and sampled requests of every adapter share a step.
The asyncio side (:meth:`Engine.run`) only queues work and waits for pieces.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmtune.chat import ReplyText
from glmtune.generate import Admission, DecodeBatch, Decoder, GenerationConfig, RowSampling
from glmtune.pretrained import Pretrained
from glmtune.serve.schemas import APIError, ChatRequest, StopText
from glmtune.templates import Message

log = logging.getLogger(__name__)

_END = object()


@dataclass
class Limits:
    """What one server takes on. None: a default that depends on the model and device (see :meth:`resolve`)."""

    max_concurrent: int | None = None  # rows of the decode batch: 64 on CUDA, 8 on the CPU
    max_queue: int = 256  # requests waiting for a row; one more gets 429
    max_prompt_tokens: int | None = None  # default: the total below, less one
    max_total_tokens: int | None = None  # prompt + reply per request; default: the context, at most 8192
    queue_timeout: float = 300.0  # seconds a request may wait for a row before it gets 503
    prefill_tokens: int | None = None  # prompt tokens prefilled per round: 2048 on CUDA, 256 on the CPU

    def resolve(self, context: int, device: torch.device, *, token_bytes: int = 0,
                free_bytes: int | None = None) -> Limits:  # fmt: skip
        """These limits with every default filled in and checked against the model's ``context``.

        On CUDA the default ``max_concurrent`` (64) shrinks to the rows whose KV cache (``token_bytes`` a token,
        ``max_total_tokens`` tokens a row) fits in half of ``free_bytes`` (default: the device's free memory now)."""
        cuda = device.type == "cuda"
        total = self.max_total_tokens if self.max_total_tokens is not None else min(context, 8192)
        rows = self.max_concurrent
        if rows is None:
            rows = 64 if cuda else 8
            if cuda and token_bytes:
                free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
                fit = max(1, int(0.5 * free // (token_bytes * total)))
                if fit < rows:
                    log.warning("the KV cache of %d rows of %d tokens does not fit in half of the free GPU memory "
                                "(%.1f GiB): serving %d requests at once (--max-concurrent, --max-total-tokens)",
                                rows, total, free / 2**30, fit)  # fmt: skip
                    rows = fit
        out = Limits(
            max_concurrent=rows,
            max_queue=self.max_queue,
            max_total_tokens=total,
            max_prompt_tokens=self.max_prompt_tokens if self.max_prompt_tokens is not None else total - 1,
            queue_timeout=self.queue_timeout,
            prefill_tokens=self.prefill_tokens if self.prefill_tokens is not None else (2048 if cuda else 256),
        )
        checks = {
            "max_concurrent": out.max_concurrent >= 1,
            "max_queue": out.max_queue >= 0,
            "max_total_tokens": 2 <= total <= context,
            "max_prompt_tokens": 1 <= out.max_prompt_tokens < total,
            "queue_timeout": out.queue_timeout > 0,
            "prefill_tokens": out.prefill_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(out, name)} is out of range (the model's "
                                 f"context is {context}; max-prompt-tokens < max-total-tokens <= context)")  # fmt: skip
        return out


@dataclass
class Job:
    """One checked request turned into a generation: the prompt, the settings, the adapter (index) and the tools."""

    prompt: list[int]
    gen: GenerationConfig
    stop: list[str]
    adapter: int = 0  # 0: the served model itself; k: the k-th --adapter
    tools: list[dict] | None = None
    model: str | None = None  # the name the request asked for
    reply_start: str = ""  # a forced tool call's metadata line ("name\n"), already at the end of ``prompt``


@dataclass
class Outcome:
    """How a generation ended. With tools, a reply held back as a possible tool call ends as ``content`` /
    ``tool_calls`` here (no text pieces came); once it cannot be a call its text streams as pieces (both None)."""

    completion_tokens: int = 0
    finish_reason: str = "length"
    content: str | None = None
    tool_calls: list | None = None


@dataclass(eq=False)
class _Request:
    job: Job
    deliver: Callable[[list[object]], None]  # hands items to the request's event loop
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    row: int = -1
    fed: int = 0  # prompt tokens prefilled
    joined: int = 0  # the batch's tick when its decoding began: earlier columns are not its tokens
    text: ReplyText | None = None
    stops: StopText | None = None
    ids: list[int] = field(default_factory=list)
    outcome: Outcome = field(default_factory=Outcome)
    pending: list[object] = field(default_factory=list)
    held: bool = False  # a reply to a request with tools, held back while it may still be a tool call

    def __post_init__(self) -> None:
        gen = self.job.gen
        seed = gen.seed if gen.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.sampling = RowSampling.of(gen, seed)


class Ticket:
    """A submitted job: iterate it with :meth:`Engine.run`. Cancelling (a client that left) frees its row."""

    def __init__(self, engine: Engine, request: _Request, queue: asyncio.Queue) -> None:
        self.engine, self.request, self.queue = engine, request, queue

    def cancel(self) -> None:
        self.engine._cancel(self.request)


class Engine:
    """The model, its template and tokenizer, its adapters and the continuous-batching worker.

    ``adapters``: name -> LoRA adapter folder (PEFT format), served together with the model in one batch; a
    request's ``model`` picks one by name (``model_name`` or None: the model itself). ``limits``: see
    :class:`Limits`. ``stream_every``: decode steps between reads of the new tokens (default 4 on CUDA, 1 on the
    CPU)."""

    def __init__(self, pretrained: Pretrained, *, decode: str = "auto", model_name: str | None = None,
                 adapters: Mapping[str, str | Path] | None = None, limits: Limits | None = None,
                 stream_every: int | None = None) -> None:  # fmt: skip
        self.pretrained = pretrained
        p = pretrained
        self.context_length = int(p.config.seq_length)
        self.decoder = Decoder(p.model, decode=decode)
        cfg = p.config  # a token's keys and values in every layer
        token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.decoder.dtype.itemsize
        self.limits = (limits or Limits()).resolve(self.context_length, self.decoder.device, token_bytes=token_bytes)
        self.model_name = model_name or Path(p.path).name
        self.names = {self.model_name: 0}
        self.multi_lora = None
        if adapters:
            from glmtune.serve.multi_lora import MultiLora

            self.multi_lora = MultiLora.load(p.model, adapters)
            for i, name in enumerate(adapters, start=1):
                if name in self.names:
                    raise ValueError(f"--adapter {name}=...: the name {name!r} is taken (by the served model)")
                self.names[name] = i
        self.stream_every = stream_every or (4 if self.decoder.device.type == "cuda" else 1)
        self._stop_ids = sorted(set(p.template.stop_ids(p.tokenizer)))
        self._batch: DecodeBatch | None = None
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request | None] = [None] * self.limits.max_concurrent
        self._closing = False
        self._thread: threading.Thread | None = None
        self._done: list[_Request] = []  # finished this round, their last items not handed over yet
        self._pending: tuple | None = None  # the last round's tokens (being copied), rows and ticks
        self.cancelled = 0  # generations stopped early because their client left
        self.peak_running = 0  # the most requests that shared the batch at once
        self.completed = 0

    # ---- requests ------------------------------------------------------------------------------------------------
    def job(self, req: ChatRequest) -> Job:
        """The prompt and generation settings of a request, or APIError when they do not fit the model or limits."""
        p = self.pretrained
        adapter = 0
        if req.model is not None:
            if req.model not in self.names:
                known = ", ".join(repr(n) for n in self.names)
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves {known}",
                               param="model", code="model_not_found")  # fmt: skip
            adapter = self.names[req.model]
        tools, messages, forced = self._messages(req)
        reply_start = f"{forced}\n" if forced else ""
        try:
            prompt = p.template.encode_prompt(p.tokenizer, messages)
            if forced:  # the reply starts as that tool's call: the model writes only its arguments
                prompt += p.template.reply_start(p.tokenizer, forced)
        except ValueError as e:  # the generation's own rules (v1/v2: alternating turns, no system role...)
            raise APIError(400, f"'messages' cannot be rendered for {p.generation}: {e}", param="messages",
                           code="invalid_value") from None  # fmt: skip
        lim = self.limits
        if len(prompt) > lim.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this server takes at most "
                           f"{lim.max_prompt_tokens} (the model's context is {self.context_length})",
                           param="messages", code="context_length_exceeded")  # fmt: skip
        room = lim.max_total_tokens - len(prompt)
        if req.max_tokens is not None and req.max_tokens > room:
            raise APIError(400, f"'max_tokens' is {req.max_tokens}, but the prompt takes {len(prompt)} of the "
                           f"{lim.max_total_tokens} tokens a request may have here: at most {room} remain",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        gen = GenerationConfig(
            max_new_tokens=req.max_tokens if req.max_tokens is not None else room,
            do_sample=req.temperature > 0,
            temperature=req.temperature if req.temperature > 0 else 1.0,
            top_p=req.top_p,
            seed=req.seed,
        )
        return Job(prompt, gen, req.stop, adapter, tools, req.model, reply_start)

    def _messages(self, req: ChatRequest) -> tuple[list[dict] | None, list[Message], str | None]:
        """(the tools to show, the turns, the tool whose call is forced): through serve/tools.py when the request
        involves tools."""
        if not req.uses_tools:
            return None, [Message(role, content) for role, content in req.messages], None
        from glmtune.serve.tools import ToolError, forced_tool, parse_tools, request_messages

        generation = self.pretrained.generation
        try:
            tools = parse_tools(req.tools, req.tool_choice, generation)
            return tools, request_messages(req.raw_messages, tools, generation), forced_tool(req.tool_choice, tools)
        except ToolError as e:
            raise APIError(400, e.message, param=e.param, code="invalid_value") from None

    def submit(self, job: Job) -> Ticket:
        """Queue ``job`` (call from the event loop); APIError 429 when the queue is full, 503 when shutting down."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(items: list[object]) -> None:
            try:
                loop.call_soon_threadsafe(_put_all, queue, items)
            except RuntimeError:  # its event loop is closed: nobody waits for this request any more
                request.cancelled = True

        request = _Request(job, deliver)
        self.start()
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.limits.max_queue + self._free_rows_locked():
                raise APIError(429, f"the server is busy: {self.limits.max_concurrent} requests run and "
                               f"{len(self._waiting)} wait; try again later", type="rate_limit_error",
                               code="queue_full")  # fmt: skip
            self._waiting.append(request)
            self._lock.notify()
        return Ticket(self, request, queue)

    def start(self) -> None:
        """Allocate the decode batch (KV cache and step state: an error here, such as out of memory, is raised to
        the caller) and start the worker. Called by the app at start-up; a first request calls it otherwise."""
        with self._lock:
            if self._thread is not None:
                return
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._batch = self._make_batch()
            self._thread = threading.Thread(target=self._worker, name="glmtune-serve", daemon=True)
            self._thread.start()

    async def run(self, job: Job | Ticket) -> AsyncIterator[str | Outcome]:
        """Text pieces, then the Outcome (a :class:`Job` is submitted first). Closing the iterator early (a client
        gone) frees the request's row at once. Errors arrive as exceptions (APIError 503 for a queue wait too long)."""
        ticket = job if isinstance(job, Ticket) else self.submit(job)
        try:
            while True:
                item = await ticket.queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            ticket.cancel()

    def _cancel(self, request: _Request) -> None:
        with self._lock:
            request.cancelled = True  # a finished request has left its row already: nothing more happens
            self._lock.notify()

    def close(self) -> None:
        """Refuse new requests (503), end the waiting and running ones, and stop the worker."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    @property
    def running(self) -> int:
        with self._lock:
            return sum(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---- the worker ------------------------------------------------------------------------------------------------
    def _free_rows_locked(self) -> int:
        return self.limits.max_concurrent - sum(r is not None for r in self._rows)

    def _make_batch(self) -> DecodeBatch:
        lim = self.limits
        batch = self.decoder.batch(lim.max_concurrent, lim.max_total_tokens, n_stop=len(self._stop_ids),
                                   ring=max(8, 2 * self.stream_every), window_multiple=64)  # fmt: skip
        batch.reset()
        batch.set_stop(self._stop_ids)
        if self.multi_lora is not None:
            self.multi_lora.attach(batch)
        return batch

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._waiting and not any(self._rows):
                    self._lock.wait()
                if self._closing:
                    self._shutdown_locked()
                    return
                self._sweep_locked()
            try:
                self._round()
            except Exception as e:  # a failed forward: its requests are told, the server goes on
                log.exception("generation failed")
                err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
                self._pending = None
                with self._lock:
                    for i, r in enumerate(self._rows):
                        if r is not None:
                            _fail(r, err)
                            self._rows[i] = None
                try:
                    self._batch.reset()
                except Exception:
                    log.exception("could not reset the decode batch")

    def _shutdown_locked(self) -> None:
        err = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        for r in list(self._waiting) + [r for r in self._rows if r is not None]:
            _fail(r, err)
        self._waiting.clear()
        self._rows = [None] * len(self._rows)

    def _sweep_locked(self) -> list[_Request]:
        """Free the rows of cancelled requests, fail those that waited too long, and move waiting requests into
        free rows (in order). Returns the requests that got a row now."""
        batch = self._batch
        freed = []
        for i, r in enumerate(self._rows):
            if r is not None and r.cancelled:
                self._rows[i] = None
                freed.append(i)
                self.cancelled += 1
        batch.free(freed)
        now = time.monotonic()
        keep: deque[_Request] = deque()
        for r in self._waiting:
            if r.cancelled:
                continue
            if now - r.queued_at > self.limits.queue_timeout:
                why = f"no generation slot came free within {self.limits.queue_timeout:g} s"
                _fail(r, APIError(503, f"the server is overloaded: {why}", type="server_error", code="overloaded"))
                continue
            keep.append(r)
        self._waiting = keep
        admitted = []
        free = [i for i, r in enumerate(self._rows) if r is None]
        while self._waiting and free:
            r = self._waiting.popleft()
            r.row = free.pop(0)
            self._rows[r.row] = r
            admitted.append(r)
        self.peak_running = max(self.peak_running, sum(r is not None for r in self._rows))
        return admitted

    def _round(self) -> None:
        """Prefill, queue ``stream_every`` decode steps, then hand out the tokens of the previous round's steps
        while the device runs these (the host's work overlaps the device's; a row's request may run a round past
        its end, which its device-side stop or limit makes harmless)."""
        batch = self._batch
        self._prefill()
        decoding = [r for r in self._rows if r is not None and r.text is not None]
        previous, self._pending = self._pending, None
        if decoding:
            cols = batch.step(self.stream_every)
            self._pending = (batch.read_later(cols), range(batch.tick - len(cols), batch.tick), decoding)
        if previous is not None:
            self._hand_out(*previous)
        self._flush()

    def _hand_out(self, tokens: Callable[[], torch.Tensor], ticks: range, decoding: list[_Request]) -> None:
        out = tokens().tolist()
        for r in decoding:
            if r.row < 0 or self._rows[r.row] is not r:  # finished or cancelled since
                continue
            for t, token in zip(ticks, out[r.row], strict=True):
                if t >= r.joined and self._push(r, token):
                    break

    def _prefill(self) -> None:
        """One prefill pass: the prompts of rows still being fed, in row order, up to ``prefill_tokens`` tokens (at
        least one chunk). ChatGLM-6B prompts go whole (their prompt is attended both ways)."""
        batch, budget = self._batch, self.limits.prefill_tokens
        rows, adm, spans = [], [], []
        whole = self.pretrained.config.arch == "glm"
        for r in sorted((r for r in self._rows if r is not None and r.text is None), key=lambda r: r.queued_at):
            left = len(r.job.prompt) - r.fed
            n = left if whole else min(left, budget)
            if rows and n > budget:
                break
            rows.append(r)
            adm.append(Admission(r.job.prompt, r.sampling, r.job.gen.max_new_tokens, r.job.adapter))
            spans.append((r.fed, r.fed + n))
            budget -= n
            if budget <= 0:
                break
        if not rows:
            return
        first = batch.prefill([r.row for r in rows], adm, spans)
        done = [r for r, (_, j) in zip(rows, spans, strict=True) if j == len(r.job.prompt)]
        for r, (_, j) in zip(rows, spans, strict=True):
            r.fed = j
        p = self.pretrained
        for r, token in zip(done, first, strict=True):
            r.joined = batch.tick
            r.held = r.job.tools is not None
            r.text = ReplyText(p.tokenizer, None if r.held else p.template.postprocess)
            r.stops = StopText(r.job.stop)
            self._push(r, token)

    def _push(self, r: _Request, token: int) -> bool:
        """Add one token (``-1``: the row stopped) to a request; True once it has finished (its row is freed)."""
        gen, o = r.job.gen, r.outcome
        if token >= 0:
            o.completion_tokens += 1
            r.ids.append(token)
            piece = r.stops.push(r.text.push(token))
            if r.held and not r.stops.hit and not self._may_call(r):
                piece = self._release(r)
            if piece and not r.held:
                r.pending.append(piece)
            if r.stops.hit:
                return self._finish(r, "stop")
            if o.completion_tokens >= gen.max_new_tokens:
                return self._finish(r, "length")
            return False
        return self._finish(r, "length" if o.completion_tokens >= gen.max_new_tokens else "stop")

    def _finish(self, r: _Request, reason: str) -> bool:
        o = r.outcome
        o.finish_reason = reason
        if not r.stops.hit:
            rest = r.stops.push(r.text.finish()) + r.stops.flush()
            if rest and not r.held:
                r.pending.append(rest)
        if r.held:
            self._tool_reply(r)
        r.pending += [o, _END]
        self._done.append(r)
        with self._lock:
            if self._rows[r.row] is r:
                self._rows[r.row] = None
                self._batch.free([r.row])
            self.completed += 1
        return True

    def _may_call(self, r: _Request) -> bool:
        from glmtune.serve.tools import tool_call_possible

        return tool_call_possible(r.job.reply_start + r.text.text, self.pretrained.generation, r.job.tools)

    def _release(self, r: _Request) -> str:
        """A held reply that cannot be a tool call any more streams as plain text: the text so far, cleaned up."""
        p = self.pretrained
        r.held = False
        r.text = ReplyText(p.tokenizer, p.template.postprocess)
        r.stops = StopText(r.job.stop)
        return r.stops.push("".join(r.text.push(t) for t in r.ids))

    def _tool_reply(self, r: _Request) -> None:
        from glmtune.serve.tools import reply_message

        p, o = self.pretrained, r.outcome
        raw = p.tokenizer.decode(r.ids, skip_special_tokens=False)
        if r.stops.hit:  # the text up to the stop string
            raw = StopText(r.job.stop).push(raw)
        raw = r.job.reply_start + raw  # a forced call's metadata line came with the prompt
        o.content, o.tool_calls = reply_message(raw, p.generation, r.job.tools)
        if o.tool_calls:
            o.finish_reason = "tool_calls"

    def _flush(self) -> None:
        done, self._done = self._done, []
        for r in [r for r in self._rows if r is not None] + done:
            if r.pending:
                items, r.pending = r.pending, []
                r.deliver(items)


def _put_all(queue: asyncio.Queue, items: list[object]) -> None:
    for item in items:
        queue.put_nowait(item)


def _fail(r: _Request, err: Exception) -> None:
    r.deliver([*r.pending, err, _END])
    r.pending = []
