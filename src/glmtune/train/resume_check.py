"""What a checkpoint records of the training data, and the check that a resumed run trains on the same data.

A checkpoint keeps the number of training units, the global batch and a fingerprint of the encoded training
examples (their ids, labels and prefix lengths, in order). A resume with another count or batch is refused: the
steps would take other batches. A resume whose data changed with the same count (one record's text edited) is
refused too, unless ``--force`` says to continue on the changed data (with a warning).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glmtune.templates import Encoded

log = logging.getLogger(__name__)


class DataChangedError(ValueError):
    """The training data differs from the data the checkpoint was trained on."""


def data_fingerprint(examples: Sequence[Encoded]) -> str:
    """A hex digest of the encoded examples in order (ids, labels, prefix length)."""
    h = hashlib.sha256()
    for e in examples:
        ids = np.asarray(e.input_ids, dtype=np.int64)
        h.update(np.array([len(ids), e.prefix_length], dtype=np.int64).tobytes())
        h.update(ids.tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def data_record(*, units: int, global_batch: int, steps_per_epoch: int, world_size: int, fingerprint: str) -> dict:
    """The ``data`` entry of a checkpoint's trainer state."""
    return {"units": units, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
            "world_size": world_size, "fingerprint": fingerprint}  # fmt: skip


def _batch_advice(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """Why another global batch cannot resume, and the settings that keep the checkpoint's with this world size."""
    g, w = saved["global_batch"], now["world_size"]
    then = f"the checkpoint was written with a global batch of {g} ({saved.get('world_size', '?')} processes)"
    if g % w:
        return (f"{then}; {w} processes do not divide it: resume with a number of processes that divides {g} "
                "(the steps must take the same batches)")  # fmt: skip
    return (
        f"{then}, this run has {now['global_batch']} ({w} processes); keep {g}: train.batch_size x "
        f"train.grad_accum = {g // w} per process (e.g. train.batch_size=1 train.grad_accum={g // w})"
    )


def check_same_data(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path, *, force: bool = False) -> None:
    """Refuse to resume from ``checkpoint`` (its ``saved`` data record) on other data than ``now``'s; with
    ``force`` a changed fingerprint (same count and batch) is only a warning."""
    if saved["units"] == now["units"] and saved["global_batch"] != now["global_batch"]:
        raise DataChangedError(f"{checkpoint}: {_batch_advice(saved, now)}")
    if (saved["units"], saved["global_batch"]) != (now["units"], now["global_batch"]):
        raise DataChangedError(
            f"{checkpoint}: the checkpoint was written with {saved['units']} training units in global batches "
            f"of {saved['global_batch']}, this run has {now['units']} and {now['global_batch']}; "
            "resume with the same data and batch settings (or the same number of processes)"
        )
    then = saved.get("fingerprint")
    if then is None:  # written before checkpoints recorded it
        log.info("%s records no fingerprint of its training data: not checked", checkpoint)
        return
    if then == now["fingerprint"]:
        return
    what = (
        f"{checkpoint}: the training data changed since this checkpoint was written (same number of training units, "
        f"{now['units']}, but other encoded examples: fingerprint {then} then, {now['fingerprint']} now)"
    )
    if not force:
        raise DataChangedError(
            f"{what}; resume with the data files the run started with, or add --force to continue on the changed data"
        )
    log.warning("%s; continuing on the changed data (--force)", what)
