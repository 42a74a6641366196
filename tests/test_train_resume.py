"""Exact resume: a run killed (SIGKILL, in a subprocess, in the middle of writing a checkpoint) and resumed has
the loss sequence of a run that was never interrupted, and no checkpoint is ever half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmtune.train.config import resume_config
from glmtune.train.metrics import read_metrics
from glmtune.train.state import list_checkpoints
from train_support import ADGEN_DEV, run, small_config, tiny_model, train_losses

TESTS = Path(__file__).resolve().parent
# Dropout on (the RNG must be restored), packing on, an epoch boundary at step 6 (24 examples, global batch 4),
# dev loss every 3 steps, a checkpoint every 2 keeping the last 2.
SETTINGS = ("train.max_steps=8", "train.batch_size=4", "save.every_steps=2", "save.keep_last=2",
            "eval.every_steps=3", f"data.dev={ADGEN_DEV}", "data.max_dev_samples=6", "method.dropout=0.1")  # fmt: skip

KILLER = """
import os, signal
import glmtune.train.state as state
from train_support import run, small_config

real_save = state.save_file

def save_then_die(tensors, filename, *args, **kwargs):
    real_save(tensors, filename, *args, **kwargs)
    if "step-000006" in str(filename):  # inside the hidden work folder of checkpoint 6, before trainer.pt
        os.kill(os.getpid(), signal.SIGKILL)

state.save_file = save_then_die
run(small_config({model!r}, {out!r}, *{settings!r}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_run_resumes_with_the_same_losses(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    reference = run(small_config(model, tmp_path / "uninterrupted", *SETTINGS))
    expected = train_losses(tmp_path / "uninterrupted")
    assert [s for s, _ in expected] == list(range(1, 9))
    assert expected == [(s, loss) for s, loss in reference.losses]

    out = tmp_path / "killed"
    script = textwrap.dedent(KILLER).format(model=str(model), out=str(out), settings=SETTINGS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # the half-written checkpoint exists only as a hidden work folder; the previous ones are complete
    saved = [s for s, _ in list_checkpoints(out)]
    assert saved[-1] == 4 and 6 not in saved  # (3 is kept too: the best dev loss so far)
    hidden = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert any("step-000006" in name for name in hidden)
    assert [s for s, _ in train_losses(out)] == list(range(1, 7))  # it got to step 6 before dying

    result = run(resume_config(out), resume=True)
    assert result.steps == 8
    assert train_losses(out) == expected  # bit for bit, steps 5-8 recomputed after the resume at step 4
    evals = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    ref_evals = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "uninterrupted" / "metrics.jsonl")
                 if r["split"] == "eval"]  # fmt: skip
    assert evals == ref_evals and [s for s, _ in evals] == [3, 6, 8]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned
    assert (out / "model").is_dir()
