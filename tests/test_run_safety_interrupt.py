"""Ctrl-C during ``glmtune train`` (a real SIGINT in a subprocess): the first one finishes the step, writes a
checkpoint, prints the resume command and exits 130, and the resumed run has the losses of an uninterrupted one;
a second Ctrl-C exits at once, keeping the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmtune.train.config import resume_config
from glmtune.train.distributed import DistInfo
from glmtune.train.interrupt import StopRequest, resume_command
from glmtune.train.state import list_checkpoints, read_checkpoint
from train_support import run, small_config, tiny_model, train_losses

TESTS = Path(__file__).resolve().parent
SETTINGS = ("train.max_steps=6", "save.every_steps=2", "method.dropout=0.1")  # dropout: the RNG must be restored

# ``glmtune train CONFIG`` whose optimizer step ``at`` sends the process SIGINT ``times`` times: once while the
# step runs, then (the second) half-way through writing the Ctrl-C checkpoint.
CTRL_C = """
import os, signal, sys
import glmtune.train.loop as loop
import glmtune.train.step as step
from glmtune.cli import main

calls = [0]
real_step, real_write = step.TrainStep.__call__, loop.write_checkpoint

def ctrl_c_in_step(self, batches):
    calls[0] += 1
    if calls[0] == {at}:
        os.kill(os.getpid(), signal.SIGINT)
    return real_step(self, batches)

def ctrl_c_in_save(path, **kwargs):
    save_model = kwargs["save_model"]

    def save_model_then_ctrl_c(folder):  # half-way through the checkpoint's hidden work folder
        save_model(folder)
        os.kill(os.getpid(), signal.SIGINT)

    if {times} > 1 and "step-{at:06d}" in str(path):
        kwargs["save_model"] = save_model_then_ctrl_c
    return real_write(path, **kwargs)

step.TrainStep.__call__ = ctrl_c_in_step
loop.write_checkpoint = ctrl_c_in_save
sys.exit(main(["train", {config!r}]))
"""


def ctrl_c_run(tmp_path: Path, model: Path, out: Path, *, at: int, times: int) -> subprocess.CompletedProcess:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(small_config(model, out, *SETTINGS).to_yaml(), encoding="utf-8")
    script = textwrap.dedent(CTRL_C).format(at=at, times=times, config=str(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # training subprocesses
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    run(small_config(model, tmp_path / "uninterrupted", *SETTINGS))
    expected = train_losses(tmp_path / "uninterrupted")
    assert [s for s, _ in expected] == list(range(1, 7))

    out = tmp_path / "stopped"
    proc = ctrl_c_run(tmp_path, model, out, at=3, times=1)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in proc.stderr
    assert f"stopped by Ctrl-C after step 3; checkpoint {out / 'checkpoints' / 'step-000003'}" in proc.stderr
    assert f"glmtune train --resume {out}" in proc.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]  # step 3 finished and saved (between the periodic ones)
    assert train_losses(out) == expected[:3]

    result = run(resume_config(out), resume=True)
    assert result.steps == 6
    assert train_losses(out) == expected  # bit for bit


@pytest.mark.slow  # a training subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    out = tmp_path / "stopped"
    proc = ctrl_c_run(tmp_path, model, out, at=3, times=2)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "stopped by Ctrl-C; the last complete checkpoint is kept" in proc.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2]  # the Ctrl-C checkpoint was abandoned, cleanly
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (out / "model").exists()


DDP_WORKER = """
import os, signal, sys
import glmtune.train.step as step
from glmtune.cli import main

calls = [0]
real_step = step.TrainStep.__call__

def ctrl_c_on_rank_1(self, batches):
    calls[0] += 1
    if calls[0] == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)
    return real_step(self, batches)

step.TrainStep.__call__ = ctrl_c_on_rank_1
sys.exit(main(["train", {config!r}]))
"""


@pytest.mark.slow  # two processes over gloo
@pytest.mark.skipif(sys.platform == "win32" or not __import__("torch").distributed.is_available(), reason="DDP")
def test_under_ddp_every_rank_stops_after_the_same_step(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    out = tmp_path / "ddp"
    # rank 1 alone gets Ctrl-C, in step 1; the ranks agree where they synchronise anyway: step 2 (log.every_steps)
    config = tmp_path / "ddp.yaml"
    config.write_text(small_config(model, out, *SETTINGS, "train.device=cpu", "log.every_steps=2").to_yaml(), "utf-8")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(DDP_WORKER).format(config=str(config)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # torchrun reports its workers' exit status 130 as a failure
    assert "exitcode  : 130" in proc.stderr or "exit code 130" in proc.stderr.lower(), proc.stderr[-3000:]
    assert proc.stderr.count("stopped by Ctrl-C after step 2") == 1, proc.stderr[-3000:]  # rank 0 alone says it
    assert f"torchrun --nproc-per-node 2 -m glmtune train --resume {out}" in proc.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2] and [s for s, _ in train_losses(out)] == [2]
    assert len(read_checkpoint(list_checkpoints(out)[0][1]).trainer["rng"]) == 2  # both ranks' RNG: resumable


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to oneself")
def test_stop_request_takes_the_first_ctrl_c_and_lets_the_second_through() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(DistInfo()) as stop:
        assert not stop.due(synced=False)
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.due(synced=False)  # one process: at any step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert resume_command(Path("/runs/my run")) == "glmtune train --resume '/runs/my run'"
    assert resume_command(Path("/r"), 4) == "torchrun --nproc-per-node 4 -m glmtune train --resume /r"
