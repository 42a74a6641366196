"""The training loop on tiny models: artifacts, falling loss, accumulation, non-finite steps, early stopping,
precision, schedules, batching, and the errors a user can cause."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from glmtune.adapters import build_method
from glmtune.data.collate import PackedRow
from glmtune.pretrained import load_pretrained
from glmtune.templates import Encoded
from glmtune.train import evaluation, loop
from glmtune.train.config import load_config
from glmtune.train.data import Batcher, make_units
from glmtune.train.loop import TrainError, build_optimizer, trainable_parameters
from glmtune.train.metrics import read_metrics
from glmtune.train.schedule import LRSchedule
from glmtune.train.state import list_checkpoints, read_checkpoint
from train_support import ADGEN, ADGEN_DEV, run, small_config, tiny_model, train_losses


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def test_run_folder_and_falling_loss(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = small_config(tiny_model(models), out, "train.max_steps=12", "eval.every_steps=4", f"data.dev={ADGEN_DEV}",
                       "data.max_dev_samples=8", "save.every_steps=4", "save.keep_last=1", "log.every_steps=2",
                       "log.tensorboard=true", "log.plot=true", "train.learning_rate=2e-2")  # fmt: skip
    result = run(cfg)
    assert result.steps == 12 and result.stop_reason == "done"

    info = json.loads((out / "run.json").read_text())
    assert info["format"] == "glmtune-run" and info["version"] == 1
    assert info["base_model"] == cfg.model and info["generation"] == "chatglm3" and info["template"] == "chatglm3"
    assert info["method"]["name"] == "lora" and info["dtype"] == "fp32" and info["torch_version"] == torch.__version__
    assert load_config(out / "config.yaml") == cfg  # the resolved config reads back as it was

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12] and [r["step"] for r in evals] == [4, 8, 12]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 0.1  # it learns
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # keep_last=1, plus the best one; the final model is the best one's weights, with the tokenizer files
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps[-1] == 12 and len(steps) <= 2 and result.best_step in steps
    for _, ckpt in list_checkpoints(out):
        assert (ckpt / "model").is_dir() and (ckpt / "state" / "trainer.json").is_file()
    assert {"tokenizer.model", "tokenizer_config.json"} <= {p.name for p in (out / "model").iterdir()}
    assert not [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_gradient_accumulation_gives_the_same_run(models: Path, tmp_path: Path) -> None:
    """4 x 1, 2 x 2 and 1 x 4 (micro-batch x accumulation): one loss curve, packed or padded."""
    model = tiny_model(models)
    common = ("train.max_steps=4", "method.dropout=0.0", "train.learning_rate=5e-2")
    for packing in ("true", "false"):
        curves = []
        for b, acc in [(4, 1), (2, 2), (1, 4)]:
            cfg = small_config(model, tmp_path / f"r{b}{packing}", *common, f"train.batch_size={b}",
                               f"train.grad_accum={acc}", f"data.packing={packing}")  # fmt: skip
            curves.append([loss for _, loss in run(cfg).losses])
        for other in curves[1:]:
            assert other == pytest.approx(curves[0], rel=1e-5, abs=1e-6)
        assert curves[0][-1] < curves[0][0]


def test_each_method_and_generation_learns(models: Path, tmp_path: Path) -> None:
    """The same 4 examples every step: the loss must fall for each method, on every generation."""
    cases = [("chatglm3", "lora"), ("chatglm3", "ptuning"), ("chatglm3", "freeze"), ("chatglm3", "full"),
             ("chatglm", "lora"), ("chatglm2", "ptuning"), ("glm4", "lora"), ("chatglm", "ptuning")]  # fmt: skip
    options = {"lora": ["method.dropout=0.0"], "freeze": ["method.trainable_layers=1"],
               "ptuning": ["method.pre_seq_len=4", "train.learning_rate=0.2"]}  # fmt: skip
    for i, (gen, name) in enumerate(cases):
        cfg = small_config(tiny_model(models, gen), tmp_path / f"m{i}", f"method.name={name}", "train.max_steps=6",
                           "data.max_samples=4", "train.batch_size=4", *options.get(name, []))  # fmt: skip
        losses = [loss for _, loss in run(cfg).losses]
        assert losses[-1] < losses[0] - 0.05, (gen, name, losses)
        assert json.loads((tmp_path / f"m{i}" / "run.json").read_text())["method"]["name"] == name


def test_non_finite_losses_skip_then_stop(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_forward = loop.LMLoss.forward
    bad_steps = {3} | set(range(6, 100))  # micro-batch calls (= steps here) that return NaN

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real_forward(self, *args, **kwargs)
        return out * float("nan") if (self.training and calls["n"] in bad_steps) else out

    monkeypatch.setattr(loop.LMLoss, "forward", flaky)
    out = tmp_path / "nan"
    cfg = small_config(tiny_model(models), out, "train.max_steps=20", "train.max_bad_steps=3", "save.every_steps=1",
                       "save.keep_last=10")  # fmt: skip
    with pytest.raises(TrainError, match=r"stopped at step 8: 3 non-finite losses in a row.*step-000005"):
        run(cfg)
    losses = dict(train_losses(out))
    assert losses[3] == "nan"  # logged as such (JSON has no NaN)
    assert all(isinstance(losses[s], float) and math.isfinite(losses[s]) for s in (1, 2, 4, 5))
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 4, 5]  # none while a streak runs (3, 6, 7)
    ckpt = read_checkpoint(list_checkpoints(out)[-1][1])
    assert ckpt.progress.bad_steps == 0
    adam_steps = {float(st["step"]) for st in ckpt.trainer["optimizer"]["state"].values()}
    assert adam_steps == {4.0}  # 5 steps, the NaN one skipped: the optimizer stepped 4 times


def test_steps_read_back_only_when_logging(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss is read back at log points only; a streak of non-finite steps between two of them is still found
    and named by the step where it reached train.max_bad_steps; on_step makes every step read back."""
    reads: list[int] = []
    real_to_host = loop.to_host
    monkeypatch.setattr(loop, "to_host", lambda values: reads.append(len(values)) or real_to_host(values))
    real_forward = loop.LMLoss.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real_forward(self, *args, **kwargs)
        return out * float("nan") if (self.training and calls["n"] >= 6) else out

    monkeypatch.setattr(loop.LMLoss, "forward", flaky)
    cfg = small_config(tiny_model(models), tmp_path / "quiet", "train.max_steps=20", "train.max_bad_steps=3",
                       "log.every_steps=5", "save.every_steps=null")  # fmt: skip
    with pytest.raises(TrainError, match=r"stopped at step 8: 3 non-finite losses in a row"):
        run(cfg)
    assert reads == [5 * 5, 5 * 5]  # steps 1-5 at the first log point, 6-10 at the second (5 numbers a step)
    assert list_checkpoints(tmp_path / "quiet") == []

    reads.clear()
    calls["n"] = -100
    seen: list[int] = []
    cfg = small_config(tiny_model(models), tmp_path / "each", "train.max_steps=3", "log.every_steps=5")
    run(cfg, on_step=lambda step, values: seen.append(step) if math.isfinite(values["loss"]) else None)
    assert seen == [1, 2, 3] and reads == [5, 5, 5]


def test_no_checkpoint_of_a_bad_state(models: Path, tmp_path: Path, monkeypatch) -> None:
    real_forward = loop.LMLoss.forward
    monkeypatch.setattr(loop.LMLoss, "forward", lambda self, *a, **k: real_forward(self, *a, **k) * float("nan"))
    cfg = small_config(tiny_model(models), tmp_path / "allbad", "train.max_steps=5", "train.max_bad_steps=2",
                       "save.every_steps=1")  # fmt: skip
    with pytest.raises(TrainError):
        run(cfg)
    assert list_checkpoints(tmp_path / "allbad") == []  # no checkpoint of a bad state was ever written


def test_early_stopping_keeps_the_best(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev_losses = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
    monkeypatch.setattr(evaluation, "evaluate_loss", lambda *a, **k: next(dev_losses))
    out = tmp_path / "early"
    cfg = small_config(tiny_model(models), out, "train.max_steps=12", "eval.every_steps=2", "eval.patience=3",
                       f"data.dev={ADGEN_DEV}", "data.max_dev_samples=4", "save.keep_last=1")  # fmt: skip
    result = run(cfg)
    assert result.stop_reason == "early_stopping" and result.steps == 10  # evals at 6, 8, 10 not better
    assert (result.best_step, result.best_metric) == (4, 2.0)
    assert [s for s, _ in list_checkpoints(out)] == [4, 10]
    best = read_checkpoint(list_checkpoints(out)[0][1]).trainable
    last = read_checkpoint(list_checkpoints(out)[1][1]).trainable
    assert any(not torch.equal(best[k], last[k]) for k in best)
    final = {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.suffix == ".safetensors"}
    at_best = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-000004" / "model").iterdir()
               if p.suffix == ".safetensors"}  # fmt: skip
    assert final and final == at_best


def test_bf16_keeps_trainable_fp32_and_frozen_low(models: Path, tmp_path: Path) -> None:
    pretrained = load_pretrained(tiny_model(models), dtype=torch.bfloat16, device="cpu")
    cfg = small_config(tiny_model(models), tmp_path / "x", "train.weight_decay=0.1")
    method = build_method(cfg.method.name, cfg.method.options)
    method.setup(pretrained.model)
    named = trainable_parameters(method, pretrained.model)
    assert named and all(p.dtype == torch.float32 and p.requires_grad for p in named.values())
    frozen = [p for p in pretrained.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    opt = build_optimizer(named, cfg.train, torch.device("cpu"))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in named.items():
        assert decays[id(p)] == (0.0 if p.ndim < 2 or name.endswith(".bias") else 0.1)
    # and a bf16 run trains
    result = run(small_config(tiny_model(models), tmp_path / "bf16", "train.precision=bf16", "train.max_steps=4"))
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bf16"


def _reference_lr(kind: str, step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / (total - warmup))
    shape = 1.0 - p if kind == "linear" else (math.cos(math.pi * p) + 1.0) / 2.0
    return floor + (1.0 - floor) * shape


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules(kind: str) -> None:
    sched = LRSchedule(kind, total_steps=50, warmup_steps=7, min_ratio=0.1)
    for step in range(0, 60):
        assert sched(step) == pytest.approx(_reference_lr(kind, step, 50, 7, 0.1), abs=1e-12)
    assert sched(0) == 0.0 and sched(7) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("step", 10)


def test_batches_shard_by_rank_and_shuffle_by_epoch() -> None:
    units = [Encoded([i, i + 1], [i, i + 1]) for i in range(23)]

    def batcher(b: int, acc: int, world: int) -> Batcher:
        return Batcher(units, b, acc, world, seed=3, pad_id=0, positions="1d")

    one, two = batcher(2, 4, 1), batcher(2, 2, 2)
    assert one.steps_per_epoch == two.steps_per_epoch == 2  # 23 // 8, the rest dropped
    seen_epoch: list[int] = []
    for step in range(6):
        single = [u.input_ids[0] for mb in one.step_units(step, 0) for u in mb]
        split = [u.input_ids[0] for r in range(2) for mb in two.step_units(step, r) for u in mb]
        assert sorted(single) == sorted(split) and len(set(single)) == 8
        if step < 2:
            seen_epoch += single
    assert len(set(seen_epoch)) == 16  # no unit twice within an epoch
    assert [u.input_ids[0] for mb in one.step_units(0, 0) for u in mb] != [
        u.input_ids[0] for mb in one.step_units(2, 0) for u in mb
    ]  # epoch 1 is ordered differently
    assert one.step_units(5, 0) == batcher(2, 4, 1).step_units(5, 0)  # a pure function of the step
    packed = Batcher([PackedRow([u, u]) for u in units], 2, 1, 1, seed=0, pad_id=0, positions="1d")
    assert "segment_ids" in packed.collate(packed.step_units(0, 0)[0])
    examples = [Encoded(list(range(n)), list(range(n))) for n in (5, 3, 2, 2, 1)]
    assert len(make_units(examples, packing=False, pack_length=None)) == 5
    assert [r.length for r in make_units(examples, packing=True, pack_length=None)] == [5, 5, 3]  # budget 5


def test_user_errors(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    out = tmp_path / "taken"
    run(small_config(model, out, "train.max_steps=1"))
    with pytest.raises(FileExistsError, match="already holds a run; continue it with --resume"):
        run(small_config(model, out, "train.max_steps=1"))
    run(small_config(model, out, "train.max_steps=2", "overwrite=true"))
    assert [s for s, _ in train_losses(out)] == [1, 2]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no glmtune run"):
        run(small_config(model, other, "train.max_steps=1", "overwrite=true"))
    with pytest.raises(ValueError, match="template 'chatglm' does not fit the model folder"):
        run(small_config(model, tmp_path / "t", "template=chatglm"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(small_config(model, tmp_path / "b", "train.batch_size=64"))
    with pytest.raises(ValueError, match=r"data.pack_length=8 is shorter than the longest training example"):
        run(small_config(model, tmp_path / "p", "data.pack_length=8"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["method"]["name"] == "lora"
    oom = loop.oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), small_config(
        model, out))  # fmt: skip
    for setting in ("train.batch_size", "train.grad_accum", "data.max_source_length", "train.gradient_checkpointing"):
        assert setting in str(oom)


def test_generation_metrics_hook_and_best_by_a_generation_metric(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    cfg = small_config(tiny_model(models), out, "train.max_steps=4", f"data.dev={ADGEN_DEV}", "data.max_dev_samples=3",
                       "eval.generate_every_steps=2", "eval.max_new_tokens=4", "eval.generate_examples=2",
                       "eval.metric=rouge-l")  # fmt: skip
    result = run(cfg)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"rouge-1", "rouge-l", "bleu-4"} <= set(r) for r in evals)
    assert "loss" in evals[-1]  # the dev loss at the end, beside the generation metrics
    best = max(evals, key=lambda r: (r["rouge-l"], -r["step"]))
    assert (result.best_step, result.best_metric) == (best["step"], best["rouge-l"])

    calls: list[bool] = []

    def hook(model: torch.nn.Module) -> dict[str, float]:
        calls.append(model.training)
        return {"score": float(len(calls))}

    cfg = small_config(tiny_model(models), tmp_path / "hook", "train.max_steps=3", "eval.generate_every_steps=1",
                       "eval.metric=score")  # fmt: skip
    result = run(cfg, eval_hook=hook)
    assert calls == [False, False, False]  # called in eval mode
    assert (result.best_step, result.best_metric) == (3, 3.0)


def test_a_real_run_caps_lengths_at_seq_length_and_lists_dropped_records(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In `train` itself (not only load_datasets): one outlier record is cut to the model's seq_length (256 on the
    tiny model) instead of widening every packed row, and the records left out are listed in the run folder."""
    from glmtune.data.dropped import DROPPED_FILE, read_dropped

    model = tiny_model(models)
    records = [json.loads(line) for line in ADGEN.read_text(encoding="utf-8").splitlines() if line.strip()][:12]
    records.append({"content": records[0]["content"], "summary": "长" * 3000})  # the outlier
    records.append({"content": records[1]["content"], "summary": ""})  # empty response: left out
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    cfg = small_config(model, tmp_path / "run", f"data.train={data}", "data.max_source_length=null",
                       "data.max_target_length=null", "data.max_samples=null", "train.max_steps=2")  # fmt: skip
    widths: list[int] = []
    original = Batcher.collate

    def collate(self, units):
        batch = original(self, units)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(Batcher, "collate", collate)
    run(cfg)
    seq_length = json.loads((model / "config.json").read_text())["seq_length"]
    assert widths and max(widths) <= seq_length
    listed = read_dropped(tmp_path / "run" / DROPPED_FILE)
    assert len(listed) == 1 and listed[0].where == f"{data}:record 14"
