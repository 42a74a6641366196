"""Batches for the trainer: dynamic padding (to the longest in the batch, never to a fixed maximum) and packing
of several examples into one row with attention and positions kept per sample.

Positions: ``"1d"`` (ChatGLM2/3, GLM-4) counts 0, 1, … from each sample's first token; ``"2d"`` (ChatGLM-6B)
gives (b, 2, t): the position counts up to the ``[gMASK]`` and stays at its index from ``<sop>`` on, the block
position is 0 over the prompt and 1, 2, … from ``<sop>`` (the original ``get_position_ids``). Padding gets 0.

Masks: ``attention_mask`` (b, t) is 1 on real tokens. For packed rows (and for v1's prefix-LM),
:func:`packed_attention_mask` builds the bool (b, 1, t, t) mask the models take as ``attn_mask=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glmtune.templates import IGNORE_INDEX, Encoded

POSITION_KINDS = ("1d", "2d")


def sample_positions(ex: Encoded, kind: str) -> list[list[int]]:
    """Position ids of one example: [[p0, p1, …]] for "1d", [[positions], [block positions]] for "2d"."""
    n = len(ex.input_ids)
    if kind == "1d":
        return [list(range(n))]
    if kind != "2d":
        raise ValueError(f"position kind must be one of {POSITION_KINDS}, got {kind!r}")
    context = ex.prefix_length if ex.prefix_length > 0 else n  # index of <sop>
    mask_pos = max(context - 1, 0)  # the [gMASK] right before <sop>
    pos = list(range(min(context, n))) + [mask_pos] * (n - min(context, n))
    block = [0] * min(context, n) + list(range(1, n - min(context, n) + 1))
    return [pos, block]


def position_kind(template_name: str) -> str:
    return "2d" if template_name == "chatglm" else "1d"


def collate(
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    pad_side: str = "left",
    positions: str = "1d",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example.

    Returns input_ids (b, t), labels (b, t) (IGNORE_INDEX on padding), attention_mask (b, t) long 1/0,
    position_ids (b, t) or (b, 2, t) restarting at each example's first real token, and for "2d" also
    prefix_lengths (b, 1): each row's prompt length before ``<sop>`` (for :func:`packed_attention_mask`).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    width = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(examples)
    n_pos = 2 if positions == "2d" else 1
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, n_pos, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ValueError(f"example {i}: {n} input ids but {len(e.labels)} labels")
        sl = slice(width - n, width) if pad_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, sl] = 1
        pos[i, :, sl] = torch.tensor(sample_positions(e, positions), dtype=torch.long)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask,
           "position_ids": pos if n_pos == 2 else pos[:, 0]}  # fmt: skip
    if positions == "2d":
        out["prefix_lengths"] = torch.tensor([[e.prefix_length] for e in examples], dtype=torch.long)
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
) -> dict[str, torch.Tensor]:
    """Packed rows -> tensors, padded on the right to the longest row (or ``pad_to``).

    Returns input_ids, labels, attention_mask (b, t) as :func:`collate`; position_ids restarting at every sample;
    seq_ids (b, t): the sample's index within its row, -1 on padding; prefix_lengths (b, S) per sample (0 unless
    "2d"); and attn_mask, the bool (b, 1, t, t) mask from :func:`packed_attention_mask`. The first label of every
    sample is IGNORE_INDEX, so the loss never asks the last token of one sample to predict the next sample.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(r.length for r in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest packed row ({width})")
        width = pad_to
    b = len(rows)
    n_seg = max(len(r.examples) for r in rows)
    n_pos = 2 if positions == "2d" else 1
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    seq_ids = torch.full((b, width), -1, dtype=torch.long)
    pos = torch.zeros((b, n_pos, width), dtype=torch.long)
    prefix = torch.zeros((b, n_seg), dtype=torch.long)
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
            prefix[i, j] = e.prefix_length if positions == "2d" else 0
            start += n
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": (seq_ids >= 0).long(),
        "position_ids": pos if n_pos == 2 else pos[:, 0],
        "seq_ids": seq_ids,
        "prefix_lengths": prefix,
        "attn_mask": packed_attention_mask(seq_ids, causal=True, prefix_lengths=prefix if positions == "2d" else None),
    }


def packed_attention_mask(
    segment_ids: torch.Tensor, causal: bool = True, prefix_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool (b, 1, t, t) mask, True where query q may attend key k: same sample only, causal within it.

    segment_ids (b, t): sample index per token, -1 (any negative) on padding. prefix_lengths (b, S) long: per
    sample, the number of its first tokens that every token of that sample sees (v1's prefix-LM: the prompt up
    to ``<sop>``); None or 0 = purely causal. A padding query sees only itself, so no softmax row is empty.
    """
    b, t = segment_ids.shape
    seg = segment_ids
    valid = seg >= 0  # (b, t)
    same = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (b, q, k)
    if causal:
        idx = torch.arange(t, device=seg.device)
        visible = idx[None, :, None] >= idx[None, None, :]  # (1, q, k): k <= q
        if prefix_lengths is not None:
            # position of each token within its sample: index minus the index where its segment starts
            new = torch.ones_like(seg, dtype=torch.bool)
            new[:, 1:] = seg[:, 1:] != seg[:, :-1]
            start = torch.where(new, idx[None, :].expand(b, t), torch.zeros_like(seg))
            start = torch.cummax(start, dim=1).values  # (b, t)
            offset = idx[None, :] - start
            plen = torch.gather(prefix_lengths, 1, seg.clamp(min=0))  # (b, t): prefix length of the token's sample
            in_prefix = valid & (offset < plen)  # (b, t)
            visible = visible | in_prefix[:, None, :]
        same = same & visible
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)[None]
    same = same | (eye & ~valid[:, :, None])
    return same[:, None]  # (b, 1, t, t)
