"""The surface every fine-tuning method shares, so the training loop never asks which method it runs.

A method is built from its options (``build_method`` in ``glmtune.adapters``), then:

- ``setup(model)`` freezes what is not trained and adds what the method needs (LoRA layers, a prefix encoder),
  keeping trainable parameters in float32 while frozen weights stay in the model's (low) precision. A quantized
  frozen base (a later feature) only changes the frozen modules: LoRA wraps any module with ``in_features`` /
  ``out_features`` and a ``forward``, P-Tuning only adds its encoder.
- ``trainable_parameters(model)`` lists (name, parameter) pairs the optimizer gets.
- ``save(model, out_dir, config=..., tokenizer_files=...)`` writes what this method produces atomically: a PEFT
  adapter folder (lora), an official prefix-only checkpoint (ptuning), or a full original-format checkpoint
  (freeze, full).
- ``load(model, src_dir)`` puts a saved result onto a model that went through ``setup`` (or, for inference, a
  plain base model: ``load`` calls ``setup`` itself when needed).
- ``merge(model)`` folds the method into the base weights where that makes sense (lora); others raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from glmtune.models.config import GLMConfig


@runtime_checkable
class Method(Protocol):
    name: str

    def setup(self, model: nn.Module) -> None: ...

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]: ...

    def save(
        self, model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[Path] = ()
    ) -> None: ...

    def load(self, model: nn.Module, src_dir: str | Path) -> None: ...

    def merge(self, model: nn.Module) -> None: ...
