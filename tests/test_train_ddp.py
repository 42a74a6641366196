"""Two processes (torchrun, gloo on the CPU) give the loss curve of one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmtune.train.metrics import read_metrics
from train_support import ADGEN_DEV, run, small_config, tiny_model, train_losses

TESTS = Path(__file__).resolve().parent
SETTINGS = ("train.max_steps=4", "train.batch_size=2", "method.dropout=0.0", "train.learning_rate=5e-2",
            f"data.dev={ADGEN_DEV}", "data.max_dev_samples=7", "eval.every_steps=2", "save.every_steps=2")  # fmt: skip

WORKER = """
from train_support import run, small_config
run(small_config({model!r}, {out!r}, *{settings!r}))
"""


def _eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(not _two_gpus(), reason="needs 2 GPUs")]),
    ],
)
def test_two_processes_match_one(tmp_path: Path, backend: str) -> None:
    """gloo: CPU processes; nccl: one GPU per process, in fp32 (bf16 would round the two runs differently)."""
    settings = (*SETTINGS, "train.device=cpu") if backend == "gloo" else (*SETTINGS, "train.precision=fp32")
    rel = 1e-5 if backend == "gloo" else 1e-4  # GPU reductions are not bitwise reproducible across layouts
    model = tiny_model(tmp_path)
    single = tmp_path / "single"
    run(small_config(model, single, *settings, "train.grad_accum=2"))  # 2 x 2 x 1 process = 2 x 1 x 2 processes

    out = tmp_path / "ddp"
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER).format(model=str(model), out=str(out), settings=settings))
    # the worker imports train_support from tests/
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = train_losses(single), train_losses(out)
    assert [s for s, _ in two] == [1, 2, 3, 4]
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=rel)
    assert one[-1][1] < one[0][1]
    assert [loss for _, loss in _eval_losses(out)] == pytest.approx([loss for _, loss in _eval_losses(single)],
                                                                    rel=rel)  # fmt: skip
    # rank 0 alone wrote the run folder, with both ranks' RNG states in each checkpoint
    from glmtune.train.state import list_checkpoints, read_checkpoint

    ckpt = read_checkpoint(list_checkpoints(out)[-1][1])
    assert len(ckpt.trainer["rng"]) == 2 and ckpt.trainer["data"]["world_size"] == 2
    assert (out / "model").is_dir() and len(list(out.glob("run.json"))) == 1
