"""Training: config (YAML + overrides), data batches, chunked loss, schedules, checkpoints, the loop, DDP.

``from glmtune.train import load_config, train``; the names are imported on first use, so that building the
command line (``glmtune.train.command``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "glmtune.train.config",
    "TrainConfig": "glmtune.train.config",
    "load_config": "glmtune.train.config",
    "resume_config": "glmtune.train.config",
    "TrainError": "glmtune.train.loop",
    "TrainResult": "glmtune.train.loop",
    "train": "glmtune.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glmtune.train' has no attribute {name!r}")
