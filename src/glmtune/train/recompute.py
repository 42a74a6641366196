"""``train.gradient_checkpointing``: which activations are recomputed in the backward pass instead of kept.

- ``true``: every transformer block (the models' own switch): the least memory, one more forward pass of compute.
- ``mlp``: the MLP of every block: its wide (4h) activations are the largest part of a block's memory, and
  recomputing them costs about a third of the block's forward (the attention is kept).
- ``half``: every other block, whole: about half the saving for half the extra compute.
- ``false``: nothing recomputed.

``train.recompute_layers`` N limits a mode to the first N blocks (``true``: those blocks whole, each wrapped as the
selective modes wrap theirs; ``half``: every other one of them): every saved activation lives until the backward,
so N of L blocks give about N/L of the mode's saving for N/L of its extra compute (Megatron's recompute-num-layers).

The selective modes wrap the chosen modules' ``forward`` on the instance, so parameter names (and checkpoints) do
not change; ``train.compile`` compiles the blocks with the wrapping inside. A recomputed module that draws no random
numbers (no dropout inside: the MLPs, unless LoRA with dropout wraps their linears) is recomputed without saving and
restoring the RNG state, which a CUDA graph could not capture: ``mlp`` keeps ``train.cuda_graph`` (``reads_rng_state``).
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


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether a training forward of ``module`` draws from the RNG (a dropout with p > 0 inside it)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def recompute_in_backward(module: nn.Module) -> None:
    """Make ``module`` keep only its inputs in training; its forward runs again in the backward pass. The RNG state
    is saved and restored around the recomputation only when the module draws random numbers (decided now: call
    after the method has put its layers, e.g. LoRA's dropout, in place)."""
    forward: Callable[..., Any] = module.forward
    preserve = draws_random_numbers(module)

    def forward_checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=preserve, **kwargs)

    module.forward = forward_checkpointed


def _recomputed(model: nn.Module, mode: bool | str, layers: int | None = None) -> list[nn.Module]:
    """The modules that ``mode`` recomputes in the first ``layers`` blocks (None: all; True over all blocks is the
    model's own switch)."""
    if mode is False:
        return []
    blocks = list(transformer_blocks(model))
    if layers is not None:
        if not 1 <= layers <= len(blocks):
            raise ValueError(f"train.recompute_layers must be between 1 and the model's {len(blocks)} blocks, "
                             f"got {layers}")  # fmt: skip
        blocks = blocks[:layers]
    if mode == "mlp":
        return [block.mlp for block in blocks]
    return blocks[::2] if mode == "half" else blocks


def reads_rng_state(model: nn.Module, mode: bool | str, layers: int | None = None) -> bool:
    """Whether checkpointing ``mode`` (over the first ``layers`` blocks) saves/restores the RNG state in a step
    (which a CUDA graph cannot capture): ``true`` over every block always (the models' own switch keeps torch's
    default), else when a recomputed module draws random numbers."""
    if mode is True and layers is None:
        return True
    return any(draws_random_numbers(m) for m in _recomputed(model, mode, layers))


def apply_checkpointing(model: nn.Module, mode: bool | str, layers: int | None = None) -> None:
    """Set ``model`` up for activation checkpointing ``mode`` over its first ``layers`` blocks (None: all; see the
    module docstring)."""
    if mode not in MODES:
        raise ValueError(f"train.gradient_checkpointing must be true, false, mlp or half, got {mode!r}")
    model.transformer.gradient_checkpointing = mode is True and layers is None
    if mode is False or (mode is True and layers is None):
        return
    chosen = _recomputed(model, mode, layers)
    for module in chosen:
        recompute_in_backward(module)
    log.info("activation checkpointing: %d %s recomputed in the backward pass", len(chosen),
             "MLPs" if mode == "mlp" else "blocks")  # fmt: skip
