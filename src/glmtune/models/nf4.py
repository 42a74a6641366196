"""NF4 with double quantization (QLoRA's 4-bit NormalFloat), quantized by torchao, and the frozen linear that holds it.

Quantizing is torchao's ``to_nf4`` (what torchtune's QLoRA uses): the weight, flattened, is cut into blocks of 64
values; each block is divided by its absmax and every value stored as the index (4 bits, two per byte, the first
value in the high nibble) of the nearest of the 16 NF4 levels. The block absmaxes are quantized again ("double
quantization"): their mean is subtracted, and each group of 256 of them is stored as int8 with one factor per group.
About 4.13 bits per weight.

``NF4Linear`` keeps torchao's tensors as plain buffers (``quantized_data`` uint8, ``quantized_scalers`` int8,
``quantization_factor``, ``scaler_mean``, ``nf4``), so the layer moves, saves and broadcasts like any module; its
forward dequantizes with ``dequantize_nf4`` (bit-identical to torchao's, in fewer passes; one fused kernel under
``torch.compile`` on CUDA) inside an autograd function that keeps only the packed tensors for the backward: the
gradient reaches the input, the weight never trains. Only quantizing needs torchao; ``require_torchao`` says what
to do when it is missing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BLOCK_SIZE = 64  # values per absmax block
SCALER_BLOCK_SIZE = 256  # absmaxes per double-quantization group
MIN_TORCHAO = "0.16"
_INSTALL = (
    f"quantize nf4 needs torchao >= {MIN_TORCHAO} (pip install 'torchao>={MIN_TORCHAO}'), which {{why}}; "
    "int8 and int4 (THUDM's format) run without it"
)


class NF4Unavailable(ValueError):
    """NF4 was asked for where torchao cannot quantize; the message names what can run instead."""


@contextmanager
def _quiet(*names: str):
    """Silence the warnings torchao's import logs about its optional C++/CUDA extensions (NF4 does not use them)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require_torchao() -> Callable[..., Any]:
    """torchao's ``to_nf4``, or ``NF4Unavailable`` naming the fix and the quantizations that run without it."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            try:
                from torchao.quantization import to_nf4  # torchao >= 0.15
            except ImportError:
                from torchao.dtypes import to_nf4  # older releases
    except ImportError as e:
        raise NF4Unavailable(_INSTALL.format(why=f"cannot be imported here ({e})")) from None
    return to_nf4


def check_nf4_shape(name: str, out_features: int, in_features: int) -> None:
    """torchao's double quantization needs whole groups: ``out * in`` a multiple of 64 * 256 values."""
    group = BLOCK_SIZE * SCALER_BLOCK_SIZE
    if (out_features * in_features) % group:
        raise ValueError(
            f"{name}: NF4 needs a weight whose size is a multiple of {group} values (blocks of {BLOCK_SIZE}, scales in "
            f"groups of {SCALER_BLOCK_SIZE}); shape ({out_features}, {in_features}) is not: use int8 or int4"
        )


def _pairs(nf4: torch.Tensor) -> torch.Tensor:
    """(256, 2): the two NF4 levels a byte holds, high nibble first."""
    return torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=-1)


def dequantize_nf4(
    quantized_data: torch.Tensor,
    quantized_scalers: torch.Tensor,
    quantization_factor: torch.Tensor,
    scaler_mean: torch.Tensor,
    nf4: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """The (out, in) weight in the quantization dtype (``nf4.dtype``), with torchao's arithmetic step for step:
    block scale = int8 / factor + mean, value = level * block scale."""
    groups = quantization_factor.numel()
    scalers = (quantized_scalers.view(groups, -1) / quantization_factor.unsqueeze(-1)).flatten().to(nf4.dtype)
    scalers = scalers + scaler_mean  # (n_blocks,)
    values = _pairs(nf4)[quantized_data.int()]  # (numel / 2, 2)
    return (values.view(scalers.numel(), -1) * scalers.unsqueeze(-1)).view(shape)


class _Compiled:
    """``dequantize_nf4`` through ``torch.compile`` (one fused kernel per weight shape), made on first use; if
    compiling fails (no Triton, an old driver) the eager function serves from then on, with one warning."""

    def __init__(self) -> None:
        self.fn: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.failed:
            try:
                if self.fn is None:
                    self.fn = torch.compile(dequantize_nf4, dynamic=False)
                return self.fn(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path computes the same
                self.failed = True
                log.warning("NF4: torch.compile of the dequantization failed (%s); dequantizing eagerly", e)
        return dequantize_nf4(*args)


@functools.cache
def _compiled_dequantize() -> _Compiled:
    return _Compiled()


def _dequantize(tensors: tuple[torch.Tensor, ...], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    fn = _compiled_dequantize() if tensors[0].is_cuda and not torch.compiler.is_compiling() else dequantize_nf4
    return fn(*tensors, shape).to(dtype)


class _NF4Linear(torch.autograd.Function):
    """x @ W^T with W dequantized in the forward and again in the backward: only the packed tensors are saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shape: tuple[int, int], *tensors: torch.Tensor) -> torch.Tensor:
        ctx.shape = shape
        ctx.save_for_backward(*tensors)
        return F.linear(x, _dequantize(tensors, shape, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        grad_x = grad @ _dequantize(tensors, ctx.shape, grad.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, None, *([None] * len(tensors)))


_BUFFERS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


class NF4Linear(nn.Module):
    """A frozen linear layer in NF4 with double quantization. Built from a float weight (``from_linear``, or on meta
    with a placeholder ``weight`` that ``load_float_weight_`` replaces as the checkpoint loads, one weight at a time).
    The bias stays as it is (a parameter that does not train)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # the checkpoint's slot until the float weight arrives (meta: no memory)
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, device="meta", dtype=dtype), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> NF4Linear:
        """The NF4 form of ``linear``; on meta only the shapes are made (the weight comes from a checkpoint)."""
        check_nf4_shape(name, linear.out_features, linear.in_features)
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            q.load_float_weight_(w.detach())
            if linear.bias is not None:
                q.bias.data.copy_(linear.bias.detach())
        return q

    @property
    def quantized(self) -> bool:
        return "quantized_data" in self._buffers

    @torch.no_grad()
    def load_float_weight_(self, w: torch.Tensor) -> None:
        """Quantize ``w`` (out, in) with torchao, in its dtype on its device, into this layer's buffers."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: weight of shape {tuple(w.shape)}, expected "
                             f"({self.out_features}, {self.in_features})")  # fmt: skip
        nf4 = require_torchao()(w.contiguous(), BLOCK_SIZE, SCALER_BLOCK_SIZE)
        self.weight = None  # stays a parameter slot holding None: not in the state dict
        for name in _BUFFERS:
            self.register_buffer(name, getattr(nf4, name).detach().clone())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        if not self.quantized:
            raise RuntimeError("NF4Linear: the weight was never loaded")
        return tuple(getattr(self, n) for n in _BUFFERS)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight NF4 stands for, in ``dtype``."""
        return dequantize_nf4(*self._tensors(), (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as F.linear would: multiply (and dequantize) in that dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _NF4Linear.apply(x, (self.out_features, self.in_features), *self._tensors())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """The weight an ``NF4Linear`` made from ``w`` (out, in) stands for, in ``w``'s dtype: what a QLoRA adapter was
    trained over (``glmtune merge``)."""
    layer = NF4Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    layer.load_float_weight_(w)
    return layer.dequantized(w.dtype)
