"""The one mask builder: a :class:`~glmtune.models.layout.SequenceLayout` (and the KV cache's slots) -> what the
attention backend takes.

One rule decides who sees whom. Every key has a segment (the sample it belongs to; ``-1`` = padding or an empty
cache slot; ``ALL`` = a P-Tuning prefix key, seen by every query), an order (its index in the row, or its cache
slot) and a context flag (v1: inside its sample's bidirectional prompt). A query sees a key when the key is a
prefix key, or when both belong to the same sample and the key comes no later than the query or lies in the
sample's context. A padding query sees every key: its output is never read, and no softmax row is empty.

Three forms of the same rule:
- the causal fast path (nothing to mask but the future: one unpadded sample per row, no prefix, no cache): SDPA's
  ``is_causal``, which runs flash attention;
- a dense bool mask (b, 1, s, t) for SDPA (the CPU, the tests, decode steps);
- a FlexAttention ``BlockMask`` (packed rows, v1's bidirectional prompts, P-Tuning prefixes on the GPU), whose
  kernels skip the blocks the rule hides. It only pays off under ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from glmtune.models.layout import SequenceLayout

if TYPE_CHECKING:
    from glmtune.models.attention import KVCache

ALL = -2  # segment of keys every query sees (the P-Tuning prefix)
BACKENDS = ("sdpa", "flex")


@dataclass
class AttentionMask:
    """What ``attention.attend`` takes: nothing (causal fast path), a dense bool mask or a FlexAttention BlockMask."""

    dense: torch.Tensor | None = None  # bool (b, 1, s, t), True = may attend
    block: Any = None  # torch.nn.attention.flex_attention.BlockMask

    @property
    def causal(self) -> bool:
        return self.dense is None and self.block is None


def visible(q_seg, q_ord, k_seg, k_ord, k_ctx):  # broadcastable tensors -> bool
    """The rule (see the module docstring); works elementwise, so the dense and the flex forms share it."""
    same = (q_seg == k_seg) & (k_seg >= 0)
    return (k_seg == ALL) | (same & ((k_ord <= q_ord) | k_ctx)) | (q_seg < 0)


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


def build_mask(
    layout: SequenceLayout,
    *,
    n_prefix: int = 0,
    cache: KVCache | None = None,
    backend: str = "sdpa",
    device: torch.device | str | None = None,
) -> AttentionMask:
    """The attention mask of ``layout``'s queries over their keys: ``n_prefix`` P-Tuning keys then the layout's own
    tokens, or, with ``cache``, every slot of the cache (written before attending)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device) if device is not None else layout.positions.device
    if cache is None and layout.segments is None and layout.context is None and n_prefix == 0:
        return AttentionMask()
    q_seg, q_ord, k_seg, k_ord, k_ctx = _query_keys(layout, n_prefix, cache, device)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(bi, hi, qi, ki):
            return visible(q_seg[bi, qi], q_ord[bi, qi], k_seg[bi, ki], k_ord[bi, ki], k_ctx[bi, ki])

        b, s = q_seg.shape
        block = create_block_mask(mask_mod, b, None, s, k_seg.shape[1], device=device)
        return AttentionMask(block=block)
    dense = visible(q_seg[:, :, None], q_ord[:, :, None], k_seg[:, None, :], k_ord[:, None, :], k_ctx[:, None, :])
    return AttentionMask(dense=dense[:, None])
