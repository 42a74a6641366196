"""Batches for the trainer: dynamic padding (to the longest in the batch, or a fixed width) and packing of several
examples into one row with attention and positions kept per sample.

Each batch carries its :mod:`glmtune.models.layout` as tensors the trainer moves to the device and the model takes
as keyword arguments: ``position_ids`` (b, t) or (b, 2, t) for ChatGLM-6B (``layout.sample_positions``: v1's
position stays at the ``[gMASK]`` index from ``<sop>`` on, its block position counts from there), ``segment_ids``
(b, t) (the sample of each token in its row, -1 on padding) and, for v1's prefix-LM, ``context`` (b, t) (True on
each sample's prompt up to ``<sop>``, which all of the sample sees). Right-padded rows of one sample each need no
``segment_ids``: plain causal attention is exact there (the fast path), so padded batches are right-padded for
training. ``attention_mask`` (b, t) is 1 on real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glmtune.models.layout import sample_positions as layout_positions
from glmtune.models.masks import packed_runs
from glmtune.models.spec import get_spec
from glmtune.templates import IGNORE_INDEX, Encoded


def sample_positions(ex: Encoded, kind: str) -> list[list[int]]:
    """Position ids of one example: [[p0, p1, …]] for "1d", [[positions], [block positions]] for "2d" (its
    ``<sop>`` at ``prefix_length``, the ``[gMASK]`` right before it, as the templates encode)."""
    n = len(ex.input_ids)
    context = ex.prefix_length if ex.prefix_length > 0 else n
    return layout_positions(n, kind, context, max(context - 1, 0))


def _context_flags(ex: Encoded) -> list[bool]:
    """v1: True on the example's tokens before ``<sop>`` (seen by every token of the example)."""
    return [i < ex.prefix_length for i in range(len(ex.input_ids))]


def position_kind(template_name: str) -> str:
    """The position kind of a generation (its template has the generation's name)."""
    return get_spec(template_name).positions


def collate(
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    pad_side: str = "right",
    positions: str = "1d",
    pad_to_multiple_of: int | None = None,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (rounded up to ``pad_to_multiple_of``), or to ``pad_to``.

    Returns input_ids (b, t), labels (b, t) (IGNORE_INDEX on padding), attention_mask (b, t) long 1/0,
    position_ids (b, t) or (b, 2, t) restarting at each example's first real token; segment_ids (b, t) (0 on real
    tokens, -1 on padding) unless the rows are right-padded 1-D ones; context (b, t) for "2d".
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    width = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({width})")
        width = pad_to
    b = len(examples)
    n_pos = 2 if positions == "2d" else 1
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    ctx = torch.zeros((b, width), dtype=torch.bool)
    pos = torch.zeros((b, n_pos, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ValueError(f"example {i}: {n} input ids but {len(e.labels)} labels")
        sl = slice(width - n, width) if pad_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(e.labels, dtype=torch.long)
        seg[i, sl] = 0
        pos[i, :, sl] = torch.tensor(sample_positions(e, positions), dtype=torch.long)
        if positions == "2d":
            ctx[i, sl] = torch.tensor(_context_flags(e))
    out = {"input_ids": ids, "labels": labels, "attention_mask": (seg >= 0).long(),
           "position_ids": pos if n_pos == 2 else pos[:, 0]}  # fmt: skip
    if pad_side == "left" or positions == "2d":
        out["segment_ids"] = seg
    if positions == "2d":
        out["context"] = ctx
    return out


# ---- packing ----------------------------------------------------------------------------------------------
@dataclass
class PackedRow:
    examples: list[Encoded] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack(examples: Sequence[Encoded], max_tokens: int) -> list[PackedRow]:
    """Group examples into rows of at most ``max_tokens`` tokens (first fit, longest first; deterministic).

    An example longer than ``max_tokens`` is an error: lower the length limits or raise the budget.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[PackedRow] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than the packing budget of {max_tokens}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].examples.append(examples[i])
                room[r] -= n
                break
        else:
            rows.append(PackedRow([examples[i]]))
            room.append(max_tokens - n)
    return rows


def collate_packed(
    rows: Sequence[PackedRow],
    *,
    pad_id: int,
    positions: str = "1d",
    pad_to: int | None = None,
) -> dict[str, torch.Tensor | int]:
    """Packed rows -> tensors, padded on the right to the longest row (or ``pad_to``).

    Returns input_ids, labels, attention_mask (b, t) as :func:`collate`; position_ids restarting at every sample;
    segment_ids (b, t): the sample's index within its row, -1 on padding (left out when every row holds one sample
    of 1-D positions: right padding needs no mask); cu_seqlens and max_seqlen (an int) with 1-D segment_ids
    (``masks.packed_runs``: the runs of samples and padding and a bound on their lengths, for flash attention; the
    trainer passes them on only where the model's attention reads them, ``train.step.step_batch``);
    context (b, t) for "2d". The first label
    of every sample is IGNORE_INDEX, so the loss never asks the last token of one sample to predict the next sample.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(r.length for r in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest packed row ({width})")
        width = pad_to
    b = len(rows)
    n_pos = 2 if positions == "2d" else 1
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    seq_ids = torch.full((b, width), -1, dtype=torch.long)
    ctx = torch.zeros((b, width), dtype=torch.bool)
    pos = torch.zeros((b, n_pos, width), dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for j, e in enumerate(row.examples):
            n = len(e.input_ids)
            sl = slice(start, start + n)
            ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
            lab = torch.tensor(e.labels, dtype=torch.long)
            lab[0] = IGNORE_INDEX
            labels[i, sl] = lab
            seq_ids[i, sl] = j
            pos[i, :, sl] = torch.tensor(sample_positions(e, positions), dtype=torch.long)
            if positions == "2d":
                ctx[i, sl] = torch.tensor(_context_flags(e))
            start += n
    out = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": (seq_ids >= 0).long(),
        "position_ids": pos if n_pos == 2 else pos[:, 0],
    }
    if positions == "2d" or any(len(r.examples) > 1 for r in rows):
        out["segment_ids"] = seq_ids  # else one right-padded sample per row: the causal fast path is exact
        if positions == "1d":  # the runs for flash attention over variable lengths (masks' varlen form)
            out["cu_seqlens"], out["max_seqlen"] = packed_runs(seq_ids)
    if positions == "2d":
        out["context"] = ctx
    return out
