"""LoRA: a low-rank update ``scale * B @ A`` beside a frozen linear layer, and the ``lora`` method.

``LoraLinear`` wraps any module with ``in_features`` / ``out_features`` and a ``forward`` (``nn.Linear`` today, a
quantized linear later) as ``base_layer``, next to ``lora_A`` (r, in) and ``lora_B`` (out, r) kept in float32 while
the base stays in its own (low) precision. Its forward is PEFT's::

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scale        scale = alpha / r  (rsLoRA: alpha / sqrt(r))

with ``x`` cast to the adapter's dtype and the update cast back to the base output's dtype. A starts as PyTorch's
``nn.Linear`` default (Kaiming-uniform), B as zeros, so a fresh adapter changes nothing.

Wrapping renames the base weight (``...query_key_value.base_layer.weight``); the adapter tensors are named
``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with the original module names, which is PEFT's layout once
its ``base_model.model.`` prefix is added (see ``peft_format``). ``merge_lora`` folds every update into its base
weight and puts the plain base module back, so the model has its original parameter names again.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.models.config import GLMConfig

if TYPE_CHECKING:
    from glmtune.adapters import LoraOptions

log = logging.getLogger(__name__)

ALL_LINEAR = "all"


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


class LoraLinear(nn.Module):
    """``base_layer(x) + scale * B(A(dropout(x)))`` with A, B in ``dtype`` (float32) beside a frozen base layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not _is_linear_like(base_layer):
            raise TypeError(f"LoRA wraps modules with in_features/out_features; got {type(base_layer).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        device = _module_device(base_layer)
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scale(rank, alpha, use_rslora)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # under torch.compile, A's input recomputed in the backward instead of kept (see forward); False keeps it
        self.recompute_input = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as ``nn.Linear``'s default (Kaiming-uniform, a = sqrt(5)), B zero: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * B @ A`` (out, in) in ``dtype`` (float32, or float64 for a float64 base)."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (computed in float32, rounded once to the weight's dtype)."""
        if self.merged:
            return
        w = self._base_weight()
        work = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(work) + self.delta_weight(work).to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (exact in float32; within rounding in half precision)."""
        if not self.merged:
            return
        w = self._base_weight()
        work = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(work) - self.delta_weight(work).to(w.device)).to(w.dtype))
        self.merged = False

    def _base_weight(self) -> torch.Tensor:
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} without a floating-point weight "
                "(a quantized base): keep the adapter separate or merge into an unquantized checkpoint"
            )
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in)
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        if self.recompute_input and torch.compiler.is_compiling():
            # Left alone, a compiled graph keeps A's input for A's gradient: x cast to float32 and dropped out,
            # (..., in) float32 (twice x's bytes) plus the dropout mask, ~17 % of a ChatGLM block's saved activations
            # (the partitioner never recomputes what a backward matmul reads). Checkpointed, the backward recomputes
            # it from x (itself recomputed from the block's input) and the dropout from its saved seed / RNG state:
            # the same values, so the same gradients. (Under CUDA graphs this relies on Inductor drawing dropout
            # from saved seeds, its default: with torch._inductor.config.fallback_random, or another backend, the
            # checkpoint would save and restore the RNG state, which a graph capture refuses.)
            xa = checkpoint(self._a_input, x, use_reentrant=False)
        else:
            xa = self._a_input(x)
        a = self.lora_A(xa)  # (..., r)
        return result + (self.lora_B(a) * self.scaling).to(result.dtype)

    def _a_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout(x.to(self.lora_A.weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


# ---- finding and wrapping modules -----------------------------------------------------------------------------------
def parse_targets(target_modules: str | Sequence[str]) -> list[str] | str:
    """``"all"`` stays ``"all"``; a string is a comma-separated list of module names; a list is kept."""
    if isinstance(target_modules, str):
        if target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        names = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in target_modules]
    if not names or any(not n for n in names):
        raise ValueError(f"target_modules must name at least one module, got {target_modules!r}")
    return names


def matches_target(module_name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of targets: the full name, or a suffix after a dot."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _excluded(model: nn.Module) -> set[int]:
    """Modules ``all`` leaves out: the output layer and the P-Tuning prefix encoder."""
    out: set[int] = set()
    get_out = getattr(model, "output_embeddings", None)
    if callable(get_out):
        out.add(id(get_out()))
    prefix = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
    if isinstance(prefix, nn.Module):
        out.update(id(m) for m in prefix.modules())
    return out


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the modules LoRA wraps for ``target_modules`` (PEFT's suffix matching; ``all`` = every linear layer
    except the output layer). Raises ValueError when a name matches nothing or matches a non-linear module."""
    targets = parse_targets(target_modules)
    excluded = _excluded(model)
    linear = {
        name: m
        for name, m in model.named_modules()
        if name and _is_linear_like(m) and not isinstance(m, LoraLinear) and id(m) not in excluded
    }
    if targets == ALL_LINEAR:
        found = list(linear)
    else:
        found = []
        for name, m in model.named_modules():
            if not name or not matches_target(name, targets) or isinstance(m, LoraLinear):
                continue
            if name.endswith((".base_layer", ".lora_A", ".lora_B")):
                continue
            if name not in linear:
                raise ValueError(
                    f"target_modules: {name!r} is a {type(m).__name__}, not a linear layer LoRA can wrap"
                    + (" (the output layer is not a LoRA target)" if id(m) in excluded else "")
                )
            found.append(name)
        seen = {t for t in targets if any(matches_target(n, [t]) for n in found)}
        if missing := [t for t in targets if t not in seen]:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            close = difflib.get_close_matches(missing[0], leaves, n=1)
            raise ValueError(
                f"target_modules: no linear layer named {missing[0]!r} in this model"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; its linear layers: {', '.join(leaves)} (or 'all')"
            )
    if not found:
        raise ValueError(f"target_modules {target_modules!r} matched no linear layer of the model")
    return found


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    use_rslora: bool = False


def inject_lora(model: nn.Module, specs: Mapping[str, LoraSpec], *, dropout: float = 0.0) -> dict[str, LoraLinear]:
    """Wrap each named module in a ``LoraLinear`` (float32 A/B on the module's device). Returns name -> wrapper."""
    out: dict[str, LoraLinear] = {}
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"LoRA target {name!r} is not a module of this model") from None
        if isinstance(module, LoraLinear):
            raise ValueError(f"{name!r} already has a LoRA adapter")
        wrapper = LoraLinear(module, rank=spec.rank, alpha=spec.alpha, dropout=dropout, use_rslora=spec.use_rslora)
        wrapper.train(module.training)  # an eval-mode model stays in eval mode (no adapter dropout)
        setattr(parent, child, wrapper)
        out[name] = wrapper
    return out


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA wrapper of the model by module name (the original name of the wrapped layer)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for every adapter, detached."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the base module back in place of the wrapper.

    Returns the number of merged layers. The model afterwards has its original parameter names and no adapter.
    """
    layers = lora_layers(model)
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if layers:
        log.info("merged %d LoRA layer(s) into the base weights", len(layers))
    return len(layers)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ---- the method ------------------------------------------------------------------------------------------------------
class LoraMethod:
    """``lora``: frozen base, trainable float32 A/B on the target modules; saved and loaded in PEFT's format.

    ``base_model_name_or_path`` (set by whoever knows it, e.g. the trainer) goes into adapter_config.json; when it is
    None, ``model.name_or_path`` is used if the model has one.
    """

    name = "lora"

    def __init__(self, options: LoraOptions, *, base_model_name_or_path: str | None = None) -> None:
        self.options = options
        self.base_model_name_or_path = base_model_name_or_path

    def target_names(self, model: nn.Module) -> list[str]:
        return find_targets(model, self.options.target_modules)

    def setup(self, model: nn.Module) -> None:
        if lora_layers(model):
            raise ValueError("this model already has LoRA adapters; set the method up on a plain base model")
        o = self.options
        names = self.target_names(model)
        _freeze(model)
        spec = LoraSpec(o.rank, o.alpha, o.use_rslora)
        inject_lora(model, dict.fromkeys(names, spec), dropout=o.dropout)
        log.info("LoRA rank %d alpha %g%s on %d module(s): %s", o.rank, o.alpha, " (rsLoRA)" if o.use_rslora else "",
                 len(names), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})))  # fmt: skip

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def save(
        self, model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[Path] = ()
    ) -> None:
        from glmtune.adapters.peft_format import save_lora_adapter

        base = self.base_model_name_or_path or getattr(model, "name_or_path", None)
        save_lora_adapter(
            model, out_dir, target_modules=self.options.target_modules, dropout=self.options.dropout,
            base_model_name_or_path=base, tokenizer_files=tokenizer_files,
        )  # fmt: skip

    def load(self, model: nn.Module, src_dir: str | Path) -> None:
        from glmtune.adapters.peft_format import load_lora_adapter

        load_lora_adapter(model, src_dir)

    def merge(self, model: nn.Module) -> None:
        if merge_lora(model) == 0:
            raise ValueError("this model has no LoRA adapter to merge")
