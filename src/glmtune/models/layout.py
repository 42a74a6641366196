"""The sequence layout: where every token of a (b, s) batch sits. The one home of positions.

Data collation (padded or packed training rows) and generation (left-padded prompts, then decode steps) both
produce a :class:`SequenceLayout`; both model families consume it, and :mod:`glmtune.models.masks` turns it into
the attention mask. Nothing else computes positions or decides who attends to whom.

- ``positions``: (b, s) long, or (b, 2, s) for ChatGLM-6B's 2-D positions (position, block position). Every sample
  counts from 0 at its first token. v1 (the original ``get_position_ids``): with ``context`` = the index of
  ``<sop>`` (the whole sample when absent) and ``mask`` = the index of ``[gMASK]`` (else ``[MASK]``), positions are
  ``0 .. context-1`` then ``mask`` repeated; block positions ``0`` over the context, then ``1, 2, ...``. A generated
  token keeps the last position and advances the block position by one. Padding gets 0.
- ``segments``: (b, s) long, the sample each token belongs to within its row (packed rows hold several), ``-1`` on
  padding. ``None`` means each row is one sample whose padding, if any, is at the end, where no real token can see
  it: plain causal attention is exact (the fast path).
- ``context``: (b, s) bool, True on the tokens every token of their sample sees (v1's prefix-LM: the prompt up to
  ``<sop>``). ``None``: purely causal.
- ``slots``: (b, s) long, the KV-cache slots the tokens' keys/values go to (``None``: the cache's next free slots).
- ``max_position``: a bound on ``positions`` known on the host (sizes the rotary table without a device sync).
- ``runs``, ``max_run``: packed 1-D rows as variable-length runs (flash attention's ``cu_seqlens``) and a bound on
  their lengths, known on the host (the collator's, ``masks.packed_runs``).

Token order within a sample is the order of the row (training) or of the cache slots (generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from glmtune.models.config import GLMConfig


@dataclass
class SequenceLayout:
    positions: torch.Tensor  # (b, s) | (b, 2, s)
    segments: torch.Tensor | None = None  # (b, s) long, -1 = padding
    context: torch.Tensor | None = None  # (b, s) bool
    slots: torch.Tensor | None = None  # (b, s) long
    max_position: int | None = None
    runs: torch.Tensor | None = None  # int32 (R + 1,): cu_seqlens of packed 1-D rows (masks.packed_runs), or None
    max_run: int | None = None  # with runs: a bound on their lengths known on the host (None: the row width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.positions.shape[0], self.positions.shape[-1]

    def to(self, device: torch.device | str) -> SequenceLayout:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device, non_blocking=True) if t is not None else None

        return replace(self, positions=move(self.positions), segments=move(self.segments),
                       context=move(self.context), slots=move(self.slots), runs=move(self.runs))  # fmt: skip


# ---- positions of one sample (host lists) ----------------------------------------------------------------------------
def sample_positions(n: int, kind: str, context: int | None = None, mask_at: int | None = None) -> list[list[int]]:
    """Positions of one sample of ``n`` tokens: [[0, 1, ...]] for "1d"; for "2d" [[positions], [block positions]]
    with ``context`` = index of ``<sop>`` (None: the whole sample) and ``mask_at`` = index of the mask token (None:
    positions keep counting)."""
    if kind == "1d":
        return [list(range(n))]
    if kind != "2d":
        raise ValueError(f"position kind must be '1d' or '2d', got {kind!r}")
    ctx = n if context is None else min(context, n)
    pos = list(range(ctx)) + ([mask_at] * (n - ctx) if mask_at is not None else list(range(ctx, n)))
    block = [0] * ctx + list(range(1, n - ctx + 1))
    return [pos, block]


def glm_context(seq: Sequence[int], config: GLMConfig) -> tuple[int, int | None]:
    """v1: (index of ``<sop>`` or len(seq), index of ``[gMASK]`` else ``[MASK]`` or None) of a token list."""
    context = seq.index(config.bos_token_id) if config.bos_token_id in seq else len(seq)
    for token in (config.gmask_token_id, config.mask_token_id):
        if token in seq:
            return context, seq.index(token)
    return context, None


def position_kind(config: GLMConfig) -> str:
    return "2d" if config.arch == "glm" else "1d"


def token_positions(seq: Sequence[int], config: GLMConfig) -> list[list[int]]:
    """Positions of one sample from its token ids (v1 reads its ``<sop>`` and mask tokens)."""
    if position_kind(config) == "1d":
        return sample_positions(len(seq), "1d")
    context, mask_at = glm_context(seq, config)
    return sample_positions(len(seq), "2d", context, mask_at)


def context_flags(n: int, config: GLMConfig, context: int) -> list[bool]:
    """v1: True on the first ``context`` tokens (seen by all of the sample); all False for causal models."""
    if config.arch != "glm":
        return [False] * n
    return [i < context for i in range(n)]


# ---- layouts ---------------------------------------------------------------------------------------------------------
def prompt_layout(prompts: Sequence[Sequence[int]], config: GLMConfig, pad_id: int, *, start_slot: int = 0,
                  pad_side: str = "left", offsets: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, SequenceLayout]:  # fmt: skip
    """Padded prompts -> input_ids (b, s) and their layout, on the CPU, in cache slots from ``start_slot``.

    Each row is one sample (segment 0) with its padding marked -1, so a batch gives each prompt what it gives alone.
    ``pad_side="left"``: every row in slots ``start_slot .. start_slot+s-1``, its tokens at the end. ``"right"``:
    each row's tokens from slot ``start_slot + offsets[i]`` on, padding after them (where the row's next tokens
    will go). ``offsets`` (right padding, 1-D positions only): how many tokens of each sample precede its part
    here (a prompt prefilled in chunks); positions and slots continue from there.
    """
    if not prompts:
        raise ValueError("no prompts")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    width = max(len(p) for p in prompts)
    b = len(prompts)
    kind = position_kind(config)
    offsets = list(offsets) if offsets is not None else [0] * b
    if len(offsets) != b or (pad_side == "left" and any(offsets)):
        raise ValueError("offsets: one per prompt, and only with pad_side='right'")
    if kind == "2d" and any(offsets):
        raise ValueError("ChatGLM-6B prompts cannot be split (their prompt is attended both ways)")
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, 2 if kind == "2d" else 1, width), dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)
    ctx = torch.zeros((b, width), dtype=torch.bool)
    slots = torch.arange(start_slot, start_slot + width).repeat(b, 1)
    for i, p in enumerate(prompts):
        p = list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty")
        sl = slice(width - len(p), width) if pad_side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p, dtype=torch.long)
        pos[i, :, sl] = torch.tensor(token_positions(p, config), dtype=torch.long) + offsets[i]
        seg[i, sl] = 0
        slots[i] += offsets[i]
        if config.arch == "glm":
            ctx[i, sl] = torch.tensor(context_flags(len(p), config, glm_context(p, config)[0]))
    layout = SequenceLayout(
        positions=pos if kind == "2d" else pos[:, 0],
        segments=seg,
        context=ctx if config.arch == "glm" else None,
        slots=slots,
        max_position=int(pos.max()) if width else 0,
    )
    return ids, layout


def next_positions(last: torch.Tensor, advance: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (b, 1) or (b, 2, 1) of a sample's last token -> those of the token after it. ``advance`` (b,) long,
    1 or 0 per row: rows with 0 keep their positions (a row that has stopped)."""
    if last.dim() == 2:
        return last + (1 if advance is None else advance[:, None])
    step = torch.zeros_like(last)
    step[:, 1] = 1 if advance is None else advance[:, None]
    return last + step


def positions_from_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GLMConfig
                        ) -> torch.Tensor:  # fmt: skip
    """Positions of (b, s) prompt ids, left padding where ``attention_mask`` is 0 (the model's convenience path).

    1-D positions stay on the device; v1's depend on where ``<sop>`` and the mask token are, read on the host."""
    b, s = input_ids.shape
    if position_kind(config) == "1d":
        if attention_mask is None:
            return torch.arange(s, device=input_ids.device).expand(b, s)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    pos = torch.zeros((b, 2, s), dtype=torch.long)
    rows = input_ids.tolist()
    keep = attention_mask.bool().tolist() if attention_mask is not None else [[True] * s] * b
    for i in range(b):
        idx = [j for j in range(s) if keep[i][j]]
        if idx:
            cols = torch.tensor(idx)
            pos[i, :, cols] = torch.tensor(token_positions([rows[i][j] for j in idx], config), dtype=torch.long)
    return pos.to(input_ids.device)


def context_from_ids(input_ids: torch.Tensor, config: GLMConfig, starts_sample: bool) -> torch.Tensor | None:
    """v1 prefix-LM flags (b, s) of single-sample rows: True before each row's first ``<sop>``. When the ids do
    not start their sample (later tokens of a cached sequence) nothing new is bidirectional. None for causal models."""
    if config.arch != "glm":
        return None
    if not starts_sample:
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    is_bos = input_ids == config.bos_token_id
    s = input_ids.shape[1]
    first = torch.where(is_bos.any(1), is_bos.int().argmax(1), s)  # (b,)
    return torch.arange(s, device=input_ids.device)[None, :] < first[:, None]
