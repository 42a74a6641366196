"""Attention pieces shared by both architecture families: the KV cache and the attention call.

Layouts: queries (b, n_head, s, d); keys/values (b, n_kv, t, d). Masks come from :mod:`glmtune.models.masks`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.models.masks import ALL, AttentionMask, dense_from_runs


class KVCache(nn.Module):
    """Static key/value buffers for every layer, indexed by slot: (layers, b, n_kv, max_len, d) each.

    Tokens are written to the slots their layout names (``write``), so a decode step has fixed shapes and can be
    captured as a CUDA graph: the slot is a device tensor, never a Python number. Beside the keys the cache keeps,
    per row and slot, what the mask builder needs: the segment of the key there (``-1`` = empty, ``masks.ALL`` = a
    P-Tuning prefix key, which occupies the first slots) and whether it is in its sample's bidirectional context.
    ``length`` counts the slots filled in order, for callers that let the cache pick the next free slots.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("segments", torch.full((batch_size, max_len), -1, dtype=torch.long, device=device),
                             persistent=False)  # fmt: skip
        self.register_buffer("context", torch.zeros((batch_size, max_len), dtype=torch.bool, device=device),
                             persistent=False)  # fmt: skip
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None], persistent=False)
        self.max_len = max_len
        self.length = 0  # slots 0 .. length-1 were filled in order (by next_slots)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        """Empty every slot (the buffers stay: a captured decode step keeps pointing at them)."""
        self.segments.fill_(-1)
        self.context.fill_(False)
        self.length = 0

    def next_slots(self, s: int) -> torch.Tensor:
        """The next ``s`` free slots of every row, (b, s); advances ``length``."""
        start, end = self.length, self.length + s
        if end > self.max_len:
            raise RuntimeError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.length = end
        return torch.arange(start, end, device=self.keys.device).expand(self.batch_size, s)

    def write_tokens(self, slots: torch.Tensor, segments: torch.Tensor, context: torch.Tensor | None) -> None:
        """Record the segment/context of the tokens going to ``slots`` (b, s)."""
        _write_tokens(self, self.rows, slots, segments, context)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (b, n_kv, s, d) at ``slots`` (b, s); returns this layer's whole buffers (b, n_kv, max_len, d)."""
        _write_keys(self, layer, self.rows, k, v, slots)
        return self.keys[layer], self.values[layer]

    def view(self, rows: torch.Tensor | None = None, length: int | None = None) -> KVCacheView:
        """The cache seen through some of its rows (``rows`` (r,) long, for a prefill of joining rows) and/or its
        first ``length`` slots (a decode step attending over the slots in use only); writes go to this cache."""
        return KVCacheView(self, rows, length)

    def reset_rows(self, rows: torch.Tensor, start: int) -> None:
        """Empty slots ``start ..`` of ``rows`` (r,) (a row that takes a new sequence keeps its P-Tuning prefix)."""
        self.segments[rows, start:] = -1
        self.context[rows, start:] = False

    def write_prefix(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put P-Tuning keys/values (one (b, n_kv, P, d) pair per layer) in the first P slots, seen by every query."""
        n = prefix[0][0].shape[2]
        slots = self.next_slots(n)
        for i, (k, v) in enumerate(prefix):
            self.write(i, k, v, slots)
        self.write_tokens(slots, torch.full_like(slots, ALL), torch.ones_like(slots, dtype=torch.bool))


def _write_tokens(cache: KVCache, rows: torch.Tensor, slots: torch.Tensor, segments: torch.Tensor,
                  context: torch.Tensor | None) -> None:  # fmt: skip
    cache.segments[rows, slots] = segments
    # tensors on the device only: a Python scalar would be a host copy, which a CUDA graph cannot capture
    cache.context[rows, slots] = context if context is not None else torch.zeros_like(slots, dtype=torch.bool)


def _write_keys(cache: KVCache, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slots: torch.Tensor) -> None:  # fmt: skip
    cache.keys[layer][rows, :, slots] = k.transpose(1, 2)
    cache.values[layer][rows, :, slots] = v.transpose(1, 2)


class KVCacheView:
    """Rows and/or the first slots of a :class:`KVCache`, with the surface the models and the mask builder use
    (``write``, ``write_tokens``, ``segments``, ``context``, ``max_len``). Writes land in the cache itself.

    All rows: the keys, values and slot records are views of the cache's buffers (no copy: a captured decode step
    over a window keeps pointing at the cache). Some rows: they are gathered when read (a prefill's copy)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor | None, length: int | None) -> None:
        self.cache = cache
        self.max_len = cache.max_len if length is None else min(length, cache.max_len)
        self.index = rows  # (r,) long or None: every row
        self.rows = cache.rows if rows is None else rows[:, None]
        self.length = cache.length

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size if self.index is None else self.index.shape[0]

    def _read(self, t: torch.Tensor) -> torch.Tensor:  # (b, max_len) slot records
        return t[:, : self.max_len] if self.index is None else t[self.index, : self.max_len]

    @property
    def segments(self) -> torch.Tensor:
        return self._read(self.cache.segments)

    @property
    def context(self) -> torch.Tensor:
        return self._read(self.cache.context)

    def write_tokens(self, slots: torch.Tensor, segments: torch.Tensor, context: torch.Tensor | None) -> None:
        _write_tokens(self.cache, self.rows, slots, segments, context)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _write_keys(self.cache, layer, self.rows, k, v, slots)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.index is not None:
            keys, values = keys[self.index], values[self.index]
        return keys[:, :, : self.max_len], values[:, :, : self.max_len]


@dataclass(frozen=True)
class KVRepeat:
    """How K/V heads are repeated to every query head for a flash kernel that takes no grouped heads (varlen on
    torch < 2.13). ``recompute``: under ``torch.compile`` the repeat is checkpointed, so the compiled backward keeps
    the grouped heads and repeats them again instead of saving the copies (:func:`kv_for_flash`); ``fused``: the
    repeat as glmtune's Triton ops (``models/repeat_kv.py``) instead of expand + reshape."""

    recompute: bool = False
    fused: bool = False


def varlen_supported(device: torch.device | str) -> bool:
    """Whether flash attention over variable-length runs (``torch.nn.attention.varlen``) runs on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def repeats_kv_for_flash(device: torch.device | str) -> bool:
    """Whether compiled attention on ``device`` repeats grouped K/V heads for flash varlen (its varlen kernel takes
    no grouped heads before torch 2.13): where :class:`KVRepeat` matters at all."""
    return varlen_supported(device) and not _varlen_signature()[1]


@functools.cache
def _varlen_signature() -> tuple[bool, bool]:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return "window_size" in params, "enable_gqa" in params


@torch.compiler.assume_constant_result  # read once when traced, not traced into
def _varlen_api() -> tuple[bool, bool]:
    """(causal given as ``window_size=(-1, 0)`` (torch >= 2.11; 2.10: ``is_causal``), ``enable_gqa`` accepted)."""
    return _varlen_signature()


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   kv_repeat: KVRepeat = KVRepeat()) -> torch.Tensor:  # fmt: skip
    """Causal flash attention within the runs of ``mask.cu_seqlens`` (the tokens of all rows flattened)."""
    b, _, s, _ = q.shape
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return attend(q, k, v, dense_from_runs(mask, b, s))
    return _flash_varlen(q, k, v, mask, kv_repeat)


def repeat_kv_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """(T, n_kv, d) -> (T, n_head, d) in one copy: head h = kv * g + j reads key head kv (g = n_head / n_kv), the
    grouping flash and SDPA's ``enable_gqa`` use; the backward sums the g copies."""
    tokens, n_kv, d = t.shape
    return t[:, :, None].expand(tokens, n_kv, n_head // n_kv, d).reshape(tokens, n_head, d)


def _repeat_pair(k: torch.Tensor, v: torch.Tensor, n_head: int, fused: bool = False) -> tuple[torch.Tensor, ...]:
    if fused:  # glmtune's ops (models/repeat_kv.py): both in one kernel each way, the backward's group sum in one pass
        from glmtune.models.repeat_kv import repeat_kv_pair

        return repeat_kv_pair(k, v, n_head // k.shape[1])
    return repeat_kv_heads(k, n_head), repeat_kv_heads(v, n_head)


def kv_for_flash(k: torch.Tensor, v: torch.Tensor, n_head: int, repeat: KVRepeat = KVRepeat()
                 ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """K and V (T, n_kv, d) repeated to ``n_head`` heads for an attention kernel that takes no grouped heads.

    The kernel saves what it is given for its backward, so the copies (g times the K/V) stay alive to the backward.
    ``repeat.recompute``, under ``torch.compile``: the repeat runs inside ``torch.utils.checkpoint``, whose
    nodes the compiled graph tags for recomputation; the partitioner then keeps the n_kv heads and repeats them again
    in the backward (left alone, its min-cut keeps the copies: "materialized in backward"). Eagerly the option
    changes nothing (the kernel's autograd still saves its inputs), so it is not applied there. ``repeat.fused``:
    the repeat as glmtune's Triton ops (``models/repeat_kv.py``) instead of expand + reshape."""
    if repeat.recompute and torch.compiler.is_compiling():
        # no RNG state read (nothing random inside; compiled checkpoints never fork the RNG either)
        return checkpoint(_repeat_pair, k, v, n_head, repeat.fused, use_reentrant=False, preserve_rng_state=False)
    return _repeat_pair(k, v, n_head, repeat.fused)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                  kv_repeat: KVRepeat = KVRepeat()) -> torch.Tensor:  # fmt: skip
    """``varlen_attn`` called as this torch's signature wants it; q (b, h, s, d), k, v (b, n_kv, s, d)."""
    from torch.nn.attention.varlen import varlen_attn

    b, n_head, s, d = q.shape
    n_kv = k.shape[1]
    window, gqa = _varlen_api()
    kwargs: dict = {"window_size": (-1, 0)} if window else {"is_causal": True}
    # (b, heads, s, d) -> (b * s, heads, d): free when the projections were viewed as (b, s, heads, d)
    qf, kf, vf = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    if n_kv != n_head:
        if gqa:
            kwargs["enable_gqa"] = True
        else:  # one copy each (flash takes the heads grouped only from torch 2.13 on)
            kf, vf = kv_for_flash(kf, vf, n_head, kv_repeat)
    cu = mask.cu_seqlens
    out = varlen_attn(qf, kf, vf, cu, cu, mask.max_len, mask.max_len, **kwargs)  # (b * s, n_head, d)
    return out.reshape(b, s, n_head, d).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, *,
           kv_repeat: KVRepeat = KVRepeat()) -> torch.Tensor:  # fmt: skip
    """Scaled dot-product attention with grouped KV heads. q (b, h, s, d); k, v (b, n_kv, t, d) -> (b, h, s, d).

    ``kv_repeat``: how K/V heads are repeated for flash's varlen kernel where it takes no grouped heads
    (torch < 2.13; :class:`KVRepeat`, :func:`kv_for_flash`): whether a compiled backward gets the copies (the
    default) or the grouped heads, repeated again (``recompute``), and whether glmtune's Triton ops repeat them
    (``fused``). Every other path ignores it."""
    n_head = q.shape[1]
    if mask.cu_seqlens is not None:
        return _attend_varlen(q, k, v, mask, kv_repeat)
    if mask.block is not None:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask.block, enable_gqa=k.shape[1] != n_head)
    if mask.dense is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != n_head)
    n_kv = k.shape[1]
    if n_kv == n_head:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    # Grouped KV under a mask: fold each group's query heads into the query length instead of copying the keys
    # and values to every head (the copy would be (b, n_head, t, d) per layer and step).
    b, _, s, d = q.shape
    g = n_head // n_kv
    qg = q.reshape(b, n_kv, g * s, d)  # heads h = kv * g + j, so (kv, j, s) -> (kv, j * s + s)
    m = mask.dense[:, :, None].expand(b, 1, g, s, mask.dense.shape[-1]).reshape(b, 1, g * s, -1)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=m).reshape(b, n_head, s, d)
