"""The one mask builder: a :class:`~glmtune.models.layout.SequenceLayout` (and the KV cache's slots) -> what the
attention backend takes.

One rule decides who sees whom. Every key has a segment (the sample it belongs to; ``-1`` = padding or an empty
cache slot; ``ALL`` = a P-Tuning prefix key, seen by every query), an order (its index in the row, or its cache
slot) and a context flag (v1: inside its sample's bidirectional prompt). A query sees a key when the key is a
prefix key, or when both belong to the same sample and the key comes no later than the query or lies in the
sample's context. A padding query sees every key: its output is never read, and no softmax row is empty.

Four forms of the same rule:
- the causal fast path (nothing to mask but the future: one unpadded sample per row, no prefix, no cache): SDPA's
  ``is_causal``, which runs flash attention;
- a dense bool mask (b, 1, s, t) for SDPA (the CPU, the tests, decode steps);
- a FlexAttention ``BlockMask`` (packed rows, v1's bidirectional prompts, P-Tuning prefixes on the GPU), whose
  kernels skip the blocks the rule hides. It only pays off under ``torch.compile``;
- variable-length runs (backend "varlen": packed causal rows without v1 context, prefix or cache, i.e. the training
  rows of v2/v3/GLM-4): the (b, s) tokens flattened, cut where the segment changes or a row starts, as flash
  attention's ``cu_seqlens``. Each run attends causally to itself; a padding run is a run of its own (its outputs
  are never read). Exact when every sample's tokens are contiguous in its row (collated rows always are; a sample
  split by padding would become two runs). Every other masked layout takes the flex form under this backend. The
  collator's runs come with a bound on their lengths known on the host (``packed_runs``/``run_bound``: flash's
  ``max_seqlen``, which sizes its grid); build_mask checks it on the device, the row width being the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from glmtune.models.layout import SequenceLayout

if TYPE_CHECKING:
    from glmtune.models.attention import KVCache

ALL = -2  # segment of keys every query sees (the P-Tuning prefix)
BACKENDS = ("sdpa", "flex", "varlen")
# Runs the varlen form can hold: b * s // VARLEN_MEAN_RUN + b (each row's samples averaging at least this many tokens,
# plus a padding run per row). Flash attention's backward allocates 128 float rows per run (dq accumulator), so the
# bound costs memory: b=4, s=1024, 32 heads, d=128 -> 260 runs, ~0.6 GB transient. A batch with more runs stops
# on a device-side assert (never silently wrong); a larger bound is a ``max_runs`` argument away.
VARLEN_MEAN_RUN = 16


@dataclass
class AttentionMask:
    """What ``attention.attend`` takes: nothing (causal fast path), a dense bool mask or a FlexAttention BlockMask."""

    dense: torch.Tensor | None = None  # bool (b, 1, s, t), True = may attend
    block: Any = None  # torch.nn.attention.flex_attention.BlockMask
    cu_seqlens: torch.Tensor | None = None  # int32 (n_max + 1,): run starts in the flattened (b * s) tokens, then b * s
    max_len: int = 0  # with cu_seqlens: a bound on a run's length (the row width s, or the collator's run_bound)

    @property
    def causal(self) -> bool:
        return self.dense is None and self.block is None and self.cu_seqlens is None


def visible(q_seg, q_ord, k_seg, k_ord, k_ctx):  # broadcastable tensors -> bool
    """The rule (see the module docstring); works elementwise, so the dense and the flex forms share it."""
    same = (q_seg == k_seg) & (k_seg >= 0)
    return (k_seg == ALL) | (same & ((k_ord <= q_ord) | k_ctx)) | (q_seg < 0)


def varlen_max_runs(b: int, s: int) -> int:
    """The default number of runs the varlen form of a (b, s) batch holds (see ``VARLEN_MEAN_RUN``)."""
    return b * s // VARLEN_MEAN_RUN + b


def _run_starts(segments: torch.Tensor) -> torch.Tensor:
    """(b * s,) bool: a run starts at every row start and wherever the segment differs from the previous token's."""
    first = torch.ones((segments.shape[0], 1), dtype=torch.bool, device=segments.device)
    return torch.cat([first, segments[:, 1:] != segments[:, :-1]], dim=1).reshape(-1)


def packed_cu_seqlens(segments: torch.Tensor, max_runs: int | None = None) -> torch.Tensor:
    """Segments (b, s) of packed causal rows -> cu_seqlens, int32 (max_runs + 1,), on their device.

    A run starts at every row start and wherever the segment differs from the previous token's. Fixed shape, no
    host sync (a compiled step with ``dynamic=False``, a CUDA graph): the starts are padded with ``b * s``, i.e.
    zero-length runs at the end, and a batch with more than ``max_runs`` runs trips a device-side assert."""
    b, s = segments.shape
    max_runs = varlen_max_runs(b, s) if max_runs is None else max_runs
    return _cu_seqlens(_run_starts(segments), max_runs)


def _cu_seqlens(starts: torch.Tensor, max_runs: int) -> torch.Tensor:
    """Run starts (n,) bool -> cu_seqlens int32 (max_runs + 1,): the starts, then n for the unused runs and the end."""
    n = starts.numel()
    torch._assert_async(starts.sum() <= max_runs, "packed rows hold more runs than the varlen mask's max_runs")
    idx = torch.nonzero_static(starts, size=max_runs, fill_value=n)[:, 0]  # (max_runs,) long
    return F.pad(idx, (0, 1), value=n).to(torch.int32)


COLLATED_MEAN_RUN = 64  # the collator's capacity for (b, s) rows: b * s // 64 + b runs, unless the batch holds more


def run_capacity(n_runs: int, b: int, s: int) -> int:
    """The varlen form's capacity for a (b, s) batch of ``n_runs`` runs: ``b * s // COLLATED_MEAN_RUN + b`` (one
    shape per batch shape: the compiled blocks and the CUDA graphs see no new shapes), or, for a batch of shorter
    samples, the next power of two that holds them (few shapes). Each zero-length run still costs flash's backward
    (measured at 4 x 1024: 33 runs 1.03 ms, 260 runs 1.55 ms a layer, bench/attention_speed.py)."""
    base = max(16, b * s // COLLATED_MEAN_RUN + b)
    return base if n_runs <= base else 1 << (n_runs - 1).bit_length()


RUN_BLOCK = 128  # run bounds are multiples of flash attention's query block (its grid: blocks of the bound x runs)


def run_bound(longest: int, s: int) -> int:
    """The bound on run lengths (flash's ``max_seqlen``) for rows of width ``s`` whose longest sample has ``longest``
    tokens: ``RUN_BLOCK`` x (1, 2, 3, 4, 6, 8, 12, ...) at least ``longest``, or ``s`` when that bound would be
    more than half the row (few values per width: each is a compiled variant and a CUDA graph of the blocks).

    Flash attention over runs launches ``ceil(bound / block)`` programs per run and head, most of which return at
    once when the runs are short (ADGEN samples of ~130-300 tokens in rows of 1024)."""
    blocks = max(1, -(-longest // RUN_BLOCK))
    p = 1 << (blocks - 1).bit_length()  # the power of two >= blocks; 3/4 of it when that still holds them
    blocks = 3 * p // 4 if p >= 4 and blocks <= 3 * p // 4 else p
    bound = RUN_BLOCK * blocks
    return s if 2 * bound > s else bound


def packed_runs(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, bound on the run lengths) of packed causal rows whose segments (b, s) are on the host (the
    collator's). The bound is :func:`run_bound` of the longest sample; padding runs longer than it are cut into
    runs of at most the bound (their outputs are never read). The capacity is :func:`run_capacity` of the runs,
    so the device never needs the default's generous one."""
    b, s = segments.shape
    starts = _run_starts(segments)
    first = starts.nonzero()[:, 0]  # (runs,) run starts in the flattened tokens
    lengths = torch.diff(first, append=torch.tensor([b * s]))
    padding = segments.reshape(-1)[first] < 0
    real = lengths[~padding]
    bound = run_bound(int(real.max()) if real.numel() else 1, s)
    for start, n in zip(first[padding].tolist(), lengths[padding].tolist(), strict=True):
        starts[start : start + n : bound] = True  # a padding run -> pieces of at most ``bound`` tokens
    cu = _cu_seqlens(starts, run_capacity(int(starts.sum()), b, s))
    if int(cu.diff().max()) > bound:  # the host check: a wrong bound would silently leave queries unattended
        raise AssertionError(f"a run is longer than its bound {bound}")
    return cu, bound


def _query_keys(layout: SequenceLayout, n_prefix: int, cache: KVCache | None, device: torch.device):
    """(q_seg, q_ord) (b, s) and (k_seg, k_ord, k_ctx) (b, t) for the layout's queries."""
    b, s = layout.shape
    q_seg = layout.segments if layout.segments is not None else torch.zeros((b, s), dtype=torch.long, device=device)
    if cache is not None:
        if layout.slots is None:
            raise ValueError("a layout attending over a KV cache needs its slots")
        t = cache.max_len
        k_ord = torch.arange(t, device=device).expand(b, t)
        return q_seg, layout.slots, cache.segments, k_ord, cache.context
    q_ord = torch.arange(s, device=device).expand(b, s)
    ctx = layout.context if layout.context is not None else torch.zeros((b, s), dtype=torch.bool, device=device)
    if not n_prefix:
        return q_seg, q_ord, q_seg, q_ord, ctx
    k_seg = torch.cat([torch.full((b, n_prefix), ALL, dtype=torch.long, device=device), q_seg], dim=1)
    k_ord = torch.cat([torch.full((b, n_prefix), -1, dtype=torch.long, device=device), q_ord], dim=1)
    k_ctx = torch.cat([torch.ones((b, n_prefix), dtype=torch.bool, device=device), ctx], dim=1)
    return q_seg, q_ord, k_seg, k_ord, k_ctx


def dense_from_runs(mask: AttentionMask, b: int, s: int) -> AttentionMask:
    """The varlen form (``mask.cu_seqlens`` over the b * s flattened tokens) as the dense form (b, 1, s, s): same run
    and not later. Where flash's varlen kernel cannot run (the CPU, float32)."""
    cu = mask.cu_seqlens
    tokens = torch.arange(b * s, dtype=cu.dtype, device=cu.device)
    run = torch.searchsorted(cu, tokens, right=True).reshape(b, s)  # run index + 1 of every token
    order = torch.arange(s, device=cu.device)
    return AttentionMask(dense=((run[:, :, None] == run[:, None, :]) & (order[None, :] <= order[:, None]))[:, None])


def takes_runs(backend: str, *, n_prefix: int = 0, cached: bool = False, context: bool = False) -> bool:
    """Whether :func:`build_mask` gives the varlen form (reading a batch's runs, ``layout.runs``/``max_run``): the
    "varlen" backend on packed causal rows without a P-Tuning prefix, a cache or v1's bidirectional context."""
    return backend == "varlen" and not cached and n_prefix == 0 and not context


def build_mask(
    layout: SequenceLayout,
    *,
    n_prefix: int = 0,
    cache: KVCache | None = None,
    backend: str = "sdpa",
    device: torch.device | str | None = None,
    max_runs: int | None = None,
) -> AttentionMask:
    """The attention mask of ``layout``'s queries over their keys: ``n_prefix`` P-Tuning keys then the layout's own
    tokens, or, with ``cache``, every slot of the cache (written before attending). ``max_runs``: the varlen form's
    capacity (default ``varlen_max_runs``)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device) if device is not None else layout.positions.device
    if cache is None and layout.segments is None and layout.context is None and n_prefix == 0:
        return AttentionMask()
    if takes_runs(backend, n_prefix=n_prefix, cached=cache is not None, context=layout.context is not None):
        segments = layout.segments  # (b, s); not None here (else the causal fast path above)
        s = segments.shape[1]
        if layout.runs is not None and max_runs is None:  # the collator's, sized to the batch
            bound = s if layout.max_run is None else layout.max_run
            if bound < s:  # flash would leave a longer run's later queries unattended: stop instead
                runs = layout.runs
                torch._assert_async((runs[1:] - runs[:-1]).max() <= bound, "a run is longer than layout.max_run")
            return AttentionMask(cu_seqlens=layout.runs, max_len=bound)
        return AttentionMask(cu_seqlens=packed_cu_seqlens(segments, max_runs), max_len=s)
    q_seg, q_ord, k_seg, k_ord, k_ctx = _query_keys(layout, n_prefix, cache, device)
    if backend in ("flex", "varlen"):
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(bi, hi, qi, ki):
            return visible(q_seg[bi, qi], q_ord[bi, qi], k_seg[bi, ki], k_ord[bi, ki], k_ctx[bi, ki])

        b, s = q_seg.shape
        block = create_block_mask(mask_mod, b, None, s, k_seg.shape[1], device=device)
        return AttentionMask(block=block)
    dense = visible(q_seg[:, :, None], q_ord[:, :, None], k_seg[:, None, :], k_ord[:, None, :], k_ctx[:, None, :])
    return AttentionMask(dense=dense[:, None])
