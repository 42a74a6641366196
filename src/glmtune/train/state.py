"""Trainer checkpoints: ``checkpoints/step-000100/{model/,state/}``, written atomically, the last K kept.

``model/`` is what the method saves (a PEFT adapter, a prefix-only checkpoint, or a full model). ``state/``
holds what an exact resume needs:

- ``trainable.safetensors``: the trainable parameters exactly as the optimizer holds them (float32), so resuming
  never goes through a lower-precision copy;
- ``trainer.pt``: optimizer, scheduler and GradScaler state, every RNG of every rank (python, numpy, torch CPU,
  CUDA), the progress counters (step, data epoch and position, best metric, early-stopping and non-finite
  counters); read back with ``torch.load(weights_only=True)``;
- ``trainer.json``: the counters again, for people.

An FSDP run (``train/fsdp.py``) keeps the trainable parameters and the optimizer state sharded in ``dcp/``
(``torch.distributed.checkpoint``: every rank writes its shard, rank 0 the metadata) instead of
``trainable.safetensors`` and ``trainer.pt``'s optimizer entry; ``trainer.pt`` still holds the rest, and it is
written last (a checkpoint without it is not one). Every process writes into the same hidden work folder, which
rank 0 renames into place once all are done; several machines need ``output_dir`` on a filesystem they all see.

The whole folder is built beside its final name and renamed into place (``glmtune.io.atomic_write_dir``): a crash
at any moment leaves the previous checkpoints complete, and a half-written one is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from glmtune.io import atomic_write_dir
from glmtune.train.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FORMAT = 1
SHARDED = "dcp"  # state/dcp/: the sharded trainable parameters and optimizer state of an FSDP run
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Counters of a run; ``step`` is the number of optimizer steps done."""

    step: int = 0
    epoch: int = 0  # data epoch of the next step
    position: int = 0  # index of the next step within its epoch
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    bad_steps: int = 0  # non-finite losses in a row
    tokens: int = 0  # real (non-padding) tokens trained on


# ---- RNG ----------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` reads back."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys_t, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_t.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states of %d devices, this machine %d: not restored", len(cuda),
                        torch.cuda.device_count())  # fmt: skip


# ---- folders ------------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint folder named ``step-N`` (None for any other name)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first. Hidden work folders of interrupted writes are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and (p / "state" / "trainer.pt").is_file():
            out.append((step, p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (the one home of "latest": resume and ``runs.resolve`` use it)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale(run_dir: str | Path) -> None:
    """Remove the hidden leftovers of writes or deletions a crash interrupted (never a complete checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep_steps`` (the best one)."""
    found = list_checkpoints(run_dir)
    newest = {s for s, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step in newest or step in keep_steps:
            continue
        doomed = path.parent / f".{path.name}.deleting"  # hidden first: a half-deleted folder is no checkpoint
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log.debug("removed checkpoint %s", path)


# ---- write / read -------------------------------------------------------------------------------------------
def write_checkpoint(
    path: str | Path,
    *,
    save_model: Callable[[Path], None],
    trainable: dict[str, torch.Tensor],
    trainer: dict[str, Any],
    progress: Progress,
) -> None:
    """Write one checkpoint folder atomically. ``trainer`` holds the optimizer/scheduler/scaler/rng states."""

    def fill(tmp: Path) -> None:
        save_model(tmp / "model")
        state = tmp / "state"
        state.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(state / "trainable.safetensors")
        )
        _write_trainer(state, trainer, progress)

    atomic_write_dir(path, fill)


def _write_trainer(state: Path, trainer: dict[str, Any], progress: Progress) -> None:
    torch.save({"format": STATE_FORMAT, "progress": asdict(progress), **trainer}, state / "trainer.pt")
    info = {"format": STATE_FORMAT, **asdict(progress)}
    (state / "trainer.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def write_sharded_checkpoint(
    path: str | Path,
    *,
    info: DistInfo,
    save_model: Callable[[Path], None],
    sharded: dict[str, Any],
    trainer: dict[str, Any] | None,
    progress: Progress,
) -> None:
    """Write one checkpoint of a sharded run; every rank calls it. ``save_model(folder)`` writes the method's output
    (every rank takes part, rank 0 writes), ``sharded`` goes to ``state/dcp/`` (each rank its shard), ``trainer``
    (rank 0's) to ``trainer.pt``. Rank 0 builds the folder aside and renames it into place once every rank is done."""
    import torch.distributed.checkpoint as dcp

    def fill(tmp: Path | None) -> None:
        tmp = Path(broadcast_object(info, str(tmp) if tmp is not None else None))
        save_model(tmp / "model")
        dcp.save(sharded, checkpoint_id=str(sharded_dir(tmp)))
        barrier(info)  # every shard written
        if info.is_main:
            _write_trainer(tmp / "state", trainer or {}, progress)

    if info.is_main:
        atomic_write_dir(path, fill)
    else:
        fill(None)


def sharded_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint keeps its sharded state (``state/dcp``)."""
    return Path(checkpoint) / "state" / SHARDED


def is_sharded(checkpoint: str | Path) -> bool:
    """Whether a checkpoint was written by an FSDP run (its trainable state in ``state/dcp/``)."""
    return (sharded_dir(checkpoint) / ".metadata").is_file()


@dataclass
class Checkpoint:
    path: Path
    trainable: dict[str, torch.Tensor]  # empty for a sharded checkpoint (its state is in state/dcp/)
    trainer: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return is_sharded(self.path)

    @property
    def progress(self) -> Progress:
        return Progress(**self.trainer["progress"])


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    state = path / "state"
    trainer_file = state / "trainer.pt"
    if not trainer_file.is_file():
        raise FileNotFoundError(f"{path}: not a trainer checkpoint (no state/trainer.pt)")
    trainer = torch.load(trainer_file, map_location=map_location, weights_only=True)
    if trainer.get("format") != STATE_FORMAT:
        raise ValueError(f"{trainer_file}: trainer state format {trainer.get('format')!r}, expected {STATE_FORMAT}")
    whole = state / "trainable.safetensors"
    trainable = load_file(str(whole), device=str(map_location)) if whole.is_file() else {}  # ({}: sharded)
    return Checkpoint(path, trainable, trainer)


def load_trainable(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved trainable tensors into the parameters, names and shapes checked."""
    check_trainable(params, saved, source)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(device=p.device, dtype=p.dtype))


def check_trainable(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], source: Path) -> None:
    """The saved trainable tensors are the parameters' (names, shapes: whole shapes also for sharded ones)."""
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{source}: the checkpoint's trainable tensors do not match this run's method setup "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was the method or its options changed?"
        )
    for name, p in params.items():
        t = saved[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
