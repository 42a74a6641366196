"""What a run records: ``metrics.jsonl`` (one JSON object per log or eval point), TensorBoard events in ``tb/``
and ``loss.png`` (train and eval loss by step).

Records look like ``{"step": 10, "split": "train", "loss": 2.31, "lr": 1e-4, "tokens_per_s": 5120.0, ...}`` and
``{"step": 100, "split": "eval", "loss": 2.05, "rouge-l": 31.2}``. On resume the records after the checkpoint's
step are dropped (and TensorBoard purges its events past it), so the files tell one consistent story.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from glmtune.io import atomic_path, atomic_write_text, writing

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Rank 0's writer (``enabled=False`` on other ranks: every call does nothing)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 plot: bool = True, resume_step: int | None = None) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.plot_enabled = plot
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            self.records = [r for r in read_metrics(path) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        else:
            atomic_write_text(path, "")
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                log.warning("TensorBoard is not available (%s); writing metrics.jsonl only", e)
            else:
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "split": split, **{k: _clean(v) for k, v in values.items()}}
        self.records.append(rec)
        with writing(self.run_dir / METRICS_FILE):  # a line cut short by a full disk is skipped when read
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def plot(self) -> None:
        """Write loss.png (train and eval loss by step) atomically; skipped with a warning without matplotlib."""
        if not (self.enabled and self.plot_enabled):
            return
        train = [(r["step"], r["loss"]) for r in self.records if r["split"] == "train" and _is_num(r.get("loss"))]
        dev = [(r["step"], r["loss"]) for r in self.records if r["split"] == "eval" and _is_num(r.get("loss"))]
        if not train and not dev:
            return
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as e:
            log.warning("matplotlib is not available (%s); no loss.png", e)
            self.plot_enabled = False
            return
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
        if dev:
            ax.plot(*zip(*dev, strict=True), "o-", label="eval loss", linewidth=1.2, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with writing(self.run_dir / PLOT_FILE), atomic_path(self.run_dir / PLOT_FILE) as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
