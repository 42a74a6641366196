"""SwiGLU, the activation of ChatGLM2/3 and GLM-4's MLP, as one fused Triton op for its forward and one for its
backward: ``swiglu(ag) = silu(a) * g`` for ``ag = [a | g]``, the (..., 2F) output of ``dense_h_to_4h``.

Why: compiled, Inductor already fuses each direction into one elementwise kernel, but its backward (the largest
non-matmul kernel of a packed 4 x 1024 LoRA step on ChatGLM3-6B: 7.6 ms a step) moved its ~560 MB a layer (``ag``
and the output gradient read, ``[da | dg]`` written) at ~2.1 TB/s of an H200's ~4 (bench/RESULTS.md). The kernels
here are plain streams: one program per (row, block of ``block`` columns) loads ``a``, ``g`` (and the gradient)
with 16-byte vectors, computes in float32 and writes each output once (``[da | dg]`` into one (..., 2F) tensor,
what ``dense_h_to_4h``'s backward matmul reads). bf16, fp16 and fp32 in and out; no host sync, memory only from
PyTorch's allocator, so a compiled step captures them in CUDA graphs.

``swiglu`` is a torch.library custom op (``glmtune::swiglu``) with a fake implementation and an autograd formula
that saves only ``ag`` (what Inductor saves for the MLP today) and calls ``glmtune::swiglu_backward``; under
``torch.compile`` each is one opaque node. On CUDA the ops run the kernels; on the CPU the torch reference
(``reference``, ``reference_backward``: the expressions and the autograd formulas of the MLP's own
``F.silu(a) * g``, so a CPU model gives bit for bit what it gives without the op). ``chatglm.use_fused_swiglu``
switches a model's MLPs to it in training; ``train.compile.compile_blocks`` does so on CUDA.

Imported only where Triton is (``chatglm.MLP`` imports it when switched on). The kernels run on CPU tensors in
Triton's interpreter (the CPU tests): ``fused_forward``/``fused_backward`` take the interpreter for CPU tensors
whatever ``TRITON_INTERPRET`` was at import, and with ``INTERPRETED`` (``TRITON_INTERPRET=1`` at import, or set by
a test) the ops send CPU tensors there too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmtune.models.triton_runner import runnable

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the ops send CPU tensors to the kernels too


# Only Triton builtins inside the kernels (no tl.sigmoid: triton.language.standard's helpers are compiled when
# Triton is imported, so the interpreter could not call them), and no calls to other jit functions: each kernel
# also runs as ``InterpretedFunction(kernel.fn)`` on CPU tensors.
@triton.jit
def _forward_kernel(ag_ptr, out_ptr, F, stride_ag, stride_out, BLOCK: tl.constexpr):
    """out[r, j] = silu(a) * g with a = ag[r, j], g = ag[r, F + j], for the ``BLOCK`` columns j of program (r, c)."""
    row = tl.program_id(0).to(tl.int64)  # rows * 2F can pass 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < F
    src = ag_ptr + row * stride_ag + cols
    a = tl.load(src, mask=keep, other=0.0, eviction_policy="evict_first").to(tl.float32)
    g = tl.load(src + F, mask=keep, other=0.0, eviction_policy="evict_first").to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * g  # exp(-a) = inf for a < -88: silu -> -0, never NaN
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _backward_kernel(ag_ptr, dy_ptr, dag_ptr, F, stride_ag, stride_dy, stride_dag, BLOCK: tl.constexpr):
    """dag[r, j] = dy * g * s * (1 + a * (1 - s)) (da) and dag[r, F + j] = dy * a * s (dg), s = sigmoid(a): the
    formulas of PyTorch's silu_backward and mul's backward, in float32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < F
    src = ag_ptr + row * stride_ag + cols
    a = tl.load(src, mask=keep, other=0.0, eviction_policy="evict_first").to(tl.float32)
    g = tl.load(src + F, mask=keep, other=0.0, eviction_policy="evict_first").to(tl.float32)
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=keep, other=0.0, eviction_policy="evict_first")
    dy = dy.to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    da = dy * g * s * (1.0 + a * (1.0 - s))
    dg = dy * (a * s)
    dst = dag_ptr + row * stride_dag + cols
    tl.store(dst, da.to(dag_ptr.dtype.element_ty), mask=keep)
    tl.store(dst + F, dg.to(dag_ptr.dtype.element_ty), mask=keep)


@dataclass(frozen=True)
class SwigluConfig:
    block: int = 1024  # columns of a (and of g) per program; a power of two
    num_warps: int = 4  # block / (32 * num_warps) elements a thread: 8 = one 16-byte bf16 vector


# Not measured yet: 1,024 columns at 4 warps gives every thread one 16-byte bf16 vector of a, of g (and of the
# gradient), and ChatGLM3's 13,696 columns 14 programs a row (the last one 37 % full). bench/swiglu_speed.py times
# these candidates against Inductor's kernels as CUDA-graph replays.
DEFAULT = SwigluConfig()
CANDIDATES = (DEFAULT, SwigluConfig(512, 2), SwigluConfig(2048, 4), SwigluConfig(2048, 8), SwigluConfig(4096, 8))


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as (rows, width) with unit column stride (a view where the layout allows, else a copy)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _half_width(ag: torch.Tensor) -> int:
    if ag.dim() == 0 or ag.shape[-1] % 2:
        raise ValueError(f"swiglu takes [a | g] with an even last dimension, got {tuple(ag.shape)}")
    return ag.shape[-1] // 2


def fused_forward(ag: torch.Tensor, config: SwigluConfig | None = None) -> torch.Tensor:
    """silu(a) * g through the Triton kernel, ag (..., 2F) -> (..., F) contiguous, in ag's dtype."""
    f = _half_width(ag)
    config = config or DEFAULT
    src = _rows(ag, 2 * f)
    out = ag.new_empty((*ag.shape[:-1], f))
    if src.shape[0] and f:
        grid = (src.shape[0], triton.cdiv(f, config.block))
        runnable(_forward_kernel, ag)[grid](src, out, f, src.stride(0), f, BLOCK=config.block,
                                             num_warps=config.num_warps)  # fmt: skip
    return out


def fused_backward(ag: torch.Tensor, grad: torch.Tensor, config: SwigluConfig | None = None) -> torch.Tensor:
    """[da | dg] of ``swiglu`` through the Triton kernel: ag (..., 2F), grad (..., F) -> (..., 2F) contiguous, in
    ag's dtype."""
    f = _half_width(ag)
    if grad.shape != (*ag.shape[:-1], f):
        raise ValueError(f"swiglu's gradient must be {(*ag.shape[:-1], f)}, got {tuple(grad.shape)}")
    config = config or DEFAULT
    src, dy = _rows(ag, 2 * f), _rows(grad, f)
    dag = ag.new_empty(ag.shape)
    if src.shape[0] and f:
        grid = (src.shape[0], triton.cdiv(f, config.block))
        runnable(_backward_kernel, ag)[grid](src, dy, dag, f, src.stride(0), dy.stride(0), 2 * f,
                                              BLOCK=config.block, num_warps=config.num_warps)  # fmt: skip
    return dag


def reference(ag: torch.Tensor) -> torch.Tensor:
    """silu(a) * g as ``chatglm.MLP`` computes it without the op (ag (..., 2F) -> (..., F))."""
    a, g = ag.chunk(2, dim=-1)
    return F.silu(a) * g


def reference_backward(ag: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[da | dg] as autograd computes it through ``reference`` (mul's, silu's and chunk's backward formulas)."""
    a, g = ag.chunk(2, dim=-1)
    da = torch.ops.aten.silu_backward(grad * g, a)
    return torch.cat([da, grad * F.silu(a)], dim=-1).to(ag.dtype)


def _kernel_runs(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRETED


# ---- the custom ops ------------------------------------------------------------------------------------------------
@torch.library.custom_op("glmtune::swiglu", mutates_args=())
def swiglu(ag: torch.Tensor) -> torch.Tensor:
    """silu(a) * g for ``ag = [a | g]`` (..., 2F) -> (..., F); differentiable (saves only ``ag``)."""
    return fused_forward(ag) if _kernel_runs(ag) else reference(ag)


@swiglu.register_fake
def _swiglu_fake(ag):
    torch._check(ag.shape[-1] % 2 == 0, lambda: f"swiglu takes an even last dimension, got {ag.shape}")
    return ag.new_empty((*ag.shape[:-1], ag.shape[-1] // 2))


@torch.library.custom_op("glmtune::swiglu_backward", mutates_args=())
def swiglu_backward(ag: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``swiglu`` with respect to ``ag``: [da | dg] (..., 2F) for ``grad`` (..., F)."""
    return fused_backward(ag, grad) if _kernel_runs(ag) else reference_backward(ag, grad)


@swiglu_backward.register_fake
def _swiglu_backward_fake(ag, grad):
    torch._check(grad.shape[-1] * 2 == ag.shape[-1], lambda: f"gradient {grad.shape} for input {ag.shape}")
    return ag.new_empty(ag.shape)


def _setup_context(ctx, inputs, output) -> None:
    (ag,) = inputs
    ctx.save_for_backward(ag)


def _backward(ctx, grad):
    (ag,) = ctx.saved_tensors
    return swiglu_backward(ag, grad)


swiglu.register_autograd(_backward, setup_context=_setup_context)
