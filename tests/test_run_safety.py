"""Never lose what the user has: overwrite=true keeps the previous run until the new one has started (and its
finished model until a new one exists), a full disk says so and leaves the checkpoints whole, a killed run's work
files are cleaned at the next start, and a resume on changed data is refused (or, with --force, warned about)."""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

import glmtune.train.state as state
from glmtune.cli import main as cli_main
from glmtune.io import NoSpaceError, is_no_space, writing
from glmtune.train.config import resume_config
from glmtune.train.loop import TrainError
from glmtune.train.resume_check import DataChangedError
from glmtune.train.run_folder import PREVIOUS, check_output_dir, remove_leftovers
from glmtune.train.state import list_checkpoints, read_checkpoint
from train_support import ADGEN, run, small_config, tiny_model, train_losses


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run folder (but the data cache) and a digest of its bytes."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.relative_to(run_dir).parts[0] != "tokenized"
    }


# ---- 1. overwrite=true -------------------------------------------------------------------------------------
def test_overwrite_that_fails_on_data_or_model_leaves_the_previous_run_intact(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    out = tmp_path / "run"
    run(small_config(model, out, "train.max_steps=2", "save.every_steps=1"))
    before = snapshot(out)
    assert "model/adapter_model.safetensors" in before and "checkpoints/step-000002/state/trainer.pt" in before

    bad_data = tmp_path / "bad.jsonl"
    lines = ADGEN.read_text(encoding="utf-8").splitlines()
    bad_data.write_text("\n".join([*lines[:3], '{"content": "oops", "summary": ', *lines[3:]]) + "\n", "utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:line 4"):
        run(small_config(model, out, "overwrite=true", f"data.train={bad_data}"))
    assert snapshot(out) == before

    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a download cut short
    with pytest.raises(Exception, match=r"model\.safetensors"):
        run(small_config(broken, out, "overwrite=true"))
    assert snapshot(out) == before
    assert not (out / PREVIOUS).exists()


def test_overwrite_keeps_the_finished_model_until_the_new_one_exists(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    out = tmp_path / "run"
    run(small_config(model, out, "train.max_steps=2"))
    before = snapshot(out)

    def fail(step: int, values: dict[str, float]) -> None:
        if step == 2:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        run(small_config(model, out, "overwrite=true", "train.max_steps=3", "save.every_steps=1"), on_step=fail)
    # the new run started (its checkpoints are in place, resumable); the old one waits in .previous-run
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert not (out / "model").exists()
    assert snapshot(out / PREVIOUS) == before
    # another overwrite that fails on its data: still the finished run kept aside, nothing else lost
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"content": "a", "summary": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:line 1"):
        run(small_config(model, out, "overwrite=true", f"data.train={bad_data}"))
    assert snapshot(out / PREVIOUS) == before

    result = run(resume_config(out), resume=True)
    assert result.steps == 3 and (out / "model" / "adapter_model.safetensors").is_file()
    assert not (out / PREVIOUS).exists()  # the new model exists: the replaced run is gone
    assert [s for s, _ in train_losses(out)] == [1, 2, 3]


def test_overwrite_replaces_the_previous_run(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    out = tmp_path / "run"
    run(small_config(model, out, "train.max_steps=2", "save.every_steps=1"))
    (out / "notes.txt").write_text("mine")
    run(small_config(model, out, "overwrite=true", "train.max_steps=1"))
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert [s for s, _ in train_losses(out)] == [1]
    assert not (out / PREVIOUS).exists() and (out / "notes.txt").read_text() == "mine"


def test_a_start_that_failed_before_it_began_is_no_run(tmp_path: Path) -> None:
    # the data step (which fills the cache) runs before anything else is written: a start that failed in it
    # leaves a folder that a plain new start may use
    run_dir = tmp_path / "run"
    (run_dir / "tokenized").mkdir(parents=True)
    check_output_dir(run_dir, resume=False, overwrite=False)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no glmtune run"):
        check_output_dir(run_dir, resume=False, overwrite=True)
    (run_dir / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a run"):
        check_output_dir(run_dir, resume=False, overwrite=False)


# ---- 3. a full disk ----------------------------------------------------------------------------------------
@pytest.mark.slow  # three short runs
@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")],  # torch.save's way
    ids=["enospc", "torch-save"],
)  # fmt: skip
def test_full_disk_names_the_file_and_the_last_good_checkpoint(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    model = tiny_model(models)
    settings = ("train.max_steps=4", "save.every_steps=1", "save.keep_last=3")
    out = tmp_path / "run"
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if "step-000003" in str(f):
            Path(f).write_bytes(b"\0" * 10)  # a partial file, as a full disk leaves it
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", save_until_full)
    with pytest.raises(TrainError) as got:
        run(small_config(model, out, *settings))
    message = str(got.value)
    assert f"no space left on device while writing {out / 'checkpoints' / 'step-000003'}" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    assert f"glmtune train --resume {out}" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]  # no partial
    assert read_checkpoint(out / "checkpoints" / "step-000002").progress.step == 2

    monkeypatch.setattr(state.torch, "save", real_save)  # space freed
    result = run(resume_config(out), resume=True)
    reference = run(small_config(model, tmp_path / "reference", *settings))
    assert result.steps == 4
    assert train_losses(out) == [(s, loss) for s, loss in reference.losses]


def test_no_space_errors_are_recognised() -> None:
    safetensors_says = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                    '"No space left on device" })')  # fmt: skip
    for e in (OSError(errno.ENOSPC, "x"), OSError(errno.EDQUOT, "x"), safetensors_says):
        assert is_no_space(e)
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_no_space(RuntimeError("shape mismatch"))
    with pytest.raises(NoSpaceError, match=r"^no space left on device while writing /x/metrics\.jsonl$"):
        with writing("/x/metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with writing("/x/metrics.jsonl"):
            raise PermissionError(errno.EACCES, "Permission denied")


# ---- 4. leftovers of a killed run --------------------------------------------------------------------------
def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    out = tmp_path / "run"
    run(small_config(model, out, "train.max_steps=2", "log.plot=true"))
    stray = [out / ".loss.png.k3j_x9q2.tmp", out / ".metrics.jsonl.abc12345.tmp", out / ".run.json.zz.tmp"]
    for p in stray:
        p.write_bytes(b"half")
    (out / ".model.q1w2e3r4.tmp").mkdir()
    (out / ".model.q1w2e3r4.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".my-notes").write_text("mine")  # not ours: kept
    result = run(resume_config(out, ["train.max_steps=3"]), resume=True)
    assert result.steps == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".my-notes"]
    assert (out / "loss.png").is_file()


def test_an_interrupted_folder_swap_is_put_back(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".model.old").mkdir(parents=True)  # killed between the two renames of an atomic folder write
    (run_dir / ".model.old" / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir / ".checkpoints.old").mkdir()  # not a write glmtune makes: a user's folder, kept
    remove_leftovers(run_dir)
    assert (run_dir / "model" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not (run_dir / ".model.old").exists()
    (run_dir / ".model.old").mkdir()  # killed while deleting the old copy: the new one is in place
    remove_leftovers(run_dir)
    assert not (run_dir / ".model.old").exists() and (run_dir / "model").is_dir()


# ---- 10. resuming on changed data --------------------------------------------------------------------------
def test_resume_on_changed_data_is_refused_unless_forced(
    models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model(models)
    data = tmp_path / "train.json"
    shutil.copy(ADGEN, data)
    out = tmp_path / "run"
    settings = ("data.packing=false", f"data.train={data}", "save.every_steps=2")
    run(small_config(model, out, "train.max_steps=2", *settings))
    # the same data resumes without a word
    run(resume_config(out, ["train.max_steps=3"]), resume=True)

    text = data.read_text(encoding="utf-8")
    data.write_text(text.replace("酒红色的衬衫", "黑色的衬衫", 1), encoding="utf-8")  # one record edited, same count
    with pytest.raises(DataChangedError, match="the training data changed since this checkpoint was written"):
        run(resume_config(out, ["train.max_steps=4"]), resume=True)
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]  # nothing written

    assert cli_main(["train", "--resume", str(out), "train.max_steps=4"]) == 2
    assert "add --force to continue on the changed data" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "x.yaml"), "--force"]) == 2  # --force belongs to --resume
    assert "--force only goes with --resume" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="glmtune"):
        assert cli_main(["train", "--resume", str(out), "--force", "train.max_steps=4"]) == 0
    assert "continuing on the changed data (--force)" in caplog.text
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
