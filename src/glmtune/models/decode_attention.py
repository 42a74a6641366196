"""Attention for a few queries over a long key/value cache (decode steps), split over the keys: flash-decoding.

A decode step's attention has one query per row and head; with grouped KV heads ``attention.attend`` folds the g
query heads of a KV head into the query length, so the call is ``SDPA(q (b, H, L, d), k, v (b, H, t, d), mask (b, 1,
L, t) bool)`` with L = g (ChatGLM3: H = 2 KV heads, L = 16, d = 128) and t the cache window. Such a call is far too
small for a kernel that walks the keys in one program per head: ChatGLM3-6B's took 11.3 us a layer in cuDNN for
~0.4 MB of keys and values. Here the keys are cut into ``splits`` chunks, one program per (row, head, chunk): it
loads the L queries once, walks its chunk in ``BLOCK_T`` steps (each K/V tile read once for all L queries), keeps
a running max and sum (online softmax) and writes an unnormalised partial; a second kernel combines the partials
of a (row, head, query) with their maxima. One chunk writes the output directly (no second kernel). On an H200 a
ChatGLM3-6B decode step's attention (384 slots) takes 3.2 + 1.6 us a layer this way; 2-5x less than cuDNN at
batch 1-32 (bench/profile_decode.py --kernels, bench/RESULTS.md).

The mask is the dense bool mask of ``masks.build_mask`` (any broadcastable strides: read, never copied), so every
rule it encodes (cache slots in use, the row's own segment, a P-Tuning prefix in the first slots) holds. A query
that sees no key gets zeros (SDPA gives NaN there; the mask rule never makes such a row).

``decode_attention`` is a torch.library custom op with a fake implementation (traced by ``torch.compile``, captured
in CUDA graphs); :class:`DecodeAttentionMode` routes the ``F.scaled_dot_product_attention`` calls that fit
(``fits``) to it while a decode step is warmed up, compiled and captured. With ``TRITON_INTERPRET=1`` set before
the import, the kernels run on CPU tensors in Triton's interpreter (the CPU tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.overrides import TorchFunctionMode

DTYPES = (torch.bfloat16, torch.float16)  # routed by the mode (the kernel also takes float32: the tests)
MAX_QUERIES = 64  # queries per (row, head) the kernel holds at once (a decode step with GQA folded: g)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how the kernels below were built (at import)


# Only Triton builtins and the functions here are called inside the kernels (no tl.sum / tl.max / tl.zeros: those
# are compiled when Triton is imported, so a module imported later with TRITON_INTERPRET=1 could not call them).
@triton.jit
def _plus(a, b):
    return a + b


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr, H, L, T, chunk, scale,
                  sqb, sqh, sql, skb, skh, skt, svb, svh, svt, smb, smh, sml, smt, sob, soh, sol,
                  SPLIT: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
    """Program (row * H + head, c): the L queries of that row and head over keys [c * chunk, (c + 1) * chunk).

    SPLIT: write the running max m, sum l and the unnormalised output (fp32, (b*H, splits, BLOCK_M[, D])) for
    ``_combine_kernel``; else (one chunk) the output itself, (b, H, L, d) strided like q. F32_DOT: the products in
    float32 (float32 inputs; the interpreter, whose half-precision ``tl.dot`` is wrong in Triton 3.9)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    live = rows < L
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sql + dims[None, :], mask=live[:, None], other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_base = mask_ptr + b * smb + h * smh + rows[:, None] * sml
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, D), 0.0, tl.float32)
    start = c * chunk
    end = tl.minimum(start + chunk, T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside = t < end
        k = tl.load(k_base + t[:, None] * skt + dims[None, :], mask=inside[:, None], other=0.0)  # (BT, D)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        seen = tl.load(m_base + t[None, :] * smt, mask=live[:, None] & inside[None, :], other=0)  # (M, BT)
        s = tl.where(seen != 0, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _larger))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0, not NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # (M, BT) fp32
        l_i = l_i * alpha + tl.reduce(p, 1, _plus)
        v = tl.load(v_base + t[:, None] * svt + dims[None, :], mask=inside[:, None], other=0.0)  # (BT, D)
        if F32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:
        n_chunks = tl.num_programs(1)
        part = (bh * n_chunks + c) * BLOCK_M + rows  # (M,)
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(o_ptr + part[:, None] * D + dims[None, :], acc)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a query that saw nothing: zeros
        o = o_ptr + b * sob + h * soh + rows[:, None] * sol + dims[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=live[:, None])


@triton.jit
def _combine_kernel(part_ptr, m_ptr, l_ptr, o_ptr, H, L, n_chunks, sob, soh, sol, BLOCK_M: tl.constexpr,
                    BLOCK_S: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """Program (row * H + head, query): the chunks' partials rescaled to their common max and summed."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // H
    h = bh % H
    chunks = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D)
    have = chunks < n_chunks
    part = (bh * n_chunks + chunks) * BLOCK_M + r  # (S,)
    m = tl.load(m_ptr + part, mask=have, other=float("-inf"))
    l_c = tl.load(l_ptr + part, mask=have, other=0.0)
    m_all = tl.reduce(m, 0, _larger)
    w = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # (S,); a chunk that saw nothing: 0
    acc = tl.load(part_ptr + part[:, None] * D + dims[None, :], mask=have[:, None], other=0.0)  # (S, D)
    total = tl.reduce(w * l_c, 0, _plus)
    out = tl.reduce(acc * w[:, None], 0, _plus) / tl.where(total == 0.0, 1.0, total)  # (D,)
    tl.store(o_ptr + b * sob + h * soh + r * sol + dims, out.to(o_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeAttentionConfig:
    block_t: int = 64  # keys per step of a program
    min_chunk: int = 64  # keys per program at least (a multiple of block_t)
    programs: int = 128  # chunks are made small enough for about this many programs (b * H * splits), not smaller
    num_warps: int = 4


# Within 0.7 us of the best setting swept at batch 1/8/32 over 384/1024 keys on an H200 (bench/profile_decode.py
# --kernels); one program per head (no split) took 1.3-3.4x longer at batch 1-8.
DEFAULT = DecodeAttentionConfig()


def splits_for(b: int, h: int, t: int, config: DecodeAttentionConfig) -> tuple[int, int]:
    """(chunk, splits): keys per program (a multiple of ``block_t``) and chunks, so that ``b * h * splits`` is about
    ``config.programs`` with at least ``min_chunk`` keys a chunk."""
    want = max(1, config.programs // (b * h))
    chunk = max(config.min_chunk, -(-t // want))
    chunk = -(-chunk // config.block_t) * config.block_t
    return chunk, -(-t // chunk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
              config: DecodeAttentionConfig | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scale, keys hidden where ``mask`` is False) v for q (b, H, L, d), k, v (b, H, t, d), ``mask``
    bool broadcastable to (b, H, L, t); L <= ``MAX_QUERIES``, d a power of two >= 16 -> (b, H, L, d) like q."""
    b, h, n_q, d = q.shape
    t = k.shape[2]
    if k.shape != (b, h, t, d) or v.shape != k.shape or n_q > MAX_QUERIES or d < 16 or d & (d - 1):
        raise ValueError(f"decode attention takes q (b, H, <= {MAX_QUERIES}, d), k, v (b, H, t, d) with d a power of "
                         f"two >= 16; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    config = config or DEFAULT
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    m = mask.expand(b, h, n_q, t)  # strides 0 where it broadcasts: never copied
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    out = torch.empty((b, h, n_q, d), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_m = max(16, triton.next_power_of_2(n_q))
    chunk, splits = splits_for(b, h, t, config)
    f32_dot = q.dtype == torch.float32 or INTERPRETED
    if splits > 1:
        part = torch.empty((b * h, splits, block_m, d), dtype=torch.float32, device=q.device)
        m_part = torch.empty((b * h, splits, block_m), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    else:
        part, m_part, l_part = out, out, out  # pointers the kernel never reads
    o = part if splits > 1 else out
    _chunk_kernel[(b * h, splits)](q, k, v, m, o, m_part, l_part, h, n_q, t, chunk, scale, *q.stride()[:3],
                                   *k.stride()[:3], *v.stride()[:3], *m.stride(), *out.stride()[:3],
                                   SPLIT=splits > 1, F32_DOT=f32_dot, BLOCK_M=block_m, BLOCK_T=config.block_t, D=d,
                                   num_warps=config.num_warps)  # fmt: skip
    if splits > 1:
        _combine_kernel[(b * h, n_q)](part, m_part, l_part, out, h, n_q, splits, *out.stride()[:3], BLOCK_M=block_m,
                                      BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d,
                                      num_warps=4)  # fmt: skip
    return out


# ---- the custom op and the mode that routes F.scaled_dot_product_attention to it ----------------------------------
@torch.library.custom_op("glmtune::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`` for a few queries, ``mask`` bool."""
    return attention(q, k, v, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, mask, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def fits(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
         enable_gqa: bool = False) -> bool:  # fmt: skip
    """Whether an SDPA call with these arguments is one this kernel takes: a few queries (at most ``MAX_QUERIES`` a
    row and head) of plain CUDA half-precision tensors (b, H, L, d) over as many key heads, d a power of two >= 16,
    a bool mask, no dropout, not causal, no gradient wanted."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return (
        all(type(x) in plain for x in (q, k, v, attn_mask))
        and (q.is_cuda or INTERPRETED)
        and q.dtype in DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.dim() == 4
        and k.dim() == 4
        and q.shape[2] <= MAX_QUERIES
        and k.shape[:2] == q.shape[:2]
        and v.shape == k.shape
        and k.shape[3] == q.shape[3]
        and q.shape[3] >= 16
        and q.shape[3] & (q.shape[3] - 1) == 0
        and attn_mask.dtype == torch.bool
        and attn_mask.dim() == 4
        and _broadcasts(attn_mask.shape, (*q.shape[:3], k.shape[2]))
        and dropout_p == 0.0
        and not is_causal
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    )


def _broadcasts(shape: torch.Size, to: tuple[int, ...]) -> bool:
    return all(a in (1, b) for a, b in zip(shape, to, strict=True))


class DecodeAttentionMode(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` calls that ``fits`` run as :func:`decode_attention`; every
    other call runs as it would (a prefill's many queries, the causal fast path, float32, training).

    Entered around a decode step's first calls (warm-up, compilation, CUDA-graph capture) like ``gemv.MatvecMode``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            call = {**dict(zip(names, args, strict=False)), **kwargs}
            q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
            if mask is not None and fits(q, k, v, mask, call.get("dropout_p", 0.0), call.get("is_causal", False),
                                         call.get("scale"), call.get("enable_gqa", False)):  # fmt: skip
                return decode_attention(q, k, v, mask, call.get("scale"))
        return func(*args, **kwargs)
