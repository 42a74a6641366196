"""THUDM's INT4/INT8 weight format (chatglm-6b-int4, chatglm2-6b-int4, ...) and the frozen linear layer that holds it.

A quantized linear stores an int8 ``weight`` and a per-output-row ``weight_scale`` (fp16); the real weight is the
integer times the scale of its row, with ``scale = absmax(row) / (2^(bits-1) - 1)`` and the integers rounded. INT8
holds one value per byte, shape (out, in); INT4 two signed 4-bit values per byte, the high nibble first, shape
(out, in/2). The bias stays as it is. In a block the four linears ``query_key_value``, ``dense``,
``dense_h_to_4h`` and ``dense_4h_to_h`` are quantized; everything else keeps its dtype.

The forward here is the reference path on any device: dequantize, then multiply (``_matmul``: the seam for a fused
kernel). The layer has no trainable tensors, but gradients flow through it to its input (adapters over a quantized
base).

INT4 layers have a second, inference-only layout (``use_inference_layout``, opt-in at load time for generation):
tinygemm's tiled words (``models/int4_pack.py``), multiplied by PyTorch's INT4 kernel at a few rows. It replaces the
THUDM bytes in ``weight`` (no second copy); the state dict, ``dequantized`` and a state-dict load still speak THUDM's
format, bit for bit. Training keeps THUDM's layout and the Triton kernels.

``quantize_model_`` swaps the same four linears for ``QuantizedLinear`` (int8, int4) or for ``NF4Linear`` (nf4:
QLoRA's NormalFloat with double quantization, ``models/nf4.py``; quantize-on-load only, no file format).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.models.nf4 import NF4Linear, check_nf4_shape, require_torchao

BITS = (4, 8)
LAYOUTS = ("thudm", "tinygemm")  # INT4 storage: THUDM's bytes, or tinygemm's words (inference; int4_pack)
SCHEMES = ("none", "int8", "int4", "nf4")  # what ``quantize`` (training config, --quantize) may name
# The block linears THUDM's format quantizes: v1 under transformer.layers.{i}.attention/.mlp, v2+ under
# transformer.encoder.layers.{i}.self_attention/.mlp.
QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
QUANTIZED_WEIGHT = re.compile(
    r"^transformer\.(?:encoder\.)?layers\.\d+\.(?:attention|self_attention|mlp)\."
    rf"(?:{'|'.join(QUANTIZED_LINEARS)})\.weight$"
)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    return bits


def _qmax(bits: int) -> int:
    return 2 ** (check_bits(bits) - 1) - 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 values in [-8, 7] -> (out, in/2) int8 bytes, column 2j in the high nibble, 2j+1 in the low."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.int16)
    return ((q[..., 0::2] << 4) | (q[..., 1::2] & 0x0F)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: (out, in/2) int8 bytes -> (out, in) int8 values in [-8, 7]."""
    p = packed.to(torch.int16)
    high = p >> 4  # arithmetic shift: sign-extended
    low = ((p & 0x0F) ^ 8) - 8
    return torch.stack([high, low], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float (out, in) weight -> (int8 weight in the stored layout, fp16 scale per row). Rows of zeros get scale 0."""
    qmax = _qmax(bits)
    w = w.detach().float()
    scale = (w.abs().amax(dim=-1) / qmax).to(torch.float16)  # the stored scale is what dequantizing uses
    s = scale.float()
    q = torch.round(w / torch.where(s == 0, 1.0, s)[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The real (out, in) weight in ``dtype`` from the stored int8 weight and the per-row scale."""
    values = unpack_int4(q) if check_bits(bits) == 4 else q
    return values.to(dtype) * scale.to(dtype)[:, None]


def _matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ W^T + b. On CUDA with Triton: the fused dequantize-and-multiply kernels (``quant_kernels``, custom ops
    that work under torch.compile and CUDA graphs); elsewhere the reference path: dequantize, then multiply."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        try:
            from glmtune.models.quant_kernels import int_linear
        except ImportError:  # no Triton: the reference path below
            pass
        else:
            if torch.is_autocast_enabled(x.device.type):  # as F.linear would: multiply in the autocast dtype
                x = x.to(torch.get_autocast_dtype(x.device.type))
            return int_linear(x, q, scale, bits, bias)
    w = dequantize_weight(q, scale, bits, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class QuantizedLinear(nn.Module):
    """A frozen linear layer in THUDM's format: ``weight`` (int8 buffer), ``weight_scale`` (fp16 buffer), ``bias``
    (a parameter that does not train). State-dict names are the original ones."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"INT4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        cols = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight", torch.empty(out_features, cols, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.layout = "thudm"
        self.tinygemm: tuple[int, int] | None = None  # (inner_k_tiles, group size) in the tinygemm layout

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """The quantized form of ``linear``; on meta only the shapes are made (weights come from a checkpoint)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, device=w.device,
                dtype=w.dtype)  # fmt: skip
        if not w.is_meta:
            weight, scale = quantize_weight(w, bits)
            q.weight.copy_(weight)
            q.weight_scale.copy_(scale)
            if linear.bias is not None:
                q.bias.data.copy_(linear.bias.detach())
        return q

    def thudm_weight(self) -> torch.Tensor:
        """The int8 weight in THUDM's layout (the stored bytes, whatever the layout in memory)."""
        if self.layout == "tinygemm":
            from glmtune.models.int4_pack import unpack

            return unpack(self.weight)
        return self.weight

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.thudm_weight(), self.weight_scale, self.bits, dtype)

    @torch.no_grad()
    def to_layout(self, layout: str) -> bool:
        """Store the INT4 weight in ``layout`` (``LAYOUTS``), replacing the buffer (the old one is freed); False
        where tinygemm cannot take the shape (INT8, out not a multiple of 8, in not of 32: the layer stays)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        if layout == self.layout:
            return True
        from glmtune.models import int4_pack

        if layout == "thudm":
            self.weight = int4_pack.unpack(self.weight)
            del self.scales_zeros
            self.layout, self.tinygemm = "thudm", None
            return True
        params = int4_pack.tinygemm_params(self.out_features, self.in_features) if self.bits == 4 else None
        if params is None or self.weight.is_meta:
            return False
        inner_k_tiles, group = params
        packed = int4_pack.pack(self.weight, inner_k_tiles)
        self.weight = packed  # the THUDM bytes go (a buffer's assignment)
        self.register_buffer("scales_zeros", int4_pack.scales_and_zeros(self.weight_scale, self.in_features, group),
                             persistent=False)  # fmt: skip
        self.layout, self.tinygemm = "tinygemm", params
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "tinygemm":  # the checkpoint keeps THUDM's bytes
            destination[prefix + "weight"] = self.thudm_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        layout = self.layout
        self.to_layout("thudm")  # a state dict holds THUDM's bytes: load them as they are, then repack
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.to_layout(layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "tinygemm":
            return _tinygemm_matmul(x, self)
        return _matmul(x, self.weight, self.weight_scale, self.bits, self.bias)

    def extra_repr(self) -> str:
        layout = f", layout={self.layout}" if self.layout != "thudm" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{layout}"


def _tinygemm_matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """x @ W^T + b for a layer in the tinygemm layout: on CUDA the ``glmtune::int4_tc_linear`` op (tinygemm at a few
    bf16 rows, else dequantize + cuBLAS), on the CPU the CPU tinygemm op."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    inner_k_tiles, group = layer.tinygemm
    if x.is_cuda:
        from glmtune.models.quant_kernels import int4_tc_linear

        return int4_tc_linear(x, layer.weight, layer.scales_zeros, layer.weight_scale, group, layer.bias)
    from glmtune.models.int4_pack import linear_cpu

    return linear_cpu(x, layer.weight, layer.scales_zeros, group, inner_k_tiles, layer.bias)


def scheme_of(bits: int | str) -> str:
    """``4`` / ``8`` / ``"int4"`` / ``"int8"`` / ``"nf4"`` / ``0`` / ``"none"`` -> the scheme's name in ``SCHEMES``."""
    scheme = {0: "none", 4: "int4", 8: "int8"}.get(bits, bits) if isinstance(bits, int) else bits
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {bits!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def is_quantized(module: nn.Module) -> bool:
    """A frozen quantized linear (THUDM int8/int4 or NF4): LoRA stays beside it, nothing trains in it."""
    return isinstance(module, (QuantizedLinear, NF4Linear))


def quantize_model_(model: nn.Module, bits: int | str) -> nn.Module:
    """Swap the block linears THUDM's format quantizes, in place: for ``QuantizedLinear`` (``bits`` 4/8, "int4"/"int8")
    or ``NF4Linear`` ("nf4"). On meta before loading a checkpoint: a quantized folder loads as it is, a full-precision
    one is quantized tensor by tensor as it loads."""
    scheme = scheme_of(bits)
    if scheme == "none":
        return model
    if scheme == "nf4":
        require_torchao()  # before any weight is read: a clear message naming what runs instead
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and QUANTIZED_WEIGHT.match(full + ".weight"):
                if scheme == "nf4":
                    check_nf4_shape(full, child.out_features, child.in_features)
                targets.append((module, child_name, child, full))
    for module, child_name, child, full in targets:
        new = NF4Linear.from_linear(child, full) if scheme == "nf4" else QuantizedLinear.from_linear(
            child, int(scheme[3:]))  # fmt: skip
        setattr(module, child_name, new)
    return model


def config_bits(config: object, source: object = "config.json") -> int:
    """``quantization_bit`` of a GLMConfig (a v1 field; v2+ configs keep it in ``extra``) or of config.json's raw
    dict; 0 when not quantized."""
    if isinstance(config, dict):
        bits = config.get("quantization_bit", 0) or 0
    else:
        bits = getattr(config, "quantization_bit", 0) or getattr(config, "extra", {}).get("quantization_bit", 0) or 0
    if bits and bits not in BITS:
        raise ValueError(f"{source}: 'quantization_bit' must be 4 or 8 (or 0), got {bits!r}")
    return int(bits)


def use_inference_layout(model: nn.Module, layout: str = "tinygemm") -> int:
    """Store the INT4 ``QuantizedLinear`` layers of a model loaded for generation in ``layout`` ("tinygemm" or
    "thudm"), one layer at a time, each buffer replaced (peak: one layer's bytes twice); layers whose shape tinygemm
    cannot take stay in THUDM's. Returns the number of layers now in tinygemm's layout. Not for training (its
    backward dequantizes every step). Opt-in: on an H200 the default INT4 path (THUDM's layout, the tensor-core GEMV
    at one row, the tiled kernel at a few) was faster at every row count measured (bench/RESULTS.md)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.bits == 4:
            module.to_layout(layout)
            count += module.layout == "tinygemm"
    return count
