"""``full``: every weight is trained; the result is a complete checkpoint in the original format.

``save_full_model`` / ``load_full_model`` are shared with ``freeze``, whose result is a complete checkpoint too. The
weights are written in the dtype the base checkpoint came in (``config.torch_dtype``, e.g. float16 for ChatGLM3-6B,
bfloat16 for GLM-4) even when training upcast them to float32, so the folder loads wherever the original does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmtune.models.checkpoint import load_weights, save_pretrained
from glmtune.models.config import GLMConfig

if TYPE_CHECKING:
    from glmtune.adapters import FullOptions

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_dtype(model: nn.Module, config: GLMConfig) -> torch.dtype | None:
    """The dtype a full result is written in: the base checkpoint's (``config.torch_dtype``), else as the model is."""
    if config.torch_dtype in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[config.torch_dtype]
    return None


def _check_plain(model: nn.Module) -> None:
    from glmtune.adapters.lora import lora_layers

    if lora_layers(model):
        raise ValueError("the model has LoRA layers; merge them (method.merge) before saving a full checkpoint")


def save_full_model(
    model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[str | Path] = ()
) -> Path:
    """A complete model folder (safetensors shards, config.json, tokenizer files), written atomically."""
    _check_plain(model)
    return save_pretrained(model, config, out_dir, tokenizer_files, dtype=save_dtype(model, config))


def load_full_model(model: nn.Module, src_dir: str | Path) -> None:
    """Load a complete checkpoint into an existing model, each tensor kept in its current dtype and device."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    rules = model.checkpoint_rules() if hasattr(model, "checkpoint_rules") else {}
    load_weights(model, src_dir, dtype=ref.dtype, device=ref.device, **rules)


class WholeWeightsMethod:
    """Shared by the methods that train the model's own weights (full, freeze): a result is a complete model folder
    in the original format, and there is nothing to merge."""

    name = "whole-weights"

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def save(
        self, model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[Path] = ()
    ) -> None:
        save_full_model(model, out_dir, config=config, tokenizer_files=tokenizer_files)

    def load(self, model: nn.Module, src_dir: str | Path) -> None:
        load_full_model(model, src_dir)

    def merge(self, model: nn.Module) -> None:
        raise ValueError(f"{self.name} fine-tuning changes the weights themselves: there is nothing to merge")


class FullMethod(WholeWeightsMethod):
    """Every parameter trainable (the trainer keeps them and their optimizer state in float32)."""

    name = "full"

    def __init__(self, options: FullOptions) -> None:
        self.options = options

    def setup(self, model: nn.Module) -> None:
        _check_plain(model)
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
