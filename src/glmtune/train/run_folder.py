"""The run folder ``glmtune train`` writes, as the shared contract describes it::

run.json            {"format": "glmtune-run", "version": 1, "base_model", "generation", "template",
                     "method": {"name", ...options}, "dtype", "glmtune_version", "torch_version"}
config.yaml         the resolved training config
metrics.jsonl  tb/  loss.png
checkpoints/step-000100/{model/,state/}
model/              the final result (best by the eval metric when evaluated, else last) + tokenizer files
tokenized/          the tokenized-data cache (unless data.cache_dir says otherwise)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import glmtune
from glmtune.io import atomic_write_dir, atomic_write_text

log = logging.getLogger(__name__)

RUN_FORMAT = "glmtune-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
# What a run writes; ``overwrite`` removes these and nothing else.
ARTIFACTS = (RUN_FILE, CONFIG_FILE, "metrics.jsonl", "tb", "loss.png", "checkpoints", "model", "tokenized")


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run (or a folder of other files) unless told to; a resume needs a run."""
    if resume:
        if not (run_dir / RUN_FILE).is_file():
            raise FileNotFoundError(f"{run_dir}: no glmtune run to resume here (no {RUN_FILE})")
        return
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise NotADirectoryError(f"output_dir {run_dir} is a file")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    if not any(p.name in ARTIFACTS for p in entries):
        raise FileExistsError(f"output_dir {run_dir} is not empty and holds no glmtune run; choose a new folder")
    if not overwrite:
        raise FileExistsError(
            f"output_dir {run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or replace it with overwrite=true"
        )


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's files (only those a run writes)."""
    for name in ARTIFACTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    log.info("removed the previous run in %s (overwrite=true)", run_dir)


def run_info(*, base_model: str | Path, generation: str, template: str, method: dict[str, Any],
             dtype: str) -> dict[str, Any]:  # fmt: skip
    return {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "base_model": str(Path(base_model).resolve()),
        "generation": generation,
        "template": template,
        "method": method,
        "dtype": dtype,
        "glmtune_version": glmtune.__version__,
        "torch_version": torch.__version__,
    }


def write_run_files(run_dir: Path, info: dict[str, Any], config_yaml: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)


def save_with_tokenizer(save_model, out_dir: Path, tokenizer_files: Sequence[Path]) -> None:
    """Write ``out_dir`` atomically: ``save_model(tmp)`` then any tokenizer file it did not copy itself."""

    def fill(tmp: Path) -> None:
        save_model(tmp)
        for f in tokenizer_files:
            f = Path(f)
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)

    atomic_write_dir(out_dir, fill)
