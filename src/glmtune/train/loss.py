"""Causal LM loss over a large vocabulary without float32 logits for the whole batch.

Labels come unshifted (aligned with ``input_ids``, ``IGNORE_INDEX`` where untrained): the hidden state at position
``i`` predicts ``labels[i + 1]``. Only the positions that have a target go through the output layer, in chunks of
``chunk_tokens``; each chunk's logits are upcast to float32 for the log-softmax and recomputed in the backward pass
(activation checkpointing), so at most one chunk's logits (chunk x vocab) exist at any time. With compiled blocks
on one GPU (``train.loss_recompute: auto``, ``train.step.LMLoss``) the chunk loss is compiled instead and its
logits kept for the backward in the model's dtype: no float32 logits, one output-layer product less.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.templates import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens that take loss in a batch of unshifted labels (b, s)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _chunk_loss(h: torch.Tensor, targets: torch.Tensor, output_layer: nn.Module) -> torch.Tensor:
    logits = output_layer(h)  # (n, vocab): one chunk only
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> float32 for the softmax
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)  # (padded slots: no loss)


@functools.cache
def compiled_chunk_loss(backend: str | Callable = "inductor") -> Callable:
    """The chunk loss compiled (``dynamic``: chunks of any length share one graph): the output layer's product, then
    one fused kernel for the float32 upcast, log-sum-exp and target pick, and one for the backward's softmax minus
    the target, cast back; the float32 logits never exist in memory. Its backward keeps the chunk's logits in the
    model's dtype (2 bytes x vocab a target in bf16), so it is used without recomputation (see ``LMLoss``)."""
    return torch.compile(_chunk_loss, backend=backend, dynamic=True)


def loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss is taken, from unshifted labels (b, s): (index (n,) into the hidden states flattened to
    (b * s, H), target ids (n,)), row-major. Computed on the host from the CPU labels, the trainer hands both to the
    device, so the loss never asks the device how many targets there are (no host synchronisation)."""
    b, s = labels.shape
    nxt = labels[:, 1:]  # (b, s-1): the token each position predicts
    rows, cols = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * s + cols, nxt[rows, cols]


def chunked_lm_loss(
    hidden: torch.Tensor,  # (b, s, H) final hidden states
    labels: torch.Tensor,  # (b, s) unshifted, IGNORE_INDEX where untrained
    output_layer: nn.Module,  # hidden -> logits (the model's output_embeddings())
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, int]:
    """(sum of the token losses as a scalar, number of target tokens). Mean = sum / count.

    The sum is float32 for bf16/fp16/float32 hidden states (float64 for float64 ones, as in the tests).
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    index, targets = loss_targets(labels)
    return indexed_lm_loss(hidden, index, targets, output_layer, chunk_tokens), targets.numel()


def indexed_lm_loss(
    hidden: torch.Tensor,  # (b, s, H) final hidden states
    index: torch.Tensor,  # (n,) long: positions in the flattened (b * s) hidden states that predict a target
    targets: torch.Tensor,  # (n,) long: the token each of those positions predicts
    output_layer: nn.Module,
    chunk_tokens: int = 1024,
    recompute: bool = True,
    chunk_loss: Callable | None = None,
) -> torch.Tensor:
    """Sum of the token losses at ``index`` (see :func:`loss_targets`), in chunks of ``chunk_tokens`` rows. A
    target ``IGNORE_INDEX`` takes no loss (the CUDA-graph step pads ``index``/``targets`` to a fixed length so).
    ``recompute``: each chunk's logits are recomputed in the backward (one chunk alive at a time); False keeps
    every chunk's logits for the backward (~6 bytes x vocab a target more memory, one output-layer product less).
    ``chunk_loss``: what computes a chunk (default the eager ``_chunk_loss``; :func:`compiled_chunk_loss`'s, which
    is not recomputed: a compiled function reruns eagerly under the checkpoint's recomputation)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if chunk_loss is not None and recompute:
        raise ValueError("a compiled chunk loss is kept for the backward, not recomputed (recompute=False)")
    chunk_loss = _chunk_loss if chunk_loss is None else chunk_loss
    h = hidden.flatten(0, 1).index_select(0, index)  # (n, H)
    n = index.numel()
    acc = torch.promote_types(hidden.dtype, torch.float32)
    total = h[:0].sum().to(acc)  # 0, but on the graph, so backward works for a batch without targets
    grad = torch.is_grad_enabled()
    for start in range(0, n, chunk_tokens):
        hs, ts = h[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if grad and recompute:
            # nothing random inside: no RNG state to keep (reading it is not allowed while a CUDA graph captures)
            total = total + checkpoint(_chunk_loss, hs, ts, output_layer, use_reentrant=False,
                                       preserve_rng_state=False).to(acc)  # fmt: skip
        else:
            total = total + chunk_loss(hs, ts, output_layer).to(acc)
    return total
