"""A Triton matrix-vector product for half-precision linear layers fed one row: decode at batch 1.

At one row a linear layer reads its whole weight to do two flops per weight, so it is bound by memory bandwidth;
cuBLAS reaches 1.8-3.3 TB/s of an H200's ~4.8 on ChatGLM3-6B's block linears (bench/RESULTS.md). The kernel here
streams the weight with many small programs (``BLOCK_N`` output rows each, 16-byte loads along the input), adds the
products in float32 and reduces each row once at the end.

The launch configuration is measured once per (out, in, dtype, bias) on the device (``tune``: a few candidates,
each timed as CUDA-graph replays after a read of a buffer larger than the L2 cache, as a decode step meets the weight;
the choice is logged) and kept for the process, like Triton's own autotuning; a first call while a CUDA graph is being
captured (no measuring possible) takes ``DEFAULT``. Generation warms every decode step up before capturing it, so its
calls are measured first.

``gemv`` is a torch.library custom op with a fake implementation, so it traces under ``torch.compile`` and is
captured in CUDA graphs. :class:`MatvecMode` routes ``F.linear`` calls that fit (``fits``) to it, which is how the
decode step uses it without touching the model's modules: LoRA wrappers, the serving ``MultiLoraLinear`` and the
quantized layers call their base layers as they always do, and the calls that do not fit (float32 LoRA factors,
quantized weights, tensor subclasses, several rows) go to ``F.linear`` unchanged.

Imported only where Triton is. With ``TRITON_INTERPRET=1`` set before the import, the kernel runs on CPU tensors in
Triton's interpreter (how the CPU tests run it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float16)
MIN_WEIGHT_ELEMENTS = 1 << 20  # smaller weights stay with F.linear (launch-bound either way)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how the kernel below was built (at import)


# Only Triton builtins and the functions here are called inside the kernel (no tl.sum / tl.zeros: those are compiled
# when Triton is imported, so a module imported later with TRITON_INTERPRET=1 could not call them).
@triton.jit
def _plus(a, b):
    return a + b


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """y[n] = sum_k w[n, k] x[k] (+ b[n]) for BLOCK_N rows n, in steps of BLOCK_K inputs: the whole steps without
    masks (so the loads stay 16-byte vectors), a masked tail when BLOCK_K does not divide K."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + tl.minimum(offs_n, N - 1)[:, None] * stride_wn  # (bn, 1): a last partial block rereads row N-1
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    k_main = K - K % BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k).to(tl.float32)
        w = tl.load(rows + k[None, :], eviction_policy="evict_first").to(tl.float32)  # read once: keep x in L2
        acc += w * x[None, :]
    if k_main < K:
        k = k_main + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(rows + k[None, :], mask=k[None, :] < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.reduce(acc, 1, _plus)  # (bn,)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@dataclass(frozen=True)
class MatvecConfig:
    block_n: int  # output rows per program
    block_k: int  # inputs per step (bf16/fp16: 8 a 16-byte load)
    num_warps: int = 4
    num_stages: int = 3


# The blocks that were fastest on an H200 for some ChatGLM3-6B linear, timed as CUDA-graph replays over weights
# larger than the L2 cache (bench/profile_decode.py --kernels, 21 shapes tried): one row of 1024 inputs a step was
# the fastest for 4 of the 5 linears (3.1-4.5 TB/s), two rows of 512 for the 4h_to_h (K 13696); 8 or 16 rows a
# program were 5-60 % slower everywhere.
DEFAULT = MatvecConfig(1, 1024)
CANDIDATES = (DEFAULT, MatvecConfig(1, 512, 2), MatvecConfig(2, 1024), MatvecConfig(2, 1024, 4, 4),
              MatvecConfig(2, 512, 2), MatvecConfig(4, 512), MatvecConfig(4, 512, 4, 1),
              MatvecConfig(8, 512))  # fmt: skip
_tuned: dict[tuple, MatvecConfig] = {}  # (out, in, dtype, bias, device index) -> the fastest candidate measured


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` is a product this kernel takes: one row of a plain CUDA half-precision
    tensor (any leading shape of ones), a plain 2-D weight of the same dtype with contiguous rows and at least
    ``MIN_WEIGHT_ELEMENTS`` elements, no autocast, no gradient wanted."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return (
        type(x) in plain
        and type(weight) in plain
        and (x.is_cuda or INTERPRETED)
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and weight.device == x.device
        and weight.dim() == 2
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and x.numel() == x.shape[-1]
        and weight.stride(1) == 1
        and weight.numel() >= MIN_WEIGHT_ELEMENTS
        and (bias is None or (type(bias) in plain and bias.dtype == x.dtype and bias.shape == (weight.shape[0],)))
        and not torch.is_autocast_enabled(x.device.type)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: MatvecConfig) -> torch.Tensor:
    """``weight @ x + bias`` for one row ``x`` (K,) with ``config``'s blocks -> (N,)."""
    n, k = weight.shape
    y = torch.empty((n,), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y  # a pointer the kernel never reads
    grid = (triton.cdiv(n, config.block_n),)
    _matvec_kernel[grid](x, weight, b, y, n, k, weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
                         BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
    return y


def tune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> MatvecConfig:
    """The fastest of ``CANDIDATES`` for this shape, measured once (``replay_ms``) and kept; ``DEFAULT`` in the
    interpreter or during a capture."""
    key = (*weight.shape, x.dtype, bias is not None, x.device.index)
    config = _tuned.get(key)
    if config is not None:
        return config
    if INTERPRETED or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return DEFAULT
    # Read (never write: dirty lines would cost the next kernel their write-back) twice the L2 between calls, so
    # the weight comes from device memory as in a decode step; that read's own time is taken off.
    flush = torch.empty(2 * torch.cuda.get_device_properties(x.device).L2_cache_size // 4, device=x.device)
    flush.fill_(1.0)
    alone = replay_ms([lambda: flush.sum()] * 10)
    times = {c: replay_ms([lambda c=c: (flush.sum(), launch(x, weight, bias, c))] * 10) - alone for c in CANDIDATES}
    config = min(times, key=times.__getitem__)
    gbs = weight.numel() * weight.element_size() / times[config] / 1e6  # bytes / ms -> GB/s
    log.info("matvec %s x %s %s: %s, %.1f us (%.0f GB/s of weight)", weight.shape[0], weight.shape[1], x.dtype,
             config, 1000 * times[config], gbs)  # fmt: skip
    _tuned[key] = config
    return config


def replay_ms(calls: Sequence[Callable[[], object]], replays: int = 7) -> float:
    """Median ms per call of a CUDA graph that makes ``calls`` in turn (each run once before, uncaptured: compiled,
    allocated), over ``replays`` replays: kernel times without the host's launch gaps, as a captured step runs."""
    for call in calls:
        call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[replays // 2] / len(calls)


def tuned_configs() -> dict[tuple, MatvecConfig]:
    """The configurations measured so far in this process (for benchmarks' records)."""
    return dict(_tuned)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: MatvecConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``F.linear(x, weight, bias)`` for ``x`` holding one row, (..., K) -> (..., N). ``config``: the blocks instead
    of the tuned ones (tests force them)."""
    if x.numel() != x.shape[-1] or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"matvec takes one row of {tuple(weight.shape[1:])} inputs, got {tuple(x.shape)}")
    x1 = x.reshape(-1).contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    y = launch(x1, w, bias, config or tune(x1, w, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- the custom op and the mode that routes F.linear to it ---------------------------------------------------------
@torch.library.custom_op("glmtune::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` (..., K) through the Triton matrix-vector kernel."""
    return matvec(x, weight, bias)


@gemv.register_fake
def _gemv_fake(x, weight, bias=None):
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"input has {x.shape[-1]} features; weight {weight.shape}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class MatvecMode(TorchFunctionMode):
    """While active, ``F.linear`` calls that ``fits`` run as :func:`gemv`; every other call runs as it would.

    Entered around a decode step's first calls (its warm-up, its compilation and its CUDA-graph capture), so the
    captured step replays the kernel; traced by ``torch.compile`` like any torch function mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            call = {**dict(zip(("input", "weight", "bias"), args, strict=False)), **kwargs}
            x, weight, bias = call["input"], call["weight"], call.get("bias")
            if fits(x, weight, bias):
                return gemv(x, weight, bias)
        return func(*args, **kwargs)
