"""The run folder ``glmtune train`` writes, as the shared contract describes it::

run.json            {"format": "glmtune-run", "version": 1, "base_model", "generation", "template",
                     "method": {"name", ...options}, "dtype", "glmtune_version", "torch_version"}
config.yaml         the resolved training config
metrics.jsonl  tb/  loss.png
checkpoints/step-000100/{model/,state/}
model/              the final result (best by the eval metric when evaluated, else last) + tokenizer files
dropped_samples.jsonl  the records left out (data.skip_bad)
tokenized/          the tokenized-data cache (unless data.cache_dir says otherwise)
.previous-run/      with overwrite=true: the run this one replaces, kept until this one's model/ exists

``overwrite=true`` never loses a finished run: the new run checks its model and data first, then moves the old
run's files into ``.previous-run/`` and deletes them only once its own ``model/`` is written. Every start removes
the hidden leftovers of writes a killed run left behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import glmtune
from glmtune.data.dropped import DROPPED_FILE
from glmtune.io import atomic_write_dir, atomic_write_text

log = logging.getLogger(__name__)

RUN_FORMAT = "glmtune-run"
RUN_VERSION = 1
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
PREVIOUS = ".previous-run"
# What a run writes; ``overwrite`` replaces these and nothing else.
ARTIFACTS = (RUN_FILE, CONFIG_FILE, "metrics.jsonl", "tb", "loss.png", "checkpoints", MODEL_DIR, "tokenized",
             DROPPED_FILE)  # fmt: skip
# Written by the data step, which runs before the old run is set aside: kept across an overwrite (the cache is
# keyed by content); a folder holding only these is a start that failed before it began, not a run.
DATA_STEP = ("tokenized", DROPPED_FILE)
# Hidden work files of ``glmtune.io``'s atomic writes: ``.NAME.XXXX.tmp`` (files and folders), ``.NAME.old``.
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?:[^.]+\.tmp|old)$")


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
    if all(p.name in DATA_STEP for p in entries):
        return
    if not any(p.name in ARTIFACTS and p.name not in DATA_STEP for p in entries):
        raise FileExistsError(f"output_dir {run_dir} is not empty and holds no glmtune run; choose a new folder")
    if not overwrite:
        raise FileExistsError(
            f"output_dir {run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or replace it with overwrite=true"
        )


def set_aside(run_dir: Path) -> Path | None:
    """Move the previous run's files (but what this run's data step wrote) into ``run_dir/.previous-run``; None if
    there were none.

    A ``.previous-run`` left by an earlier overwrite that never finished holds the newest finished model when the
    run folder has none: it is kept and the unfinished files are deleted instead.
    """
    present = [run_dir / n for n in ARTIFACTS if n not in DATA_STEP and (run_dir / n).exists()]
    prev = run_dir / PREVIOUS
    if prev.exists() and not (run_dir / MODEL_DIR).is_dir():
        for p in present:
            _remove(p)
        log.info("removed the unfinished run in %s; the finished one it replaced stays in %s", run_dir, prev)
        return prev
    if not present:
        return None
    if prev.exists():
        _remove(prev)
    prev.mkdir()
    for p in present:
        os.replace(p, prev / p.name)
    log.info("moved the previous run of %s into %s (overwrite=true): it is deleted once this run's model/ is "
             "written", run_dir, prev)  # fmt: skip
    return prev


def restore_previous(run_dir: Path) -> None:
    """Undo :func:`set_aside` (the new run failed before it started): the previous run's files back in place."""
    prev = run_dir / PREVIOUS
    if not prev.is_dir():
        return
    for p in prev.iterdir():
        target = run_dir / p.name
        if target.exists():
            _remove(target)
        os.replace(p, target)
    prev.rmdir()
    log.info("the previous run in %s is back in place", run_dir)


def drop_previous(run_dir: Path) -> None:
    """Delete the replaced run (this run's ``model/`` now exists)."""
    prev = run_dir / PREVIOUS
    if prev.exists():
        _remove(prev)
        log.info("removed the previous run of %s (replaced with overwrite=true)", run_dir)


def remove_leftovers(run_dir: Path) -> None:
    """Remove the hidden work files of atomic writes a killed run left in ``run_dir`` (``.loss.png.XXXX.tmp``,
    ``.model.XXXX.tmp/``, ``.model.old/``); a ``.model.old`` is put back when ``model/`` is missing."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        m = _LEFTOVER.match(p.name)
        if not m or m.group("name") not in ARTIFACTS:
            continue
        target = run_dir / m.group("name")
        if p.name.endswith(".old") and p.is_dir() and not target.exists():
            os.replace(p, target)  # the swap was cut between its two renames: the old folder is the good one
            log.info("put back %s from an interrupted write", target)
            continue
        _remove(p)
        log.info("removed %s, left by an interrupted write", p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


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
