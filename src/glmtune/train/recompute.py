"""``train.gradient_checkpointing``: which activations are recomputed in the backward pass instead of kept.

- ``true``: every transformer block (the models' own switch): the least memory, one more forward pass of compute.
- ``mlp``: the MLP of every block: its wide (4h) activations are the largest part of a block's memory, and
  recomputing them costs about a third of the block's forward (the attention is kept).
- ``half``: every other block, whole: about half the saving for half the extra compute.
- ``false``: nothing recomputed.

The selective modes wrap the chosen modules' ``forward`` on the instance, so parameter names (and checkpoints) do
not change; ``train.compile`` compiles the blocks with the wrapping inside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.train.compile import transformer_blocks

log = logging.getLogger(__name__)

MODES = (True, False, "mlp", "half")


def recompute_in_backward(module: nn.Module) -> None:
    """Make ``module`` keep only its inputs in training; its forward runs again in the backward pass."""
    forward: Callable[..., Any] = module.forward

    def forward_checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = forward_checkpointed


def apply_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Set ``model`` up for activation checkpointing ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"train.gradient_checkpointing must be true, false, mlp or half, got {mode!r}")
    model.transformer.gradient_checkpointing = mode is True
    if mode in (True, False):
        return
    blocks = transformer_blocks(model)
    chosen = [block.mlp for block in blocks] if mode == "mlp" else list(blocks)[::2]
    for module in chosen:
        recompute_in_backward(module)
    log.info("activation checkpointing: %d %s recomputed in the backward pass", len(chosen),
             "MLPs" if mode == "mlp" else "blocks")  # fmt: skip
