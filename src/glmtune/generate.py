"""Token generation: one decode path over a slot-indexed KV cache, sampling on the device, streaming.

Works for both model families through their common surface: ``new_cache``, ``reserve_positions`` and ``forward``
with a :class:`~glmtune.models.layout.SequenceLayout` (``layout.prompt_layout`` places the prompts).

Prompts are left-padded into slots after the P-Tuning prefix; each decode step writes its token to the next slot
and attends over the whole cache through the mask builder, so every step has the same shapes. ``decode="graph"``
captures that step — forward, logits processing, sampling and the state update — as one CUDA graph and replays
it; ``"eager"`` runs the very same step op by op (the CPU path, and what the tests compare against).

At one row per step (batch 1) a step is bound by reading the weights; on CUDA its linears then run glmtune's Triton
matrix-vector kernel (``matvec="auto"``/``"triton"``, ``models/gemv.py``: 3.2-4.5 TB/s of weight on an H200 against
cuBLAS's 2.5-4.1), routed from ``F.linear`` while the step is warmed up, compiled and captured. Its attention over
the cache (a few queries per KV head: GQA folded) runs glmtune's split-over-the-keys Triton kernel on CUDA
(``attention="auto"``/``"triton"``, ``models/decode_attention.py``: ~4.8 µs a ChatGLM3 layer against cuDNN's 11.3),
routed from SDPA the same way. ChatGLM3-6B bf16 at batch 1 on an H200 (bench/decode_speed.py): graph 150 -> 177
tok/s, ``decode="compiled"`` ~210 -> 249.

Sampling never leaves the device: a row's draw is ``argmax(logits + Gumbel noise)`` (exactly a draw from the
softmax), the noise a counter-based hash of (row seed, step, token), so a row draws what it draws alone whatever
its batch, with no per-row generator and no host round trip. Tokens are copied to the host every
``stream_every`` steps and yielded one step at a time (a small lag); the next group of steps is queued before the
host waits for a group's tokens.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glmtune.models.layout import SequenceLayout, next_positions, prompt_layout

DECODE_MODES = ("auto", "eager", "graph", "compiled")
# How a decode step multiplies one row by a weight (batch 1): "torch" F.linear (cuBLAS); "triton" glmtune's Triton
# matrix-vector kernel (models/gemv.py); "inductor" (decode="compiled" only) inductor's own, coordinate-descent tuned.
MATVEC_MODES = ("auto", "torch", "triton", "inductor")
# How a decode step attends over its cache: "sdpa" F.scaled_dot_product_attention (cuDNN/flash on CUDA); "triton"
# glmtune's split-over-the-keys kernel for a few queries (models/decode_attention.py).
ATTENTION_MODES = ("auto", "sdpa", "triton")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


# ---- logits processing (one row or a batch, float32 logits (b, V)) ------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As in CTRL / HF: a seen token's logit is divided by ``penalty`` if positive, multiplied if negative.

    ``seen`` is a bool (b, V) mask of tokens present in the row's prompt or output.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float | torch.Tensor) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the most likely token always stays).

    ``top_p``: one number, or a (b, 1) tensor of one per row."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False  # keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


# ---- device-side random numbers ----------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (products stay below 2^49)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values in [0, 2^32): identical on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(b, vocab) float32 Gumbel(0, 1) noise from per-row ``seeds`` (b,) and a ``step`` counter (()), both int64."""
    row = hash32(hash32(seeds & _M32) ^ (step & _M32))  # (b,)
    bits = hash32(row[:, None] ^ torch.arange(vocab, device=seeds.device)[None, :])  # (b, V)
    u = ((bits >> 8).float() + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


@dataclass(frozen=True)
class StepKind:
    """What a decode step is specialised on (host-side, part of a captured step's key); the rest is per row.

    ``sample``: some row samples (else every row takes the argmax, with no noise drawn); ``nucleus``: some sampling
    row has top_p < 1 (else no sort); ``top_k`` and ``repetition_penalty`` apply to the whole batch."""

    sample: bool = False
    nucleus: bool = False
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class RowSampling:
    """One row's sampling settings; a batch keeps them as device tensors, so one captured step serves every row."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, cfg: GenerationConfig, seed: int) -> RowSampling:
        return cls(cfg.do_sample, cfg.temperature if cfg.do_sample else 1.0, cfg.top_p if cfg.do_sample else 1.0,
                   seed)  # fmt: skip


def choose_next(logits: torch.Tensor, kind: StepKind, *, greedy: torch.Tensor, temperature: torch.Tensor,
                top_p: torch.Tensor, seen: torch.Tensor, seeds: torch.Tensor,
                step: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Next token per row from float32 logits (b, V) -> (b,). Greedy rows (``greedy`` (b,) bool) take the argmax;
    the others draw with their ``seeds`` (b,) at their ``step`` (b,) after ``temperature`` and ``top_p`` (b,)."""
    logits = apply_repetition_penalty(logits, seen, kind.repetition_penalty)
    best = logits.argmax(dim=-1)
    if not kind.sample:
        return best
    scaled = filter_top_k_top_p(logits / temperature[:, None], kind.top_k, top_p[:, None] if kind.nucleus else 1.0)
    drawn = (scaled + gumbel_noise(seeds, step, logits.shape[-1])).argmax(dim=-1)
    return torch.where(greedy, best, drawn)


# ---- the loop ---------------------------------------------------------------------------------------------------
class DecodeState:
    """What one decode step reads and updates in place, on the device (so a captured step can be replayed): for
    each of ``b`` rows its next input, position, cache slot, sampling settings and progress.

    Allocated once per batch and refilled row by row (``load``), so a captured step stays valid. ``out`` is a ring
    of ``ring`` columns: the step of global count ``tick`` writes its tokens (``-1`` for a row that has stopped)
    to column ``tick % ring``."""

    def __init__(self, b: int, vocab: int, n_stop: int, position_shape: tuple[int, ...], ring: int,
                 device: torch.device) -> None:  # fmt: skip
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.ids = longs(b, 1)  # the token fed to the next step
        self.positions = longs(*position_shape)  # (b, 1) | (b, 2, 1): its position
        self.slots = longs(b, 1)  # its cache slot
        self.segments = torch.full((b, 1), -1, dtype=torch.long, device=device)  # 0 for a row in use, -1 free
        self.seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)  # for the repetition penalty
        self.seeds = longs(b)
        self.greedy = torch.ones((b,), dtype=torch.bool, device=device)
        self.temperature = torch.ones((b,), dtype=torch.float32, device=device)
        self.top_p = torch.ones((b,), dtype=torch.float32, device=device)
        self.adapter = longs(b)  # which adapter a row uses (serve/multi_lora.py), 0 = none
        self.stop = longs(n_stop)
        self.tick = longs()  # steps done by this batch
        self.row_step = longs(b)  # tokens a row has chosen (the prompt's forward chose token 0)
        self.limit = longs(b)  # tokens a row may choose
        self.done = torch.ones((b,), dtype=torch.bool, device=device)
        self.out = torch.full((b, ring), -1, dtype=torch.long, device=device)
        self.rows = torch.arange(b, device=device)
        self.true = torch.ones((b,), dtype=torch.bool, device=device)

    def stopped(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, None] == self.stop[None, :]).any(-1)

    def load(self, rows: torch.Tensor, first: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             sampling: list[RowSampling], limits: list[int], adapters: list[int] | None = None) -> None:  # fmt: skip
        """Start ``rows`` (r,) on new sequences whose prompts' forward chose ``first`` (r,)."""
        dev = rows.device
        self.ids[rows] = first[:, None]
        self.positions[rows] = positions
        self.slots[rows] = slots
        self.segments[rows] = 0
        self.seeds[rows] = torch.tensor([s.seed & 0xFFFFFFFF for s in sampling], dtype=torch.long, device=dev)
        self.greedy[rows] = torch.tensor([not s.do_sample for s in sampling], device=dev)
        self.temperature[rows] = torch.tensor([s.temperature for s in sampling], dtype=torch.float32, device=dev)
        self.top_p[rows] = torch.tensor([s.top_p for s in sampling], dtype=torch.float32, device=dev)
        self.adapter[rows] = torch.tensor(adapters or [0] * len(sampling), dtype=torch.long, device=dev)
        self.row_step[rows] = 1
        self.limit[rows] = torch.tensor(limits, dtype=torch.long, device=dev)
        self.done[rows] = self.stopped(first)

    def free(self, rows: torch.Tensor, park_slot: int) -> None:
        """Stop ``rows``: they step on (fixed shapes) at ``park_slot``, as padding nothing attends to."""
        self.done[rows] = True
        self.segments[rows] = -1
        self.slots[rows] = park_slot
        self.positions[rows] = 0

    def record(self, next_ids: torch.Tensor) -> None:
        """Store the chosen tokens in the ring and move every live row's input on by one token."""
        self.done |= self.stopped(next_ids) | (self.row_step >= self.limit)
        col = torch.remainder(self.tick, self.out.shape[1])
        self.out.index_copy_(1, col[None], torch.where(self.done, -1, next_ids)[:, None])
        self.seen[self.rows, next_ids] = self.true  # a device tensor: a CUDA graph captures no host copy
        live = (~self.done).long()
        self.ids.copy_(next_ids[:, None])
        self.positions.copy_(next_positions(self.positions, live))
        self.slots += live[:, None]
        self.row_step += 1
        self.tick += 1


class DecodeStep:
    """One decode step with fixed shapes: forward one token per row at its slot, choose the next, update the state.

    ``use_graph``: capture the step as a CUDA graph on its first call and replay it after (CUDA only).
    ``compile_backend``: run the step through ``torch.compile`` with this backend first (fusing the hundreds of small
    elementwise kernels of a step; the compiled step is what the graph captures). ``pool``: the graphs' shared
    memory pool (steps of one batch never run at the same time). ``matvec``, ``attention``: one of ``MATVEC_MODES``,
    ``ATTENTION_MODES`` but "auto" (:func:`step_context`), in force for every call that is not a replay (warm-up,
    compilation, capture)."""

    def __init__(self, model: nn.Module, cache: Any, state: DecodeState, kind: StepKind, max_position: int,
                 *, use_graph: bool, compile_backend: str | None = None, pool: Any = None,
                 matvec: str = "torch", attention: str = "sdpa") -> None:  # fmt: skip
        self.model, self.cache, self.state, self.kind = model, cache, state, kind
        self.max_position = max_position
        self.graph: Any = None
        self.pool = pool
        self.use_graph = use_graph and state.ids.device.type == "cuda"
        self.compile_backend, self.matvec, self.attention = compile_backend, matvec, attention
        self._step = self._run if compile_backend is None else torch.compile(self._run, backend=compile_backend,
                                                                             dynamic=False)  # fmt: skip

    def _run(self) -> None:
        st = self.state
        layout = SequenceLayout(st.positions, st.segments, None, st.slots, max_position=self.max_position)
        logits = self.model(st.ids, cache=self.cache, layout=layout)[:, -1].float()
        st.record(choose_next(logits, self.kind, greedy=st.greedy, temperature=st.temperature, top_p=st.top_p,
                              seen=st.seen, seeds=st.seeds, step=st.row_step))  # fmt: skip

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        with step_context(self.matvec, self.attention, self.compile_backend):
            if not self.use_graph:
                self._step()
                return
            # Warm up on a side stream (this runs the real step), then capture the step it will replay. The capture
            # itself runs nothing, so it must not advance the state: it is recorded from the state as it is now.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step()
            self.graph = graph


def step_context(matvec: str, attention: str, compile_backend: str | None) -> contextlib.ExitStack:
    """What a decode step's un-replayed calls run under. ``matvec``: "triton" routes one-row ``F.linear`` calls to
    the Triton kernel (``models.gemv.MatvecMode``: the others, and every CPU call, run as they are); "inductor" with
    the inductor backend turns on its coordinate-descent tuning for this compilation only (it then lowers a one-row
    matrix product to a reduction it tunes, instead of calling cuBLAS). ``attention``: "triton" routes the
    few-query SDPA calls under a bool mask (attention over the cache) to the split-over-the-keys kernel
    (``models.decode_attention.DecodeAttentionMode``)."""
    stack = contextlib.ExitStack()
    if matvec == "triton":
        from glmtune.models.gemv import MatvecMode

        stack.enter_context(MatvecMode())
    if matvec == "inductor" and compile_backend == "inductor":
        from torch._inductor import config as inductor_config

        stack.enter_context(inductor_config.patch(coordinate_descent_tuning=True))
    if attention == "triton":
        from glmtune.models.decode_attention import DecodeAttentionMode

        stack.enter_context(DecodeAttentionMode())
    return stack


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@dataclass
class Admission:
    """A sequence a :class:`DecodeBatch` row takes: its prompt, sampling settings, token limit and adapter."""

    prompt: Sequence[int]
    sampling: RowSampling
    max_new_tokens: int
    adapter: int = 0


class DecodeBatch:
    """``batch_size`` rows decoding together over one KV cache of ``max_len`` slots per row (after the P-Tuning
    prefix). Rows take sequences at any time (:meth:`prefill`, several rows at once, a long prompt in chunks) and
    leave at any time (:meth:`free`); :meth:`step` advances every row with one fixed-shape step (a row that has
    stopped or is free steps as padding), captured per cache window (the slots in use, rounded up to a power-of-two
    multiple of ``window_multiple``) and :class:`StepKind`.

    A row's tokens sit in its own cache row from slot ``n_prefix`` on, in order, under segment 0; the mask builder
    lets a token see only its row's sequence and the prefix, so a row gives what it gives alone. ``Decoder`` (batch
    generation) and the server's scheduler (continuous batching) both run on it.

    ``before_forward(rows)``: called with the rows (None: all) before each forward, e.g. to point per-row adapters
    at them; ``on_step``: the rows of the last step are ``state.adapter``'s."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, *, n_stop: int, decode: str = "eager",
                 compile_backend: str | None = None, ring: int = 8, window_multiple: int = 64, top_k: int = 0,
                 repetition_penalty: float = 1.0, matvec: str = "torch", attention: str = "sdpa") -> None:  # fmt: skip
        self.model = model
        self.device, self.dtype = _model_device_dtype(model)
        self.batch_size, self.max_len = batch_size, max_len
        self.n_prefix = model.n_prefix()
        self.decode, self.compile_backend, self.matvec, self.attention = decode, compile_backend, matvec, attention
        self.window_multiple = window_multiple
        self.top_k, self.repetition_penalty = top_k, repetition_penalty
        # the rotary table covers every position the cache can hold, so it is built before any capture
        model.reserve_positions(max_len + self.n_prefix + 1, self.dtype, self.device)
        self.rope = model._rope_table(0, self.dtype, self.device)
        self.cache = model.new_cache(batch_size, max_len, device=self.device, dtype=self.dtype)
        shape = (batch_size, 2, 1) if model.config.arch == "glm" else (batch_size, 1)
        vocab = model.config.padded_vocab_size
        self.state = DecodeState(batch_size, vocab, n_stop, shape, ring, self.device)
        self.state.slots.fill_(self.n_prefix)
        self.ring = ring
        self.tick = 0  # the host's count of steps (the state's tick on the device)
        self.steps: dict[tuple, DecodeStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" and decode != "eager" else None
        self.before_forward: Any = None
        # host mirrors of each row: in use, sampling, and the highest slot it may have written
        self.sampling: list[RowSampling | None] = [None] * batch_size
        self.top_slot = [self.n_prefix] * batch_size

    def set_stop(self, stop_ids: Sequence[int]) -> None:
        stop = sorted(set(stop_ids))
        if len(stop) != self.state.stop.numel():
            raise ValueError(f"this batch was made for {self.state.stop.numel()} stop ids, got {len(stop)}")
        self.state.stop.copy_(torch.tensor(stop, dtype=torch.long))

    def reset(self) -> None:
        """Every row free and the cache empty; the P-Tuning prefix written anew (the model may have been trained)."""
        self.cache.reset()
        if self.n_prefix:
            self.cache.write_prefix(self.model.prefix_key_values(self.batch_size, dtype=self.dtype,
                                                                 device=self.device))  # fmt: skip
        self.free(list(range(self.batch_size)))
        self.state.tick.zero_()
        self.tick = 0

    def free(self, rows: Sequence[int]) -> None:
        if not rows:
            return
        self.state.free(torch.tensor(list(rows), dtype=torch.long, device=self.device), self.n_prefix)
        for r in rows:
            self.sampling[r] = None
            self.top_slot[r] = self.n_prefix

    def window(self, top_slot: int) -> int:
        """The cache window (slots attended) for slots below ``top_slot``: ``window_multiple`` doubled until it
        covers them, at most the whole cache."""
        total = self.cache.max_len
        w = self.window_multiple
        while w < top_slot and w < total:
            w *= 2
        return min(w, total)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], admissions: Sequence[Admission],
                spans: Sequence[tuple[int, int]] | None = None) -> list[int]:  # fmt: skip
        """Feed ``admissions[i].prompt[start:end]`` (``spans[i]``; default the whole prompt) into row ``rows[i]``;
        a span from 0 starts the row anew. Rows whose span ends their prompt choose their first token and start
        decoding; returns those first tokens in order (-1 for a stop token)."""
        model, dev = self.model, self.device
        spans = list(spans) if spans is not None else [(0, len(a.prompt)) for a in admissions]
        chunks = [list(a.prompt[i:j]) for a, (i, j) in zip(admissions, spans, strict=True)]
        offsets = [i for i, _ in spans]
        ids, layout = prompt_layout(chunks, model.config, 0, start_slot=self.n_prefix, pad_side="right",
                                    offsets=offsets)  # fmt: skip
        idx = torch.tensor(list(rows), dtype=torch.long, device=dev)
        if any(o == 0 for o in offsets):
            starts = torch.tensor([r for r, o in zip(rows, offsets, strict=True) if o == 0], device=dev)
            self.cache.reset_rows(starts, self.n_prefix)
        for r, (_, j) in zip(rows, spans, strict=True):
            self.top_slot[r] = self.n_prefix + j
            self.state.slots[r] = self.n_prefix + j  # a row between parts waits (as padding) where its next goes
        self.state.adapter[idx] = torch.tensor([a.adapter for a in admissions], dtype=torch.long, device=dev)
        view = self.cache.view(idx, self.window(max(j for _, j in spans) + self.n_prefix))
        if self.before_forward is not None:
            self.before_forward(idx)
        h = model.hidden_states(ids.to(dev), cache=view, layout=layout.to(dev))  # (r, s, H)
        done = [k for k, (a, (_, j)) in enumerate(zip(admissions, spans, strict=True)) if j == len(a.prompt)]
        if not done:
            return []
        adm = [admissions[k] for k in done]
        lengths = torch.tensor([len(chunks[k]) for k in done], device=dev)
        pick = torch.tensor(done, device=dev)
        logits = model.output_embeddings()(h[pick, lengths - 1]).float()  # (f, V)
        sampling = [a.sampling for a in adm]
        kind = self._kind(sampling)
        greedy = torch.tensor([not s.do_sample for s in sampling], device=dev)
        temp = torch.tensor([s.temperature for s in sampling], dtype=torch.float32, device=dev)
        top_p = torch.tensor([s.top_p for s in sampling], dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.seed & 0xFFFFFFFF for s in sampling], dtype=torch.long, device=dev)
        seen = torch.zeros((len(adm), model.config.padded_vocab_size), dtype=torch.bool, device=dev)
        if self.repetition_penalty != 1.0:  # the whole prompt's tokens
            for k, a in enumerate(adm):
                seen[k, torch.tensor(list(a.prompt), device=dev)] = True
        first = choose_next(logits, kind, greedy=greedy, temperature=temp, top_p=top_p, seen=seen, seeds=seeds,
                            step=torch.zeros_like(seeds))  # fmt: skip
        seen[torch.arange(len(adm), device=dev), first] = True
        return self._start(idx[pick], pick, layout, lengths, first, seen, adm)

    def _start(self, rows: torch.Tensor, pick: torch.Tensor, layout: SequenceLayout, lengths: torch.Tensor,
               first: torch.Tensor, seen: torch.Tensor, adm: list[Admission]) -> list[int]:  # fmt: skip
        dev = self.device
        pos = layout.positions.to(dev)[pick]  # (f, s) | (f, 2, s)
        index = (lengths - 1).view(-1, *([1] * (pos.dim() - 1))).expand(*pos.shape[:-1], 1)
        last = pos.gather(-1, index)  # (f, 1) | (f, 2, 1)
        slots = layout.slots.to(dev)[pick].gather(1, (lengths - 1)[:, None]) + 1
        st = self.state
        st.load(rows, first, next_positions(last), slots, [a.sampling for a in adm], [a.max_new_tokens for a in adm],
                [a.adapter for a in adm])  # fmt: skip
        st.seen[rows] = seen
        for r, a in zip(rows.tolist(), adm, strict=True):
            self.sampling[r] = a.sampling
        return torch.where(st.stopped(first), -1, first).tolist()

    def _kind(self, sampling: Sequence[RowSampling | None]) -> StepKind:
        sample = [s for s in sampling if s is not None and s.do_sample]
        return StepKind(bool(sample), any(s.top_p < 1 for s in sample), self.top_k, self.repetition_penalty)

    @torch.inference_mode()
    def step(self, steps: int = 1) -> list[int]:
        """Run ``steps`` decode steps; returns the ring columns they wrote (read them with :meth:`read`)."""
        kind = self._kind(self.sampling)
        cols = []
        for _ in range(steps):
            top = max(self.top_slot) + 1
            w = self.window(top)
            step = self.steps.get((w, kind))
            if step is None:
                view = self.cache.view(None, w)
                step = DecodeStep(self.model, view, self.state, kind, 0, use_graph=self.decode in ("graph", "compiled"),
                                  compile_backend=self.compile_backend, pool=self.pool,
                                  matvec=self.matvec, attention=self.attention)  # fmt: skip
                self.steps[(w, kind)] = step
            if self.before_forward is not None:
                self.before_forward(None)
            step()
            cols.append(self.tick % self.ring)
            self.tick += 1
            self.top_slot = [t + 1 if s is not None else t for t, s in zip(self.top_slot, self.sampling, strict=True)]
        return cols

    def read(self, cols: Sequence[int]) -> torch.Tensor:
        """The tokens of the given ring columns, (b, len(cols)) long on the CPU (one device sync)."""
        out = self._columns(cols)
        return out.cpu() if out.is_cuda else out.clone()  # never a view of the ring, which later steps overwrite

    def _columns(self, cols: Sequence[int]) -> torch.Tensor:
        """The ring's columns ``cols``, (b, len(cols)) on the device, queued without waiting: a Python list as an
        index would be copied to the device by a blocking copy, which waits for every step queued before it."""
        cols = list(cols)
        if cols and cols == list(range(cols[0], cols[0] + len(cols))):
            return self.state.out[:, cols[0] : cols[0] + len(cols)]
        index = torch.tensor(cols, dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        return self.state.out.index_select(1, index)

    def read_later(self, cols: Sequence[int]) -> Callable[[], torch.Tensor]:
        """:meth:`read` without waiting now: the copy is queued behind the steps, and the returned function waits
        for it alone (not for steps queued after it), so the host can work on these tokens while the device runs
        the next steps."""
        out = self._columns(cols)
        if self.device.type != "cuda":
            host = out.clone()
            return lambda: host
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def wait() -> torch.Tensor:
            copied.synchronize()
            return host

        return wait


class Decoder:
    """Generation for one model that keeps its decode buffers — a :class:`DecodeBatch`: KV cache, step state and the
    captured CUDA graphs — from one call to the next (chat turns, eval batches), so a step is captured once per batch
    size, cache bucket (prompt + new tokens, rounded up to ``cache_multiple``) and sampling kind, not per call.

    Holds at most ``max_entries`` batches (the oldest dropped). Only for the model it was made for, unchanged.
    ``decode="compiled"``: the step goes through ``torch.compile`` (``compile_backend``) and, on CUDA, is then captured
    as a graph; the first generation of each shape pays the compilation (tens of seconds for a 6B model).
    ``matvec``: how a step multiplies a one-row input by a weight (``MATVEC_MODES``, :func:`resolve_matvec`);
    ``attention``: how a step attends over its cache (``ATTENTION_MODES``, :func:`resolve_attention`)."""

    def __init__(self, model: nn.Module, *, decode: str = "auto", cache_multiple: int = 64, max_entries: int = 4,
                 compile_backend: str = "inductor", matvec: str = "auto", attention: str = "auto") -> None:  # fmt: skip
        self.model = model
        self.device, self.dtype = _model_device_dtype(model)
        self.decode = resolve_decode(decode, self.device)
        self.compile_backend = compile_backend if self.decode == "compiled" else None
        self.matvec = resolve_matvec(matvec, self.device, self.decode)
        self.attention = resolve_attention(attention, self.device)
        self.cache_multiple = cache_multiple
        self.max_entries = max_entries
        self._batches: dict[tuple, DecodeBatch] = {}
        self.steps = 0  # decode steps queued by stream() so far (a stream left early has queued one group ahead)

    def batch(self, b: int, max_len: int, *, n_stop: int, top_k: int = 0, repetition_penalty: float = 1.0,
              ring: int = 8, window_multiple: int | None = None) -> DecodeBatch:  # fmt: skip
        """A :class:`DecodeBatch` of this model in this Decoder's decode mode, kept for the next call alike
        (``window_multiple`` None: every step attends over the whole cache)."""
        key = (b, max_len, n_stop, top_k, repetition_penalty, ring, window_multiple)
        rope = self.model._rope_table(0, self.dtype, self.device)
        batch = self._batches.pop(key, None)
        if batch is not None and batch.rope is rope:  # a regrown rotary table would leave the graphs stale
            self._batches[key] = batch  # most recent last
            return batch
        while len(self._batches) >= self.max_entries:
            self._batches.pop(next(iter(self._batches)))
        batch = DecodeBatch(self.model, b, max_len, n_stop=n_stop, decode=self.decode,
                            compile_backend=self.compile_backend, ring=ring,
                            window_multiple=window_multiple or max_len + self.model.n_prefix(), top_k=top_k,
                            repetition_penalty=repetition_penalty, matvec=self.matvec,
                            attention=self.attention)  # fmt: skip
        self._batches[key] = batch
        return batch

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: GenerationConfig,
        *,
        stop_ids: Sequence[int],
        pad_id: int,
        row_seeds: Sequence[int] | None = None,
        stream_every: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """See :func:`generate_stream`."""
        cfg.validate()
        if not prompts:
            raise ValueError("no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if not p)} is empty")
        b, s = len(prompts), max(len(p) for p in prompts)
        cache_len = -(-(s + cfg.max_new_tokens) // self.cache_multiple) * self.cache_multiple
        if stream_every is None:
            stream_every = 4 if self.device.type == "cuda" else 1
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = list(row_seeds) if row_seeds is not None else [seed] * b
        if len(seeds) != b:
            raise ValueError(f"row_seeds has {len(seeds)} seeds for {b} prompts")
        stop = sorted(set(stop_ids))
        batch = self.batch(b, cache_len, n_stop=len(stop), top_k=cfg.top_k,
                           repetition_penalty=cfg.repetition_penalty, ring=stream_every)  # fmt: skip
        batch.reset()
        batch.set_stop(stop)
        admissions = [Admission(p, RowSampling.of(cfg, int(x)), cfg.max_new_tokens)
                      for p, x in zip(prompts, seeds, strict=True)]  # fmt: skip
        first = batch.prefill(range(b), admissions)
        yield torch.tensor(first, dtype=torch.long)
        step, n = 1, cfg.max_new_tokens
        if all(t < 0 for t in first):
            return
        # Each group of steps is queued before the previous group's tokens are waited for, so the device never idles
        # while the host reads them (once every row has stopped, the group queued meanwhile runs as padding).
        pending: Callable[[], torch.Tensor] | None = None
        while pending is not None or step < n:
            queued = None
            if step < n:
                k = min(stream_every, n - step)
                queued = batch.read_later(batch.step(k))
                step += k
                self.steps += k
            if pending is not None:
                out = pending()
                for j in range(out.shape[1]):
                    yield out[:, j]
                if bool((out[:, -1] < 0).all()):
                    return
            pending = queued


def resolve_decode(decode: str, device: torch.device) -> str:
    """The decode mode ``decode`` ("auto": graph on CUDA, else eager) stands for on ``device``."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode if decode != "auto" else ("graph" if device.type == "cuda" else "eager")


def resolve_matvec(matvec: str, device: torch.device, decode: str) -> str:
    """The matrix-vector path ``matvec`` stands for on ``device`` with the (resolved) ``decode`` mode: "auto" is
    "triton" on CUDA where Triton imports, else "torch"; "inductor" needs decode="compiled"."""
    if matvec not in MATVEC_MODES:
        raise ValueError(f"matvec must be one of {', '.join(MATVEC_MODES)}, got {matvec!r}")
    if matvec == "inductor" and decode != "compiled":
        raise ValueError('matvec="inductor" is inductor\'s own kernel: it needs decode="compiled"')
    if matvec != "auto":
        return matvec
    return "triton" if _triton_kernels(device, "glmtune.models.gemv") else "torch"


def resolve_attention(attention: str, device: torch.device) -> str:
    """The cache attention ``attention`` stands for on ``device``: "auto" is "triton" on CUDA where Triton imports,
    else "sdpa"."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if attention != "auto":
        return attention
    return "triton" if _triton_kernels(device, "glmtune.models.decode_attention") else "sdpa"


def _triton_kernels(device: torch.device, module: str) -> bool:
    """Whether ``module``'s Triton kernels serve ``device``: CUDA, and Triton present (the module imports)."""
    if device.type != "cuda":
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def generate_stream(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    decode: str = "auto",
    row_seeds: Sequence[int] | None = None,
    stream_every: int | None = None,
    decoder: Decoder | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (b,) long on CPU, until each row has stopped or max_new_tokens.

    A row that has stopped keeps yielding ``-1``; the stop token itself is not yielded.
    decode: "eager" (each step op by op), "graph" (each step replayed as one CUDA graph: removes the kernel launch
    cost that bounds small-batch decoding), "compiled" (the step fused by torch.compile, then captured), "auto"
    (graph on CUDA, else eager). All give the same tokens.
    row_seeds: one sampling seed per prompt (default: every row uses ``cfg.seed``), e.g. seed + example index so
    examples of one batch draw independently while each row still gives what it gives alone with its seed.
    stream_every: steps between copies of the new tokens to the host (default 1 on the CPU, 4 on CUDA).
    decoder: a :class:`Decoder` of this model to reuse buffers and captured steps from (``decode`` is then its own).
    """
    decoder = decoder if decoder is not None else Decoder(model, decode=decode)
    return decoder.stream(prompts, cfg, stop_ids=stop_ids, pad_id=pad_id, row_seeds=row_seeds,
                          stream_every=stream_every)  # fmt: skip


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    on_token: Callable[[torch.Tensor], None] | None = None,
    decode: str = "auto",
    row_seeds: Sequence[int] | None = None,
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts; returns each row's new tokens (stop token excluded)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(
        model, prompts, cfg, stop_ids=stop_ids, pad_id=pad_id, decode=decode, row_seeds=row_seeds, decoder=decoder
    ):
        if on_token is not None:
            on_token(step)
        for i, t in enumerate(step.tolist()):
            if t >= 0:
                outputs[i].append(t)
    return outputs
