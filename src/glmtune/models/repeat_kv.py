"""Grouped K/V heads repeated for an attention kernel that takes no grouped heads, as one Triton op each way:
``repeat_kv(x, groups)`` takes x (N, n_kv, d) to (N, n_kv * groups, d) with ``out[:, kv * groups + j] = x[:, kv]``
(the grouping of flash and SDPA's ``enable_gqa``), and its backward sums the copies:
``dx[:, kv] = sum_j dy[:, kv * groups + j]``.

Why: on torch versions whose flash varlen kernel takes no grouped heads, ``attention._flash_varlen`` repeats
ChatGLM3's 2 K/V heads to its 32 query heads (``expand`` + ``reshape``). Compiled, Inductor fuses the forward copy
into the rotary kernel, but the backward's group sum is a ``triton_per_fused_sum_view`` kernel of its own, twice a
layer, that reads the 4096 x 32 x 128 bf16 gradient (33.5 MB) at ~0.84 TB/s (40 us; 2.2 ms a packed 4 x 1024 step
on ChatGLM3-6B). The kernels here are plain streams: one program per (block of tokens, K/V head) loads the
``groups`` rows of the gradient with 16-byte vectors, unrolled so all are in flight at once, sums them in float32
and stores once; the forward loads its rows of x once and stores them ``groups`` times. bf16, fp16 and fp32 in and
out; no host sync, memory only from PyTorch's allocator, so a compiled step captures them in CUDA graphs.

Two custom ops, each with a fake implementation and an autograd formula (nothing is saved for the backward):
``glmtune::repeat_kv`` (one tensor) and ``glmtune::repeat_kv_pair`` (K and V in one launch each way: what
``_flash_varlen`` needs; half the launches, and every launch twice the work, on tensors that take the GPU ~10 us);
their backwards are ``glmtune::repeat_kv_backward`` and ``glmtune::repeat_kv_pair_backward``. Under
``torch.compile`` each is one opaque node. On CUDA they run the kernels; on the CPU the torch reference
(``reference``: ``expand`` + ``reshape``, and ``reference_backward``: the sum autograd takes through them, so a CPU
model gives bit for bit what it gives without the ops).

Inputs may be strided (any token and head strides: a view into the QKV projection is read in place); a last
dimension that is not contiguous is copied first. The outputs are contiguous.

Imported only where Triton is. As in ``swiglu``: ``fused_forward``/``fused_backward`` run CPU tensors in Triton's
interpreter whatever ``TRITON_INTERPRET`` was at import, and with ``INTERPRETED`` (``TRITON_INTERPRET=1`` at import,
or set by a test) the ops send CPU tensors there too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glmtune.models.triton_runner import runnable

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the ops send CPU tensors to the kernels too


# Only Triton builtins inside the kernels and no calls to other jit functions: each kernel also runs as
# ``InterpretedFunction(kernel.fn)`` on CPU tensors. Grid (token blocks, n_kv, tensors): axis 2 picks the first
# tensor (K) or the second (V) of a pair; a single tensor is passed as both with a grid of one along it.
@triton.jit
def _forward_kernel(x0_ptr, x1_ptr, out0_ptr, out1_ptr, N, sx0_n, sx0_h, sx1_n, sx1_h,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """out[n, kv * G + j, :] = x[n, kv, :] for the ``BLOCK_N`` tokens n of program (t, kv, which), every j < G."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N  # tokens * heads * d can pass 2^31 elements
    kv = tl.program_id(1)
    first = tl.program_id(2) == 0
    sx_n = tl.where(first, sx0_n, sx1_n)
    src = tl.where(first, x0_ptr, x1_ptr) + start * sx_n + kv * tl.where(first, sx0_h, sx1_h)
    dst = tl.where(first, out0_ptr, out1_ptr) + start * (G * D * tl.num_programs(1)) + kv * (G * D)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    keep = (start + rows < N)[:, None]
    if BLOCK_D != D:  # (a head dim that is not a power of two)
        keep = keep & (cols < D)[None, :]
    x = tl.load(src + rows[:, None] * sx_n + cols[None, :], mask=keep, other=0.0, eviction_policy="evict_first")
    out = dst + rows[:, None] * (G * D * tl.num_programs(1)) + cols[None, :]
    for j in tl.static_range(G):
        tl.store(out + j * D, x, mask=keep)


@triton.jit
def _backward_kernel(dy0_ptr, dy1_ptr, dx0_ptr, dx1_ptr, N, sy0_n, sy0_h, sy1_n, sy1_h,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """dx[n, kv, :] = sum over j < G of dy[n, kv * G + j, :] in float32 (j in order), stored once in dx's dtype."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    kv = tl.program_id(1)
    first = tl.program_id(2) == 0
    sy_n = tl.where(first, sy0_n, sy1_n)
    sy_h = tl.where(first, sy0_h, sy1_h)
    src = tl.where(first, dy0_ptr, dy1_ptr) + start * sy_n + kv * G * sy_h
    dst = tl.where(first, dx0_ptr, dx1_ptr) + start * (D * tl.num_programs(1)) + kv * D
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    keep = (start + rows < N)[:, None]
    if BLOCK_D != D:
        keep = keep & (cols < D)[None, :]
    rows_src = src + rows[:, None] * sy_n + cols[None, :]
    # (no tl.zeros: a jit function of triton.language.standard, which the interpreter could not call)
    acc = tl.load(rows_src, mask=keep, other=0.0, eviction_policy="evict_first").to(tl.float32)
    for j in tl.static_range(1, G):  # unrolled: the G loads are independent, all in flight together
        dy = tl.load(rows_src + j * sy_h, mask=keep, other=0.0, eviction_policy="evict_first")
        acc += dy.to(tl.float32)
    out = dst + rows[:, None] * (D * tl.num_programs(1)) + cols[None, :]
    tl.store(out, acc.to(dx0_ptr.dtype.element_ty), mask=keep)


@dataclass(frozen=True)
class RepeatKVConfig:
    block: int = 16  # tokens per program; a power of two
    num_warps: int = 4  # block * d / (32 * num_warps) elements a thread: d 128 bf16 -> two 16-byte vectors


# Not measured yet: 16 tokens at 4 warps give every thread two 16-byte bf16 vectors of each gradient row (the
# backward keeps 16 x 2 of them in flight), and (4096 tokens, 2 heads, K and V) 1,024 programs, ~8 an H200 SM.
# bench/repeat_kv_speed.py times these candidates against Inductor's kernels as CUDA-graph replays.
DEFAULT = RepeatKVConfig()
CANDIDATES = (DEFAULT, RepeatKVConfig(8, 4), RepeatKVConfig(8, 2), RepeatKVConfig(32, 4), RepeatKVConfig(32, 8),
              RepeatKVConfig(64, 8))  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride along its last dimension (itself where it has one, else a contiguous copy)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check(xs: tuple[torch.Tensor, ...], groups: int, name: str) -> None:
    if groups < 1:
        raise ValueError(f"repeat_kv takes groups >= 1, got {groups}")
    for t in xs:
        if t.dim() != 3:
            raise ValueError(f"repeat_kv takes (tokens, heads, head dim) tensors, got {name} {tuple(t.shape)}")
        if t.shape != xs[0].shape or t.dtype != xs[0].dtype or t.device != xs[0].device:
            raise ValueError(f"a pair must match in shape, dtype and device: {[(tuple(u.shape), u.dtype) for u in xs]}")
        if not t.is_floating_point():
            raise ValueError(f"repeat_kv takes floating-point tensors, got {t.dtype}")


def _launch(kernel, ins: tuple[torch.Tensor, ...], outs: tuple[torch.Tensor, ...], groups: int,
            config: RepeatKVConfig | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """One launch of ``kernel`` over the tokens and K/V heads of ``ins`` (one tensor or two alike) into ``outs``."""
    config = config or DEFAULT
    n, heads, d = ins[0].shape
    n_kv = outs[0].shape[1] if kernel is _backward_kernel else heads
    if n and n_kv and d:
        a, b = ins[0], ins[-1]
        grid = (triton.cdiv(n, config.block), n_kv, len(ins))
        runnable(kernel, a)[grid](a, b, outs[0], outs[-1], n, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                   G=groups, D=d, BLOCK_N=config.block, BLOCK_D=triton.next_power_of_2(d),
                                   num_warps=config.num_warps)  # fmt: skip
    return outs


def fused_forward(xs: tuple[torch.Tensor, ...], groups: int, config: RepeatKVConfig | None = None
                  ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Each x (N, n_kv, d) of ``xs`` (one tensor, or K and V of one shape) repeated to (N, n_kv * groups, d)
    through the Triton kernel, in one launch; contiguous, in x's dtype."""
    _check(xs, groups, "x")
    xs = tuple(_unit_last(t) for t in xs)
    n, n_kv, d = xs[0].shape
    return _launch(_forward_kernel, xs, tuple(t.new_empty((n, n_kv * groups, d)) for t in xs), groups, config)


def fused_backward(grads: tuple[torch.Tensor, ...], groups: int, config: RepeatKVConfig | None = None
                   ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The group sums of each gradient (N, n_kv * groups, d) of ``grads`` -> (N, n_kv, d) through the Triton
    kernel, in one launch: float32 sums, contiguous, in the gradient's dtype."""
    _check(grads, groups, "gradient")
    n, heads, d = grads[0].shape
    if heads % groups:
        raise ValueError(f"{heads} heads are not a whole number of groups of {groups}")
    grads = tuple(_unit_last(t) for t in grads)
    return _launch(_backward_kernel, grads, tuple(t.new_empty((n, heads // groups, d)) for t in grads), groups, config)


def reference(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, n_kv, d) -> (N, n_kv * groups, d): ``attention.repeat_kv_heads`` itself (one copy)."""
    from glmtune.models.attention import repeat_kv_heads  # (attention imports this module lazily, never at import)

    return repeat_kv_heads(x, x.shape[1] * groups)


def reference_backward(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of ``reference``, as autograd takes it through reshape and expand (a sum over the copies)."""
    n, heads, d = grad.shape
    return grad.reshape(n, heads // groups, groups, d).sum(2, keepdim=True).view(n, heads // groups, d)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy (never ``t`` itself: an op's output may not alias its input, as groups = 1 would)."""
    return t.clone(memory_format=torch.contiguous_format)


def _kernel_runs(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRETED


# ---- the custom ops ------------------------------------------------------------------------------------------------
@torch.library.custom_op("glmtune::repeat_kv", mutates_args=())
def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, n_kv, d) -> (N, n_kv * groups, d), head kv * groups + j = x's head kv; differentiable (saves nothing)."""
    return fused_forward((x,), groups)[0] if _kernel_runs(x) else _copy(reference(x, groups))


@repeat_kv.register_fake
def _repeat_kv_fake(x, groups):
    torch._check(x.dim() == 3, lambda: f"repeat_kv takes (tokens, heads, head dim), got {x.shape}")
    return x.new_empty((x.shape[0], x.shape[1] * groups, x.shape[2]))


@torch.library.custom_op("glmtune::repeat_kv_backward", mutates_args=())
def repeat_kv_backward(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of ``repeat_kv``: grad (N, n_kv * groups, d) summed over each group -> (N, n_kv, d)."""
    return fused_backward((grad,), groups)[0] if _kernel_runs(grad) else reference_backward(grad, groups)


@repeat_kv_backward.register_fake
def _repeat_kv_backward_fake(grad, groups):
    torch._check(grad.dim() == 3 and grad.shape[1] % groups == 0, lambda: f"gradient {grad.shape}, groups {groups}")
    return grad.new_empty((grad.shape[0], grad.shape[1] // groups, grad.shape[2]))


@torch.library.custom_op("glmtune::repeat_kv_pair", mutates_args=())
def repeat_kv_pair(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``repeat_kv`` of K and V (N, n_kv, d) each, in one kernel launch each way; differentiable (saves nothing)."""
    if _kernel_runs(k):
        return fused_forward((k, v), groups)
    return _copy(reference(k, groups)), _copy(reference(v, groups))


@repeat_kv_pair.register_fake
def _repeat_kv_pair_fake(k, v, groups):
    torch._check(k.dim() == 3 and k.shape == v.shape, lambda: f"repeat_kv_pair takes K, V alike: {k.shape}, {v.shape}")
    shape = (k.shape[0], k.shape[1] * groups, k.shape[2])
    return k.new_empty(shape), v.new_empty(shape)


@torch.library.custom_op("glmtune::repeat_kv_pair_backward", mutates_args=())
def repeat_kv_pair_backward(dk: torch.Tensor, dv: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``repeat_kv_pair``: each group sum of dk and dv (N, n_kv * groups, d) -> (N, n_kv, d)."""
    if _kernel_runs(dk):
        return fused_backward((dk, dv), groups)
    return reference_backward(dk, groups), reference_backward(dv, groups)


@repeat_kv_pair_backward.register_fake
def _repeat_kv_pair_backward_fake(dk, dv, groups):
    torch._check(dk.dim() == 3 and dk.shape == dv.shape and dk.shape[1] % groups == 0,
                 lambda: f"gradients {dk.shape}, {dv.shape}, groups {groups}")  # fmt: skip
    shape = (dk.shape[0], dk.shape[1] // groups, dk.shape[2])
    return dk.new_empty(shape), dv.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.groups = inputs[-1]


def _backward(ctx, grad):
    return repeat_kv_backward(grad, ctx.groups), None


def _pair_backward(ctx, dk, dv):
    dk, dv = repeat_kv_pair_backward(dk, dv, ctx.groups)
    return dk, dv, None


repeat_kv.register_autograd(_backward, setup_context=_setup_context)
repeat_kv_pair.register_autograd(_pair_backward, setup_context=_setup_context)
