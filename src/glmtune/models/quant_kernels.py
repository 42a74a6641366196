"""Triton kernels for THUDM's INT4/INT8 linear layers (``models/quant.py``): ``y = x @ W^T + b`` with ``W`` stored as
int8 (INT8: one value per byte, (out, in); INT4: two signed 4-bit values per byte, high nibble first, (out, in/2))
and an fp16 scale per output row, dequantized in registers, never written out in full precision.

Three paths, chosen from the number of rows ``M`` of ``x`` (a pure function of the shapes, no autotuning, so a
first call inside a CUDA graph capture never benchmarks or syncs):

- ``M <= GEMV_MAX_M`` (decode at batch 1): a matrix-vector kernel on the CUDA cores. Decode is bound by reading
  the weights, and INT4 reads a quarter of bf16's bytes; each program reduces ``BLOCK_N`` output rows over the
  whole input.
  INT4 with bfloat16 inputs (the default there, ``GemvConfig(mma=True)``): a variant on the tensor cores
  (``_gemv4_mma_kernel``): the nibbles become exact bf16 integers in ~1 instruction a byte (inline PTX) and
  mma.m16n8k16 does the products. On an H200 it ran ChatGLM3-6B's INT4 block in 57 µs at one row, against 74 µs for
  the CUDA-core kernel, 68 µs for PyTorch's tinygemm kernel on the same weights repacked (``int4_pack``) and 115 µs
  for the bf16 Triton matvec (bench/RESULTS.md). Other dtypes, and rows not a whole number of 32-bit words, take
  the CUDA-core kernel with the same blocks.
- ``M <= DOT_MAX_M`` (small decode batches): a tiled kernel, the unpacked tile fed to ``tl.dot`` (tensor cores),
  the scale applied to the float32 accumulator.
- larger ``M`` (prefill, training): dequantize the weight to ``x``'s dtype (one Triton pass) and multiply with
  cuBLAS; bench/quant_speed.py measured this 1.5-2.5x faster than the tiled kernel at 2,048 rows and faster for
  most shapes from 32 rows on (bench/RESULTS.md).

The entry points are torch.library custom ops (``glmtune::int_linear``, ``glmtune::int_dequantize``) with fake
implementations, so they trace under ``torch.compile`` and are captured in CUDA graphs (no host sync; memory only
from PyTorch's allocator). ``int_linear`` has a backward: the gradient of ``x`` is ``grad @ W`` (the weight is frozen
and gets none; a bias that requires grad gets its sum).

Imported only where Triton is (``quant._matmul`` on CUDA). With ``TRITON_INTERPRET=1`` set before the import, the
kernels run on CPU tensors in Triton's interpreter (how the CPU tests run them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# tinygemm layout: up to this many rows tinygemm's kernel, above it dequantize + cuBLAS (on an H200 tinygemm took
# ~125 µs per 16 rows on dense_h_to_4h, the layout's dequantize + cuBLAS ~305 µs: the crossing near 40 rows)
TC_MAX_M = 32
GEMV_MAX_M = 1  # up to this many rows: the CUDA-core matrix-vector kernel (at 2-4 rows the tiled one was faster)
DOT_MAX_M = 16  # up to this many rows: the tensor-core tiled kernel; above it, dequantize + cuBLAS
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how the kernels below were built (at import)


# ---- kernels ------------------------------------------------------------------------------------------------------
# Only Triton builtins and the functions here are called inside the kernels (no triton.language.standard helpers
# such as tl.sum, tl.zeros or tl.cdiv): those are compiled when Triton is imported, so a module imported later with
# TRITON_INTERPRET=1 (the CPU tests) could not call them.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _as_float(u, BITS: tl.constexpr):
    """Stored integers -> float32 without int-to-float conversions: ``u`` (int32) is the integer offset to
    0 <= u < 2^BITS (value + 2^(BITS-1)), put in the mantissa of 1.0, so the result is f = 1 + u / 2^BITS and the
    integer is 2^BITS * (f - 1.5), exactly."""
    return ((u << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, KP, stride_xm, stride_qn, stride_ym,
                 BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr):  # fmt: skip
    """y[m, n] = scale[n] * sum_k x[m, k] q[n, k] (+ b[n]) for BLOCK_M rows of x and BLOCK_N output features, over
    ``KP`` stored columns in steps of BLOCK_K (INT4: a stored byte holds columns 2j (high nibble) and 2j+1), on the
    CUDA cores (decode is bound by reading the weight, not by arithmetic).

    ``q_ptr``: the weight's bytes (uint8). Each integer v becomes f = 1 + (v + 2^(BITS-1)) / 2^BITS (``_as_float``:
    bit operations), so sum_k v x = 2^BITS (sum_k f x - 1.5 sum_k x): one multiply-add per weight and a running sum
    of x shared by every row. ``X_PAIRS`` (INT4, bfloat16 inputs): ``x_ptr`` is x as int32 words, word j holding
    x[2j] in its low and x[2j+1] in its high half (a bfloat16's float32 is its bits shifted up by 16), so the inputs
    load contiguously in the weight's layout."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m3 = offs_m[:, None, None]  # (bm, 1, 1)
    n3 = offs_n[None, :, None]  # (1, bn, 1)
    acc = tl.full((BLOCK_M, BLOCK_N, BLOCK_K), 0.0, tl.float32)
    x_sum = tl.full((BLOCK_M, 1, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        k3 = (k0 + tl.arange(0, BLOCK_K))[None, None, :]  # (1, 1, bk)
        u = tl.load(q_ptr + n3 * stride_qn + k3, mask=(n3 < N) & (k3 < KP), other=0).to(tl.int32)  # (1, bn, bk)
        x_mask = (m3 < M) & (k3 < KP)
        if BITS == 4:
            if X_PAIRS:
                xw = tl.load(x_ptr + m3 * stride_xm + k3, mask=x_mask, other=0)
                x_even = (xw << 16).to(tl.float32, bitcast=True)
                x_odd = (xw & -65536).to(tl.float32, bitcast=True)
            else:
                x_even = tl.load(x_ptr + m3 * stride_xm + 2 * k3, mask=x_mask, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + m3 * stride_xm + 2 * k3 + 1, mask=x_mask, other=0.0).to(tl.float32)
            # a nibble n (two's complement) is v + 8 = n ^ 8
            acc += _as_float((u >> 4) ^ 8, 4) * x_even + _as_float((u & 15) ^ 8, 4) * x_odd
            x_sum += x_even + x_odd
        else:
            xv = tl.load(x_ptr + m3 * stride_xm + k3, mask=x_mask, other=0.0).to(tl.float32)
            acc += _as_float(u ^ 128, 8) * xv  # a byte b (two's complement) is v + 128 = b ^ 128
            x_sum += xv
    total = tl.reduce(acc, 2, _add) - 1.5 * tl.reduce(x_sum, 2, _add)  # (bm, bn) - (bm, 1)
    y = total * (tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32) * (1 << BITS))[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# INT4 x bfloat16 on the tensor cores (PTX, CUDA only): per thread, one 32-bit word (8 columns) of two weight rows
# and the four bf16 input pairs of the same 8 columns go into two mma.m16n8k16 (bf16 in, float32 accumulate). The
# nibbles become exact bf16 integers with the magic-number trick (a LOP3 puts two nibbles u into the low mantissa
# bits of 128.0, an FMA subtracts 136: v = u - 8); about one instruction per weight byte instead of ~6 on the CUDA
# cores. Within an mma, lane 4g + i (i < 4) supplies the k-slots 2i, 2i+1, 2i+8, 2i+9 of row g (first weight row)
# and of row g + 8 (second weight row) and of column g of B (its inputs): the output's diagonal D[g][g] (and
# D[g + 8][g]) is the dot product over the 4 lanes of group g; the rest (rows times other lanes' inputs) is unused.
def _mma_step_ptx() -> str:
    """$0..$3 = D after two mma.m16n8k16 on $4, $5 (the words of two rows), $6..$9 (the four bf16 input pairs of
    those 8 columns) and $10..$13 (the accumulator C). Register a0 (a2) holds, for the first row, the nibbles at bits
    0-3 and 16-19 (4-7 and 20-23), i.e. columns 1 and 5 (0 and 4); a1, a3 the second row's; b0 (b1) the inputs of
    columns 1, 5 (0, 4): the high (low) halves of pairs 0 and 2. e*, f*: the same 8 bits further up (columns 3, 7 and
    2, 6; pairs 1 and 3)."""
    lines = ["{", ".reg .b32 wa, wb, t, one, off, a0, a1, a2, a3, e0, e1, e2, e3, b0, b1, f0, f1;",
             ".reg .f32 d0, d1, d2, d3;", "mov.b32 one, 0x3F803F80;", "mov.b32 off, 0xC308C308;",  # 1.0, -136.0
             "xor.b32 wa, $4, 0x88888888;", "xor.b32 wb, $5, 0x88888888;"]  # fmt: skip
    for reg, word, shift in zip(["a0", "a1", "a2", "a3", "e0", "e1", "e2", "e3"], ["wa", "wb"] * 4,
                                [0, 0, 4, 4, 8, 8, 12, 12], strict=True):  # fmt: skip
        if shift:
            lines.append(f"shr.b32 t, {word}, {shift};")
        # 128 + u in each half (u: the nibble xor 8 = v + 8), then - 136: v, exact in bf16
        lines += [f"lop3.b32 {reg}, {'t' if shift else word}, 0x000F000F, 0x43004300, 0xEA;",
                  f"fma.rn.bf16x2 {reg}, {reg}, one, off;"]  # fmt: skip
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    lines += ["prmt.b32 b0, $6, $8, 0x7632;", "prmt.b32 b1, $6, $8, 0x5410;", "prmt.b32 f0, $7, $9, 0x7632;",
              "prmt.b32 f1, $7, $9, 0x5410;",
              f"{mma} {{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{$10, $11, $12, $13}};",
              f"{mma} {{$0, $1, $2, $3}}, {{e0, e1, e2, e3}}, {{f0, f1}}, {{d0, d1, d2, d3}};", "}"]  # fmt: skip
    return "\n".join(lines)


_MMA_STEP = tl.constexpr(_mma_step_ptx())
# the diagonal: lane 4g + i holds D[g][2i], D[g][2i+1], D[g+8][2i], D[g+8][2i+1]; D[g][g] where i = g / 2
_MMA_DIAGONAL = tl.constexpr("""
{
.reg .b32 lane, g, i, h;
.reg .pred p, q;
mov.u32 lane, %laneid;
shr.b32 g, lane, 2;
and.b32 i, lane, 3;
shr.b32 h, g, 1;
setp.eq.u32 p, h, i;
and.b32 h, g, 1;
setp.eq.u32 q, h, 1;
selp.f32 $0, $3, $2, q;
selp.f32 $1, $5, $4, q;
selp.f32 $0, $0, 0f00000000, p;
selp.f32 $1, $1, 0f00000000, p;
}
""")


@triton.jit
def _gemv4_mma_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, KW, stride_xm, stride_qn, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    """``_gemv_kernel`` at one row of x per program column for INT4 weights read as 32-bit words (``q_ptr``,
    (N, KW)) and bfloat16 inputs as pairs (``x_ptr``), on the tensor cores (``_MMA_STEP``): rows n and
    n + BLOCK_N / 2 share each thread's mma, BLOCK_W words a step.

    The tiles are 1-D, element i = (row pair i // BLOCK_W, word i % BLOCK_W), loaded one 32-bit word a thread
    (``tl.max_contiguous``): a 1-D layout of one element a thread puts element i on lane i % 32, so the 4 lanes of an
    mma group hold 4 words of the same rows, which ``_MMA_STEP`` and ``_MMA_DIAGONAL`` rely on (a 2-D tile leaves
    the lane order to Triton's layout choice: Triton 3.6 put rows, not words, along the lanes of some tiles)."""
    HALF: tl.constexpr = BLOCK_N // 2
    i = tl.arange(0, HALF * BLOCK_W)
    w = i % BLOCK_W
    rows_a = tl.program_id(0) * BLOCK_N + i // BLOCK_W
    rows_b = rows_a + HALF
    x_row = x_ptr + tl.program_id(1) * stride_xm
    c0 = tl.full((HALF * BLOCK_W,), 0.0, tl.float32)
    c1 = c0
    c2 = c0
    c3 = c0
    for t0 in range(0, KW, BLOCK_W):
        t = t0 + w
        wa = tl.load(q_ptr + tl.max_contiguous(rows_a * stride_qn + t, 1), mask=(rows_a < N) & (t < KW), other=0)
        wb = tl.load(q_ptr + tl.max_contiguous(rows_b * stride_qn + t, 1), mask=(rows_b < N) & (t < KW), other=0)
        p0 = tl.load(x_row + 4 * t, mask=t < KW, other=0)  # the 4 bf16 pairs of the word's 8 columns
        p1 = tl.load(x_row + 4 * t + 1, mask=t < KW, other=0)
        p2 = tl.load(x_row + 4 * t + 2, mask=t < KW, other=0)
        p3 = tl.load(x_row + 4 * t + 3, mask=t < KW, other=0)
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            _MMA_STEP, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [wa, wb, p0, p1, p2, p3, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)  # fmt: skip
    da, db = tl.inline_asm_elementwise(_MMA_DIAGONAL, "=f,=f,f,f,f,f", [c0, c1, c2, c3],
                                       dtype=(tl.float32, tl.float32), is_pure=True, pack=1)  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, HALF)
    for half in tl.static_range(2):
        n = rows + half * HALF
        total = tl.reduce(tl.reshape(da if half == 0 else db, (HALF, BLOCK_W)), 1, _add)
        y = total * tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + tl.program_id(1) * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: full precision (not tf32)
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, KP, stride_xm, stride_qn, stride_ym,
                BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """The same product tiled for tensor cores: a (BLOCK_M, BLOCK_N) tile of y per program, BLOCK_K stored columns
    per step (``q_ptr``: the weight's bytes, uint8). INT4 nibbles are put back in column order in registers before
    ``tl.dot`` (measured 1.5-4x faster than two products of the even and odd inputs by the high and low nibbles)."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n  # groups of GROUP_M row tiles walk the columns together (weight tiles stay in L2)
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    m2 = offs_m[:, None]
    for k0 in range(0, KP, BLOCK_K):
        kq = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(q_ptr + offs_n[:, None] * stride_qn + kq[None, :],
                    mask=(offs_n[:, None] < N) & (kq[None, :] < KP), other=0).to(tl.int32)  # (bn, bk)  # fmt: skip
        if BITS == 4:
            # the integers as exact floats (|v| <= 8: exact in bf16/fp16 too)
            hi = (_as_float((u >> 4) ^ 8, 4) * 16.0 - 24.0).to(x_ptr.dtype.element_ty)
            lo = (_as_float((u & 15) ^ 8, 4) * 16.0 - 24.0).to(x_ptr.dtype.element_ty)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, 2 * BLOCK_K))  # columns 2j, 2j+1 side by side
            kx = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            x = tl.load(x_ptr + m2 * stride_xm + kx[None, :], mask=(m2 < M) & (kx[None, :] < 2 * KP), other=0.0)
            acc = _dot(x, tl.trans(w), acc, IEEE)
        else:
            w = (_as_float(u ^ 128, 8) * 256.0 - 384.0).to(x_ptr.dtype.element_ty)  # |v| <= 128: exact in bf16
            x = tl.load(x_ptr + m2 * stride_xm + kq[None, :], mask=(m2 < M) & (kq[None, :] < KP), other=0.0)
            acc = _dot(x, tl.trans(w), acc, IEEE)
    y = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, w_ptr, N, KP, stride_qn, stride_wn, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):  # fmt: skip
    """W[n, :] = q[n, :] * scale[n] in W's dtype (INT4 unpacked, high nibble first), one (BLOCK_N, BLOCK_K) tile of
    stored columns per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    kq = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(q_ptr + offs_n[:, None] * stride_qn + kq[None, :],
                mask=(offs_n[:, None] < N) & (kq[None, :] < KP), other=0)  # fmt: skip
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    if BITS == 4:
        hi = (w >> 4).to(tl.float32) * s
        lo = ((w << 4).to(tl.int8) >> 4).to(tl.float32) * s
        out = tl.reshape(tl.join(hi, lo), (BLOCK_N, 2 * BLOCK_K))
        kw = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
        k_out = 2 * KP
    else:
        out = w.to(tl.float32) * s
        kw = kq
        k_out = KP
    mask = (offs_n[:, None] < N) & (kw[None, :] < k_out)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + kw[None, :], out.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_tc_kernel(p_ptr, s_ptr, w_ptr, KO, stride_wn, INNER_K_TILES: tl.constexpr, BLOCK_KO: tl.constexpr):
    """W (N, K) = value * scale[n] in W's dtype from tinygemm's int32 words (``models/int4_pack.py``'s layout,
    (N/8, KO, 32, INNER_K_TILES/2)): BLOCK_KO groups of k-tiles of one 8-row tile per program. Word (nt, ko, t, j)
    holds at bits 4q and 16 + 4q the unsigned nibbles (value + 8) of columns 2b and 2b + 1 of row 8 nt + t // 4,
    for the bytes b = ko * 8 INNER_K_TILES + 16 j + 4 q + t % 4."""
    HALF: tl.constexpr = INNER_K_TILES // 2
    i = tl.arange(0, BLOCK_KO * 32 * HALF)
    ko = tl.program_id(1) * BLOCK_KO + i // (32 * HALF)
    t = (i // HALF) % 32
    j = i % HALF
    nt = tl.program_id(0)
    mask = ko < KO
    words = tl.load(p_ptr + (nt * KO + ko) * (32 * HALF) + t * HALF + j, mask=mask, other=0)
    n = nt * 8 + t // 4
    s = tl.load(s_ptr + n).to(tl.float32)
    for q in tl.static_range(4):
        col = 2 * (ko * (8 * INNER_K_TILES) + 16 * j + 4 * q + t % 4)
        hi = (((words >> (4 * q)) & 15) - 8).to(tl.float32) * s
        lo = (((words >> (16 + 4 * q)) & 15) - 8).to(tl.float32) * s
        ptrs = w_ptr + tl.join(n * stride_wn + col, n * stride_wn + col + 1)  # a column pair: one 4-byte store
        tl.store(ptrs, tl.join(hi, lo).to(w_ptr.dtype.element_ty), mask=tl.join(mask, mask))


# ---- launch configurations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int  # stored columns (bytes) per step
    num_warps: int = 4
    num_stages: int = 3
    # INT4 with bfloat16 inputs on CUDA, rows a multiple of 4 bytes: the tensor-core kernel (_gemv4_mma_kernel; one
    # row of x per program column, block_m unused, block_k / 4 words a step); otherwise the CUDA-core kernel
    mma: bool = False


@dataclass(frozen=True)
class DotConfig:
    block_m: int
    block_n: int
    block_k: int  # stored columns (bytes) per step
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def gemv_config(m: int, n: int, kp: int, bits: int) -> GemvConfig:
    """The matrix-vector kernel's blocks: many small programs (1,024 for 4,096 output rows). The batch-1 blocks are
    the fastest of bench/quant_speed.py's sweeps over ChatGLM3-6B's four linears on an H200 (bench/RESULTS.md); INT4
    takes the tensor-core kernel (bfloat16 inputs; its sweep's best, within 2 %, at the CUDA-core kernel's blocks,
    which other dtypes keep)."""
    if m == 1:
        if n >= 16384:  # dense_h_to_4h
            return GemvConfig(1, 8, 512, mma=bits == 4)
        if bits == 8 and n <= 4096:  # INT8 dense and dense_4h_to_h
            return GemvConfig(1, 8, 1024, num_warps=8)
        return GemvConfig(1, 4, 512, mma=bits == 4)
    block_m = 2 if m == 2 else 4
    return GemvConfig(block_m, 4, 512 // block_m)


def dot_config(m: int, n: int, kp: int, bits: int) -> DotConfig:
    """The tiled kernel's blocks (``tl.dot`` needs every dimension >= 16); up to 16 rows, the sweep's fastest."""
    if m <= 16:
        return DotConfig(16, 32, 128 if bits == 4 else 256, group_m=1)
    if m <= 64:
        return DotConfig(64, 128, 64)
    return DotConfig(128, 128, 64, num_warps=8)


# ---- launchers ----------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int) -> int:
    """The input features ``x`` must have for the stored weight ``q`` (a clear error otherwise)."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"the quantized weight must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"weight_scale must have shape ({q.shape[0]},) (one per output row), got {tuple(scale.shape)}")
    in_features = q.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features; the INT{bits} weight {tuple(q.shape)} takes {in_features}")
    if x.dtype not in DTYPES:
        raise ValueError(f"quantized matmul takes {', '.join(map(str, DTYPES))} inputs, got {x.dtype}")
    if not INTERPRETED and not (x.is_cuda and q.is_cuda and scale.is_cuda):
        raise ValueError("the Triton quantized matmul runs on CUDA tensors (the CPU path is quant.dequantize_weight)")
    return in_features


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype``: one pass of the dequantize kernel."""
    n, kp = q.shape
    w = torch.empty((n, kp * (2 if bits == 4 else 1)), dtype=dtype, device=q.device)
    q = q.contiguous()
    block_n, block_k = 32, (64 if bits == 4 else 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, block_k))
    _dequant_kernel[grid](q, scale, w, n, kp, q.stride(0), w.stride(0), BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def dequantize_tc(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype`` from tinygemm's int32 words (``int4_pack``) and the row ``scale``: one pass
    of ``_dequant_tc_kernel``."""
    nt, ko, _, half = packed.shape
    w = torch.empty((nt * 8, ko * 32 * half), dtype=dtype, device=packed.device)
    block_ko = max(1, 4 // half)
    grid = (nt, triton.cdiv(ko, block_ko))
    _dequant_tc_kernel[grid](packed.contiguous(), scale, w, ko, w.stride(0), INNER_K_TILES=2 * half,
                             BLOCK_KO=block_ko)  # fmt: skip
    return w


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None,
           path: str = "auto", config: GemvConfig | DotConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T + b`` for ``x`` (..., in). ``path``: auto (by the number of rows), gemv, dot or dequant; ``config``:
    the kernel's blocks instead of ``gemv_config``/``dot_config`` (benchmarks and tests force both)."""
    _check(x, q, scale, bits)
    n, kp = q.shape
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else ("dot" if m <= DOT_MAX_M else "dequant")
    if path == "dequant" or m == 0:
        w = dequantize(q, scale, bits, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    u = q.contiguous().view(torch.uint8)  # the kernels read the stored bytes unsigned
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else scale  # a pointer the kernel never reads
    if path == "gemv":
        c = config or gemv_config(m, n, kp, bits)
        grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))
        pairs = bits == 4 and x.dtype == torch.bfloat16
        if pairs and (x2.stride(0) % 2 or x2.storage_offset() % 2):
            x2 = x2.contiguous()
        xs = x2.view(torch.int32) if pairs else x2  # INT4 + bf16: (x[2j], x[2j+1]) as one 32-bit word
        if c.mma and pairs and kp % 4 == 0 and u.storage_offset() % 4 == 0 and not INTERPRETED:
            qw = u.view(torch.int32)  # (N, KP / 4): the stored bytes as 32-bit words, little-endian
            _gemv4_mma_kernel[(triton.cdiv(n, c.block_n), m)](
                xs, qw, scale, b, y, n, kp // 4, xs.stride(0), qw.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                BLOCK_N=c.block_n, BLOCK_W=c.block_k // 4, num_warps=c.num_warps, num_stages=c.num_stages)  # fmt: skip
            return y.reshape(*x.shape[:-1], n)
        _gemv_kernel[grid](xs, u, scale, b, y, m, n, kp, xs.stride(0), u.stride(0), y.stride(0), BITS=bits,
                           HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                           X_PAIRS=pairs, num_warps=c.num_warps, num_stages=c.num_stages)  # fmt: skip
    elif path == "dot":
        c = config or dot_config(m, n, kp, bits)
        grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
        _dot_kernel[grid](x2, u, scale, b, y, m, n, kp, x2.stride(0), u.stride(0), y.stride(0), BITS=bits,
                          HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                          GROUP_M=c.group_m, IEEE=x.dtype == torch.float32, num_warps=c.num_warps,
                          num_stages=c.num_stages)  # fmt: skip
    else:
        raise ValueError(f"unknown path {path!r}; choose auto, gemv, dot or dequant")
    return y.reshape(*x.shape[:-1], n)


# ---- custom ops: what torch.compile and CUDA graphs see -----------------------------------------------------------
@torch.library.custom_op("glmtune::int_linear", mutates_args=())
def int_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T + b`` with ``W`` THUDM's INT4/INT8 weight ``q`` times its per-row ``scale``."""
    return linear(x, q, scale, bits, bias)


@int_linear.register_fake
def _int_linear_fake(x, q, scale, bits, bias=None):
    _check_fake(x, q, bits)
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("glmtune::int_dequantize", mutates_args=())
def int_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight ``q * scale`` in ``dtype``."""
    return dequantize(q, scale, bits, dtype)


@int_dequantize.register_fake
def _int_dequantize_fake(q, scale, bits, dtype):
    return q.new_empty((q.shape[0], q.shape[1] * (2 if bits == 4 else 1)), dtype=dtype)


def _check_fake(x: torch.Tensor, q: torch.Tensor, bits: int) -> None:
    in_features = q.shape[1] * (2 if bits == 4 else 1)
    torch._check(x.shape[-1] == in_features, lambda: f"input has {x.shape[-1]} features; the weight: {in_features}")


def _setup_context(ctx, inputs, output) -> None:
    x, q, scale, bits, bias = inputs
    ctx.save_for_backward(q, scale)
    ctx.bits = bits
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[4]


def _backward(ctx, grad: torch.Tensor):
    q, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ int_dequantize(q, scale, ctx.bits, grad.dtype)  # (..., out) @ (out, in)
    if ctx.bias_grad:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias


int_linear.register_autograd(_backward, setup_context=_setup_context)


# ---- the tinygemm layout (``int4_pack``): aten's INT4 kernel, a dequantize pass for many rows and the backward ----
@torch.library.custom_op("glmtune::int4_tc_linear", mutates_args=())
def int4_tc_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, scale: torch.Tensor,
                   group: int, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W^T + b`` for an INT4 weight in tinygemm's layout: ``packed`` (N/8, K/(16 t), 32, t/2) int32,
    ``scales_zeros`` (K/group, N, 2) bf16, ``scale`` THUDM's fp16 row scale. Up to ``TC_MAX_M`` rows of bfloat16
    ``x``: ``aten._weight_int4pack_mm`` (the CPU op on the CPU); otherwise the weight dequantized in ``x``'s dtype
    (with the fp16 scale) and cuBLAS."""
    from glmtune.models import int4_pack

    x2 = x.reshape(-1, x.shape[-1])
    n = packed.shape[0] * 8
    if x2.shape[0] <= TC_MAX_M and x.dtype == torch.bfloat16 and x2.shape[0] > 0:
        if not x.is_cuda:
            return int4_pack.linear_cpu(x, packed, scales_zeros, group, 2 * packed.shape[-1], bias)
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, group, scales_zeros)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)
    w = dequantize_tc(packed, scale, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@int4_tc_linear.register_fake
def _int4_tc_linear_fake(x, packed, scales_zeros, scale, group, bias=None):
    torch._check(x.shape[-1] == packed.shape[1] * packed.shape[3] * 32, lambda: "input features != the weight's")
    return x.new_empty((*x.shape[:-1], packed.shape[0] * 8))


@torch.library.custom_op("glmtune::int4_tc_dequantize", mutates_args=())
def int4_tc_dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype`` from tinygemm's words and the fp16 row scale."""
    return dequantize_tc(packed, scale, dtype)


@int4_tc_dequantize.register_fake
def _int4_tc_dequantize_fake(packed, scale, dtype):
    return packed.new_empty((packed.shape[0] * 8, packed.shape[1] * packed.shape[3] * 32), dtype=dtype)


def _tc_setup_context(ctx, inputs, output) -> None:
    x, packed, scales_zeros, scale, group, bias = inputs
    ctx.save_for_backward(packed, scale)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]


def _tc_backward(ctx, grad: torch.Tensor):
    packed, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ int4_tc_dequantize(packed, scale, grad.dtype)  # (..., out) @ (out, in)
    if ctx.bias_grad:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, grad_bias


int4_tc_linear.register_autograd(_tc_backward, setup_context=_tc_setup_context)
