"""Learning-rate schedules with linear warmup: linear decay, cosine decay, constant.

As the transformers schedules the official scripts ran with: the factor at optimizer step ``s`` (0-based) is
``s / warmup`` during warmup (so the first step of a warmed-up run has lr 0), then for ``linear`` it falls from 1
to ``min_ratio`` at ``total`` and for ``cosine`` follows ``min + (1 - min) * (1 + cos(pi * progress)) / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("linear", "cosine", "constant")


@dataclass
class LRSchedule:
    """Multiplier of the base learning rate by step. A plain object, so ``LambdaLR.state_dict`` keeps it."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """The larger of an explicit step count and a fraction of the run."""
    return max(warmup_steps, math.ceil(warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> LambdaLR:
    return LambdaLR(optimizer, schedule)
