"""Token generation: one decode path over a slot-indexed KV cache, sampling on the device, streaming.

Works for both model families through their common surface: ``new_cache``, ``reserve_positions`` and ``forward``
with a :class:`~glmtune.models.layout.SequenceLayout` (``layout.prompt_layout`` places the prompts).

Prompts are left-padded into slots after the P-Tuning prefix; each decode step writes its token to the next slot
and attends over the whole cache through the mask builder, so every step has the same shapes. ``decode="graph"``
captures that step — forward, logits processing, sampling and the state update — as one CUDA graph and replays
it; ``"eager"`` runs the very same step op by op (the CPU path, and what the tests compare against).

Sampling never leaves the device: a row's draw is ``argmax(logits + Gumbel noise)`` (exactly a draw from the
softmax), the noise a counter-based hash of (row seed, step, token), so a row draws what it draws alone whatever
its batch, with no per-row generator and no host round trip. Tokens are copied to the host every
``stream_every`` steps and yielded one step at a time (a small lag).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glmtune.models.layout import SequenceLayout, next_positions, prompt_layout

DECODE_MODES = ("auto", "eager", "graph", "compiled")


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


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
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


def choose_next(
    logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Next token per row from float32 logits (b, V) -> (b,); sampling draws with the rows' seeds at ``step``."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return (logits + gumbel_noise(seeds, step, logits.shape[-1])).argmax(dim=-1)


# ---- the loop ---------------------------------------------------------------------------------------------------
class DecodeState:
    """What one decode step reads and updates in place, on the device (so a captured step can be replayed).

    Allocated once per batch shape and reloaded for every generation (``load``), so a captured step stays valid."""

    def __init__(self, b: int, vocab: int, n_stop: int, position_shape: tuple[int, ...], max_new_tokens: int,
                 device: torch.device) -> None:  # fmt: skip
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.ids = longs(b, 1)  # the token fed to the next step
        self.positions = longs(*position_shape)  # (b, 1) | (b, 2, 1): its position
        self.slots = longs(b, 1)  # its cache slot
        self.seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)  # for the repetition penalty
        self.seeds = longs(b)
        self.stop = longs(n_stop)
        self.step = longs()  # steps done (the prompt's forward was step 0)
        self.done = torch.zeros((b,), dtype=torch.bool, device=device)
        self.out = longs(b, max_new_tokens)  # the chosen tokens, -1 once a row stopped
        self.segments = longs(b, 1)
        self.rows = torch.arange(b, device=device)
        self.true = torch.ones((b,), dtype=torch.bool, device=device)

    def load(self, first: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor,
             seeds: torch.Tensor, stop: torch.Tensor) -> None:  # fmt: skip
        """Start a generation whose prompt's forward chose ``first`` (b,)."""
        self.ids.copy_(first[:, None])
        self.positions.copy_(positions)
        self.slots.copy_(slots)
        self.seen.copy_(seen)
        self.seeds.copy_(seeds)
        self.stop.copy_(stop)
        self.step.fill_(1)
        self.done.copy_(self._stopped(first))
        self.out.fill_(-1)
        self.out[:, 0] = torch.where(self.done, -1, first)

    def _stopped(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, None] == self.stop[None, :]).any(-1)

    def record(self, next_ids: torch.Tensor) -> None:
        """Store the chosen tokens at column ``step`` and move every input on by one token."""
        self.done |= self._stopped(next_ids)
        self.out.index_copy_(1, self.step[None], torch.where(self.done, -1, next_ids)[:, None])
        self.seen[self.rows, next_ids] = self.true  # a device tensor: a CUDA graph captures no host copy
        self.ids.copy_(next_ids[:, None])
        self.positions.copy_(next_positions(self.positions))
        self.slots += 1
        self.step += 1


class DecodeStep:
    """One decode step with fixed shapes: forward one token per row at its slot, choose the next, update the state.

    ``use_graph``: capture the step as a CUDA graph on its first call and replay it after (CUDA only).
    ``compile_backend``: run the step through ``torch.compile`` with this backend first (fusing the hundreds of small
    elementwise kernels of a step; the compiled step is what the graph captures)."""

    def __init__(self, model: nn.Module, cache: Any, state: DecodeState, cfg: GenerationConfig, max_position: int,
                 *, use_graph: bool, compile_backend: str | None = None) -> None:  # fmt: skip
        self.model, self.cache, self.state, self.cfg = model, cache, state, cfg
        self.max_position = max_position
        self.graph: Any = None
        self.use_graph = use_graph and state.ids.device.type == "cuda"
        self._step = self._run if compile_backend is None else torch.compile(self._run, backend=compile_backend,
                                                                             dynamic=False)  # fmt: skip

    def _run(self) -> None:
        st = self.state
        layout = SequenceLayout(st.positions, st.segments, None, st.slots, max_position=self.max_position)
        logits = self.model(st.ids, cache=self.cache, layout=layout)[:, -1].float()
        st.record(choose_next(logits, self.cfg, st.seen, st.seeds, st.step))

    def __call__(self) -> None:
        if not self.use_graph:
            self._step()
        elif self.graph is None:
            # Warm up on a side stream (this runs the real step), then capture the step it will replay. The capture
            # itself runs nothing, so it must not advance the state: it is recorded from the state as it is now.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        else:
            self.graph.replay()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@dataclass
class _Slot:
    cache: Any
    state: DecodeState
    step: DecodeStep
    rope: Any  # the rotary table the step was captured with


class Decoder:
    """Generation for one model that keeps its decode buffers — KV cache, step state and the captured CUDA graph —
    from one call to the next (chat turns, eval batches, a server), so the step is captured once per batch size,
    cache bucket (prompt + new tokens, rounded up to ``cache_multiple``) and sampling setting, not per call.

    Holds at most ``max_entries`` of them (the oldest dropped). Only for the model it was made for, unchanged.
    ``decode="compiled"``: the step goes through ``torch.compile`` (``compile_backend``) and, on CUDA, is then captured
    as a graph; the first generation of each shape pays the compilation (tens of seconds for a 6B model)."""

    def __init__(self, model: nn.Module, *, decode: str = "auto", cache_multiple: int = 64, max_entries: int = 4,
                 compile_backend: str = "inductor") -> None:  # fmt: skip
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.model = model
        self.device, self.dtype = _model_device_dtype(model)
        self.decode = decode if decode != "auto" else ("graph" if self.device.type == "cuda" else "eager")
        self.compile_backend = compile_backend if self.decode == "compiled" else None
        self.cache_multiple = cache_multiple
        self.max_entries = max_entries
        self._slots: dict[tuple, _Slot] = {}

    def _slot(self, key: tuple, b: int, cache_len: int, n_stop: int, cfg: GenerationConfig) -> _Slot:
        model = self.model
        rope = model._rope_table(0, self.dtype, self.device)
        slot = self._slots.pop(key, None)
        if slot is not None and slot.rope is rope:  # a regrown rotary table would leave the graph stale
            self._slots[key] = slot  # most recent last
            return slot
        while len(self._slots) >= self.max_entries:
            self._slots.pop(next(iter(self._slots)))
        cache = model.new_cache(b, cache_len, device=self.device, dtype=self.dtype)
        shape = (b, 2, 1) if model.config.arch == "glm" else (b, 1)
        state = DecodeState(b, model.config.padded_vocab_size, n_stop, shape, cfg.max_new_tokens, self.device)
        step = DecodeStep(model, cache, state, cfg, 0, use_graph=self.decode in ("graph", "compiled"),
                          compile_backend=self.compile_backend)  # fmt: skip
        self._slots[key] = slot = _Slot(cache, state, step, rope)
        return slot

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
        model, device = self.model, self.device
        n_prefix = model.n_prefix()
        input_ids, layout = prompt_layout(prompts, model.config, pad_id, start_slot=n_prefix)
        b, s = input_ids.shape
        input_ids, layout = input_ids.to(device), layout.to(device)
        cache_len = -(-(s + cfg.max_new_tokens) // self.cache_multiple) * self.cache_multiple
        # the rotary table covers every position the cache can hold, so it is built before any capture
        model.reserve_positions(max(layout.max_position, s) + cache_len + 1, self.dtype, device)
        if stream_every is None:
            stream_every = 4 if device.type == "cuda" else 1

        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        seeds = list(row_seeds) if row_seeds is not None else [seed] * b
        if len(seeds) != b:
            raise ValueError(f"row_seeds has {len(seeds)} seeds for {b} prompts")
        seeds_t = torch.tensor([int(x) for x in seeds], dtype=torch.long, device=device)
        seen = torch.zeros((b, model.config.padded_vocab_size), dtype=torch.bool, device=device)
        if cfg.repetition_penalty != 1.0:  # the prompt's real tokens (padding points at the row's last token)
            seen.scatter_(1, torch.where(layout.segments >= 0, input_ids, input_ids[:, -1:]), True)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

        key = (b, cache_len, len(stop), cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k,
               cfg.repetition_penalty)  # fmt: skip
        slot = self._slot(key, b, cache_len, len(stop), cfg)
        cache, state = slot.cache, slot.state
        cache.reset()
        if n_prefix:
            cache.write_prefix(model.prefix_key_values(b, dtype=self.dtype, device=device))
        logits = model(input_ids, cache=cache, layout=layout, logits_to_keep=1)[:, -1].float()
        first = choose_next(logits, cfg, seen, seeds_t, torch.zeros((), dtype=torch.long, device=device))
        seen[torch.arange(b, device=device), first] = True
        state.load(first, next_positions(layout.positions[..., -1:]), layout.slots[:, -1:] + 1, seen, seeds_t, stop)
        shown = 0
        for step in range(1, cfg.max_new_tokens + 1):
            if step == cfg.max_new_tokens or step % stream_every == 0:
                out, done = state.out[:, shown:step].cpu(), bool(state.done.all())
                for j in range(out.shape[1]):
                    yield out[:, j]
                shown = step
                if done or step == cfg.max_new_tokens:
                    return
            slot.step()


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
