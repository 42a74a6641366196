"""Records left out of training, and where and why: the first few in the log, all of them in the run folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from glmtune.io import atomic_write_text

log = logging.getLogger(__name__)

DROPPED_FILE = "dropped_samples.jsonl"
SHOWN = 5  # records named in the log; the file lists them all


@dataclass(frozen=True)
class Dropped:
    """One record left out: ``where`` is "file:line N" (record/row N), ``reason`` says why."""

    where: str
    reason: str


def describe(items: Sequence[str], shown: int = SHOWN) -> str:
    """The first ``shown`` items joined, and how many more there are."""
    text = "; ".join(items[:shown])
    return text + (f"; … and {len(items) - shown} more" if len(items) > shown else "")


def log_dropped(dropped: Sequence[Dropped], total: int, what: str = "records") -> None:
    """One warning: how many of ``total`` were dropped, the first few with where and why."""
    if dropped:
        log.warning("left out %d of %d %s: %s", len(dropped), total, what,
                    describe([f"{d.where}: {d.reason}" for d in dropped]))  # fmt: skip


def write_dropped(run_dir: str | Path, dropped: Sequence[Dropped]) -> Path | None:
    """All dropped records into ``run_dir/dropped_samples.jsonl`` (one JSON object a line: where, reason), written
    atomically; a stale file from an earlier start is removed when nothing is dropped. Returns the file or None."""
    path = Path(run_dir) / DROPPED_FILE
    if not dropped:
        path.unlink(missing_ok=True)
        return None
    atomic_write_text(path, "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in dropped))
    log.warning("the %d records left out are listed in %s", len(dropped), path)
    return path


def read_dropped(path: str | Path) -> list[Dropped]:
    """The records of a ``dropped_samples.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Dropped(**json.loads(line)) for line in lines if line.strip()]
