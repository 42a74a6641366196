"""THUDM INT4 weights in the layout of PyTorch's tinygemm kernel (``aten._weight_int4pack_mm``): the opt-in inference
layout of ``QuantizedLinear`` (``quant.use_inference_layout``, ``load_pretrained(int4_layout="tinygemm")``), for
generation only. Not the default: on an H200 tinygemm ran ChatGLM3-6B's INT4 block in 68 µs at one row against 57 µs
for the tensor-core GEMV on THUDM's own layout (``quant_kernels``), and 3-4x slower than the tiled kernel at 16 rows.

THUDM stores an INT4 linear as int8 bytes (out, in/2), two signed 4-bit values a byte, the high nibble first (column
2j), and an fp16 scale per output row. tinygemm (what gpt-fast and torchao run for INT4 decode) takes the same nibble
order, unsigned, tiled for ``mma.m16n8k16``: an int32 tensor (N/8, K/(inner_k_tiles*16), 32, inner_k_tiles/2) made by
``aten._convert_weight_to_int4pack`` from uint8 (N, K/2), and dequantizes each value as ``(u - 8) * scale + zero``
with a bf16 (scale, zero) per group of ``group`` inputs of a row. A THUDM nibble v (two's complement) is u - 8 for
u = v ^ 8, so a byte maps by ``^ 0x88``, the zero is 0 and every group of a row gets the row's scale (rounded to
bf16: at most 2^-8 relative; the fp16 row scale stays in the module, so the THUDM bytes and scales can always be
written back exactly: ``unpack``).

``pack`` runs the aten op on CUDA; ``pack_reference`` is the same layout in plain tensor operations (from the
kernel's source, ATen/native/cuda/int4mm.cu, ``matrix_to_m16n8k16_Bint4_layout``), used on the CPU (tests) and
checked against the op on the GPU. Word (nt, ko, t, j) holds, for row n = 8 nt + t // 4 and the bytes
b_i = ko * 8 * inner_k_tiles + 16 j + 4 i + t % 4 (i = 0..3), the high nibble of b_i at bits 4i and its low nibble at
bits 16 + 4i.

On the CPU the layout's forward goes through the CPU tinygemm op (``aten._weight_int4pack_mm_for_cpu``: its own
packing of unsigned int32 values, made on the fly), with the same scales-and-zeros tensor as CUDA: how CI checks the
numerics of the mapping.
"""

from __future__ import annotations

import torch

INNER_K_TILES = (8, 4, 2)  # 16-, 8-, 4-byte weight loads a lane; the largest that divides K is used
GROUP_SIZES = (256, 128, 64, 32)  # what the kernel takes; the largest that divides K (fewest scales read)
N_TILE = 8


def tinygemm_params(out_features: int, in_features: int) -> tuple[int, int] | None:
    """(inner_k_tiles, group size) for an (out, in) weight, or None where tinygemm cannot take the shape (out not a
    multiple of 8, or in not a multiple of 32)."""
    if out_features % N_TILE or out_features == 0:
        return None
    tiles = next((t for t in INNER_K_TILES if in_features % (16 * t) == 0), None)
    group = next((g for g in GROUP_SIZES if in_features % g == 0), None)
    return None if tiles is None or group is None else (tiles, group)


def to_unsigned(q: torch.Tensor) -> torch.Tensor:
    """THUDM's int8 bytes (N, K/2) -> uint8 bytes of unsigned nibbles u = v + 8 (same nibble order)."""
    return q.contiguous().view(torch.uint8) ^ 0x88


def pack(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """THUDM INT4 bytes (N, K/2) -> tinygemm's int32 (N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2)."""
    u = to_unsigned(q)
    if q.is_cuda:
        return torch.ops.aten._convert_weight_to_int4pack(u, inner_k_tiles)
    return pack_reference(u, inner_k_tiles)


def pack_reference(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """``aten._convert_weight_to_int4pack`` (CUDA layout) in tensor operations, on any device: uint8 (N, K/2) ->
    int32 (N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2)."""
    n, kb = u.shape
    ko, half = kb // (8 * inner_k_tiles), inner_k_tiles // 2
    # byte column = ko * 8 inner_k_tiles + 16 j + 4 i + c, row = 8 nt + r; lane t = 4 r + c
    b = u.reshape(n // N_TILE, N_TILE, ko, half, 4, 4).to(torch.int32)  # (nt, r, ko, j, i, c)
    b = b.permute(0, 2, 1, 5, 3, 4)  # (nt, ko, r, c, j, i)
    shifts = 4 * torch.arange(4, device=u.device, dtype=torch.int32)
    words = ((b >> 4) << shifts).sum(-1) | ((b & 15) << (shifts + 16)).sum(-1)  # disjoint bits: sum == or
    return words.reshape(n // N_TILE, ko, 32, half).to(torch.int32).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack``: tinygemm's int32 words -> THUDM's int8 bytes (N, K/2), bit for bit."""
    nt, ko, lanes, half = packed.shape
    shifts = 4 * torch.arange(4, device=packed.device, dtype=torch.int32)
    w = packed.reshape(nt, ko, N_TILE, 4, half, 1)  # (nt, ko, r, c, j, 1)
    high = (w >> shifts) & 15
    low = (w >> (shifts + 16)) & 15
    b = ((high << 4) | low) ^ 0x88  # (nt, ko, r, c, j, i): back to two's complement nibbles
    b = b.permute(0, 2, 1, 4, 5, 3)  # (nt, r, ko, j, i, c)
    return b.reshape(nt * N_TILE, ko * 8 * half * 2).to(torch.uint8).view(torch.int8)


def signed_values(packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) signed integers held by tinygemm's words (int8, in [-8, 7])."""
    from glmtune.models.quant import unpack_int4

    return unpack_int4(unpack(packed))


def scales_and_zeros(scale: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """tinygemm's (K/group, N, 2) bf16 (scale, zero) from THUDM's fp16 row scale: every group of a row its scale,
    zero 0."""
    sz = torch.zeros(in_features // group, scale.shape[0], 2, dtype=torch.bfloat16, device=scale.device)
    sz[..., 0] = scale.to(torch.bfloat16)
    return sz


def linear_cpu(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, inner_k_tiles: int,
               bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x (..., K) @ W^T (+ b) through the CPU tinygemm op (float32, bfloat16 or float16 ``x``): the tensor-core
    words unpacked to unsigned int32 values and packed as the CPU op takes them (slow; tests and the CPU)."""
    u = signed_values(packed).to(torch.int32) + 8  # (N, K) in [0, 15]
    n = u.shape[0]
    pad = -n % 16  # the CPU op takes N in multiples of 16: zero rows, their outputs dropped
    u = torch.nn.functional.pad(u, (0, 0, 0, pad)).contiguous()
    sz = torch.nn.functional.pad(sz, (0, 0, 0, pad))
    cpu_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, cpu_packed, group, sz.to(x.dtype))[:, :n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
