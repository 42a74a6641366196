"""FSDP2 on the CPU (gloo, torchrun): two processes train as one, exact resume (same and other world size), the
gathered model/, two "nodes" with a c10d rendezvous, and the errors of a distributed start.

One two-process full fine-tuning run (module fixture) serves as the reference of several tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glmtune.train import distributed, fsdp
from glmtune.train.config import resume_config
from glmtune.train.metrics import read_metrics
from glmtune.train.state import checkpoint_dir, is_sharded, list_checkpoints, read_checkpoint
from train_support import ADGEN_DEV, run, small_config, tiny_model, train_losses

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

TESTS = Path(__file__).resolve().parent
STEPS = 16
# full fine-tuning (MLPs recomputed in the backward pass), 2 rows per process and micro-batch, dev loss every 4 steps
# (7 dev samples in batches of 3: rank 0 gets 2 batches, rank 1 one and a padding batch without targets, so that both
# run as many forward passes), a checkpoint every 4 steps, all kept
FULL = ("method.name=full", f"train.max_steps={STEPS}", "train.batch_size=2", "train.learning_rate=1e-3",
        "train.device=cpu", "train.gradient_checkpointing=mlp", f"data.dev={ADGEN_DEV}", "data.max_dev_samples=7",
        "eval.every_steps=4", "eval.batch_size=3", "save.every_steps=4", "save.keep_last=10")  # fmt: skip

WORKER = """
import logging, os, signal
logging.basicConfig(level=logging.INFO)
import torch
from glmtune.train import distributed
from glmtune.train.loop import Trainer
from train_support import small_config

cfg = small_config({model!r}, {out!r}, *{settings!r})
resume = {resume!r}
if resume:
    from glmtune.train.config import resume_config
    cfg = resume_config({out!r}, {settings!r})
info = distributed.setup(cfg.train.device, cpu_collectives=cfg.train.fsdp_offload)
kill_at = {kill_at!r}

def on_step(step, values):
    if step == kill_at and info.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)

trainer = Trainer(cfg, info, resume=resume, on_step=on_step if kill_at else None)
trainer.setup()
trainer.run()
if {logits!r}:  # the trained sharded model's logits on fixed ids, from rank 0
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(7))
    trainer.model.eval()
    trainer.net.unshard()  # the root's weights (embeddings, output layer); each block gathers its own
    with torch.no_grad():
        logits = trainer.model(ids)
    trainer.net.reshard()
    if info.is_main:
        torch.save({{"ids": ids, "logits": logits}}, {logits!r})
del trainer  # the sharded model holds the process group: freed before it ends (distributed.teardown)
distributed.teardown(info, together=True)
"""


def _script(tmp: Path, name: str, model: Path, out: Path, settings, *, resume=False, kill_at=None,
            logits: str = "") -> Path:  # fmt: skip
    script = tmp / f"{name}.py"
    script.write_text(textwrap.dedent(WORKER).format(model=str(model), out=str(out),
                                                     settings=tuple(settings), resume=resume, kill_at=kill_at,
                                                     logits=logits))  # fmt: skip
    return script


def _env() -> dict[str, str]:
    """The workers' environment: tests/ on PYTHONPATH (they import train_support), one thread each."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLMTUNE_DIST_TIMEOUT": "60"}


def _torchrun(script: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(script)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _standalone(script: Path) -> subprocess.CompletedProcess:
    return _torchrun(script, "--standalone", "--nproc-per-node", "2")


def _losses(run_dir: Path) -> list[float]:
    return [loss for _, loss in train_losses(run_dir)]


def _evals(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """A two-process FSDP full fine-tuning run, the trained sharded model's logits, and its one-process twin."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model = tiny_model(tmp)
    out = tmp / "two"
    logits = tmp / "logits.pt"
    proc = _standalone(_script(tmp, "two", model, out, FULL, logits=str(logits)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = tmp / "single"
    run(small_config(model, single, *FULL, "train.grad_accum=2"))  # 2 rows x 2 micro-batches = 2 rows x 2 ranks
    return {"tmp": tmp, "model": model, "out": out, "logits": logits, "single": single, "log": proc.stderr}


def test_two_processes_fsdp_full_match_one(two) -> None:
    out, single = two["out"], two["single"]
    assert "fsdp (train.distributed auto)" in two["log"]
    one, both = _losses(single), _losses(out)
    assert len(both) == STEPS and one[-1] < one[0]
    assert both == pytest.approx(one, rel=1e-4)
    assert [s for s, _ in _evals(out)] == [4, 8, 12, 16]
    assert [v for _, v in _evals(out)] == pytest.approx([v for _, v in _evals(single)], rel=1e-4)
    # sharded checkpoints: one shard file per rank, the optimizer inside, trainer.pt for the rest
    ckpt = checkpoint_dir(out, 8)
    assert is_sharded(ckpt) and len(list((ckpt / "state" / "dcp").glob("*.distcp"))) == 2
    ck = read_checkpoint(ckpt)
    assert ck.sharded and ck.trainable == {} and "optimizer" not in ck.trainer and len(ck.trainer["rng"]) == 2
    assert not is_sharded(checkpoint_dir(single, 8))


def test_gathered_model_gives_the_sharded_logits(two) -> None:
    """model/ (original layout, gathered tensor by tensor) loads in one process: the logits of the sharded model."""
    from glmtune.pretrained import load_pretrained

    out = two["out"]
    model_dir = out / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer_config.json").is_file()
    got = torch.load(two["logits"], weights_only=True)
    model = load_pretrained(model_dir, dtype=torch.float32, device="cpu").model.eval()
    with torch.no_grad():
        logits = model(got["ids"])
    torch.testing.assert_close(logits, got["logits"], rtol=1e-5, atol=1e-5)
    # and the checkpoint's model/ is the same format
    assert (checkpoint_dir(out, 16) / "model" / "model.safetensors").is_file()


def test_resume_with_one_process_from_two_and_back(two, caplog) -> None:
    """A 2-process sharded checkpoint (step 8) resumed by one process (same global batch: grad_accum 2), whose plain
    checkpoint (step 12) two processes resume in turn."""
    run_dir = two["tmp"] / "resumed-one"
    shutil.copytree(two["out"], run_dir)
    for step in (12, 16):
        shutil.rmtree(checkpoint_dir(run_dir, step))
    with caplog.at_level("WARNING"):
        result = run(resume_config(run_dir, ["train.grad_accum=2"]), resume=True)
    assert result.steps == STEPS
    assert "dropout will differ" in caplog.text
    assert _losses(run_dir) == pytest.approx(_losses(two["out"]), rel=1e-4)
    assert not is_sharded(checkpoint_dir(run_dir, 16))  # one process writes the plain format

    # and back: the one-process checkpoint of step 12 resumed by two processes (sharded from whole tensors)
    back = two["tmp"] / "back-to-two"
    shutil.copytree(run_dir, back)
    shutil.rmtree(checkpoint_dir(back, 16))
    proc = _standalone(_script(two["tmp"], "back", two["model"], back, ("train.grad_accum=1",), resume=True))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(back) == pytest.approx(_losses(two["out"]), rel=1e-4)
    assert is_sharded(checkpoint_dir(back, 16))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_rank_then_resume_gives_the_same_losses(two) -> None:
    """Rank 1 dies (SIGKILL) after step 10; torchrun stops rank 0 and names rank 1; the resume from the step-8
    checkpoint gives the losses of the uninterrupted run."""
    tmp, out = two["tmp"], two["tmp"] / "killed"
    proc = _standalone(_script(tmp, "killed", two["model"], out, FULL, kill_at=10))
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]
    proc = _standalone(_script(tmp, "resume", two["model"], out, (), resume=True))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(out) == _losses(two["out"])  # same world size: bit for bit
    assert _evals(out) == _evals(two["out"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_lora_over_sharded_base(two) -> None:
    """Two torchrun agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1) train LoRA over an
    FSDP-sharded frozen base together, every other block recomputed in the backward pass: the loss sequence of one
    process with the same global batch. (train.compile under FSDP: the GPU test below, with inductor.)"""
    tmp, model = two["tmp"], two["model"]
    lora = ("method.name=lora", "train.distributed=fsdp", "train.max_steps=8", "train.batch_size=2",
            "train.device=cpu", "method.dropout=0.0", "save.every_steps=4",
            "train.gradient_checkpointing=half")  # fmt: skip
    out = tmp / "nodes"
    script = _script(tmp, "nodes", model, out, lora)
    port = _free_port()
    args = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "glmtune-test", str(script)]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    try:
        errs = [p.communicate(timeout=420)[1] for p in nodes]
    finally:
        for p in nodes:  # a timed-out agent is not left running
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    single = tmp / "lora-single"
    run(small_config(model, single, *lora, "train.grad_accum=2"))
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-4)
    assert is_sharded(checkpoint_dir(out, 4))
    assert (out / "model" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    a, b = (load_file(d / "model" / "adapter_model.safetensors") for d in (out, single))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


LOAD_WORKER = """
import torch
from glmtune.models import checkpoint
from glmtune.train import distributed, fsdp
from glmtune.train.loop import Trainer
from train_support import small_config

reads = []  # (checkpoint name, shape read, rows only) of every tensor read from the model folder
read = checkpoint._read_converted

def spy(reader, name, device, dtype, rows=None):
    out = read(reader, name, device, dtype, rows=rows)
    reads.append((name, tuple(out.shape), rows is not None))
    return out

checkpoint._read_converted = spy
cfg = small_config({model!r}, {out!r}, *{settings!r})
info = distributed.setup("cpu")
trainer = Trainer(cfg, info)
trainer.load_model()
real = sorted(n for n, p in trainer.model.named_parameters() if not p.is_meta)
trainer.distribute()
params = dict(trainer.model.named_parameters())
ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(7))
trainer.model.eval()
trainer.net.unshard()
with torch.no_grad():
    logits = trainer.model(ids)
trainer.net.reshard()
torch.save({{"reads": reads, "real_after_load": real, "ids": ids, "logits": logits,
            "local": {{n: p.to_local().numel() for n, p in params.items()}},
            "whole": {{n: p.numel() for n, p in params.items()}},
            "trainable": {{n: fsdp.full_tensor(p.detach()) for n, p in trainer.named.items()}}}},
           {out!r} + f"-rank{{info.rank}}.pt")
del trainer, params  # they hold the process group: freed before it ends (distributed.teardown)
distributed.teardown(info, together=True)
"""


LOADS = {
    "lora": ("chatglm3", ("method.name=lora", "method.target_modules=all")),
    "ptuning-v1": ("chatglm", ("method.name=ptuning", "method.pre_seq_len=4")),  # ChatGLM-6B: tied output layer
    "freeze-bf16": ("chatglm3", ("method.name=freeze", "method.trainable_layers=1", "train.precision=bf16")),
    "lora-int8": ("chatglm3", ("method.name=lora", "quantize=int8")),  # int8 weights: buffers, whole on each rank
}


@pytest.mark.parametrize("variant", list(LOADS))
def test_fsdp_loads_only_each_ranks_shards(tmp_path: Path, variant: str) -> None:
    """Under FSDP the base is built on meta (only the method's own tensors are real, initialised as in one process)
    and each rank reads only its rows of every parameter: no rank ever holds a whole block weight, each keeps half of
    every parameter, and the sharded model gives the logits and the trainable values of the one-process load (a
    freeze of a bf16 load: the bf16-rounded weights in float32)."""
    from glmtune.train.distributed import DistInfo
    from glmtune.train.loop import Trainer

    generation, method = LOADS[variant]
    model = tiny_model(tmp_path, generation)
    settings = (*method, "train.distributed=fsdp", "train.device=cpu")
    out = tmp_path / "load"
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD_WORKER).format(model=str(model), out=str(out),
                                                          settings=settings))  # fmt: skip
    proc = _standalone(script)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(f"{out}-rank{r}.pt", weights_only=True) for r in (0, 1)]

    one = Trainer(small_config(model, tmp_path / "one", *settings), DistInfo())
    one.load_model()  # the one-process load: the whole base on the device, then the method
    whole = {n: p.detach() for n, p in one.model.named_parameters()}
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    with torch.no_grad(), bf16:
        logits = one.model.eval()(ranks[0]["ids"])
    added = sorted(n for n in whole if ".lora_" in n or "prefix_encoder" in n)  # made by the method, not loaded
    assert set(ranks[0]["trainable"]) == set(one.named)
    block_weights = [n for n in whole if ".layers." in n and n.endswith(".weight") and whole[n].ndim == 2
                     and n not in added]  # fmt: skip
    assert block_weights or variant == "lora-int8"
    for got in ranks:
        assert got["real_after_load"] == added  # the base still on meta until sharded
        rows_of = {name: (shape, rows) for name, shape, rows in got["reads"]}
        for n in block_weights:
            shape, rows = rows_of[n.replace(".base_layer.", ".")]
            assert rows and shape[0] * 2 <= whole[n].shape[0] + 1, (n, shape)  # only this rank's rows were read
        tol = 2e-2 if "bf16" in variant else 1e-5
        torch.testing.assert_close(got["logits"], logits, rtol=tol, atol=tol)
        for n, value in got["trainable"].items():
            torch.testing.assert_close(value, whole[n], rtol=0, atol=0)
    for n, size in ranks[0]["whole"].items():
        assert size == whole[n].numel()
        assert ranks[0]["local"][n] + ranks[1]["local"][n] == size  # every parameter split over the two ranks
    total = sum(ranks[0]["whole"].values())
    assert all(sum(r["local"].values()) <= total / 2 + 1000 for r in ranks)


def _two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 GPUs")
@pytest.mark.parametrize("variant", ["compiled", "offload"])
def test_two_gpus_fsdp_full_match_one(tmp_path: Path, variant: str) -> None:
    """NCCL, one GPU per process, fp32 (bf16 would round the two layouts differently): the trainer's compiled blocks
    under FSDP, or the shards and AdamW on the CPU (train.fsdp_offload)."""
    model = tiny_model(tmp_path)
    extra = ["train.compile=true"] if variant == "compiled" else ["train.compile=false", "train.fsdp_offload=true"]
    settings = [s for s in FULL if s != "train.device=cpu"] + ["train.precision=fp32", *extra]
    out = tmp_path / "two"
    proc = _standalone(_script(tmp_path, "two", model, out, settings))
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = tmp_path / "single"
    run(small_config(model, single, *[s for s in settings if "offload" not in s], "train.grad_accum=2"))
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-4)
    assert [v for _, v in _evals(out)] == pytest.approx([v for _, v in _evals(single)], rel=1e-4)
    assert is_sharded(checkpoint_dir(out, 8)) and (out / "model" / "model.safetensors").is_file()


# ---- sharding options, one process (gloo, world size 1) --------------------------------------------------------
@contextlib.contextmanager
def _one_process_group():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)  # fmt: skip
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _sharded_full(**options):
    """A 4-block tiny ChatGLM3 (same random weights each call), full fine-tuning, sharded with ``options``."""
    import dataclasses

    from glmtune.adapters import build_method
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.train.config import OptimConfig
    from glmtune.train.setup import build_optimizer, trainable_parameters
    from glmtune.train.step import LMLoss

    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny-chatglm3"), num_layers=4)
    model = build_model(cfg, device="cpu", dtype=torch.float32, generation="chatglm3")
    method = build_method("full", {})
    method.setup(model)
    names = list(trainable_parameters(method, model))
    net = LMLoss(model, 8)
    fsdp.shard(net, model, distributed.DistInfo(), compute_dtype=None, **options)
    named = fsdp.sharded_parameters(model, names)
    optimizer = build_optimizer(named, OptimConfig(learning_rate=1e-2), torch.device("cpu"))
    return net, model, named, optimizer


def test_shard_options_train_alike_and_save_after_an_eval_forward(tmp_path: Path) -> None:
    """Blocks kept gathered from forward to backward (all of them here), two blocks per FSDP unit and prefetching
    two units ahead train as the default sharding does; after an evaluation (a forward without backward, which
    leaves kept units gathered) the weights are sharded again, so the DCP checkpoint saves and loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from glmtune.train.evaluation import evaluate_loss
    from glmtune.train.state import sharded_dir

    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
               for ids in torch.randint(5, 500, (4, 2, 16), generator=g)]  # fmt: skip
    info = distributed.DistInfo()
    runs = {}
    with _one_process_group():
        for name, options in {"default": {}, "options": dict(keep_gathered=4, prefetch=2, blocks_per_unit=2)}.items():
            net, model, named, optimizer = _sharded_full(**options)
            losses = []
            for k, batch in enumerate(batches):
                loss = net(input_ids=batch["input_ids"], labels=batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(float(loss.detach()))
                if k in (1, 3):  # an eval-only forward, then training goes on (k=1) or the checkpoint is saved
                    losses.append(evaluate_loss(net, batches[:1], info, contextlib.nullcontext()))
            assert all(isinstance(p, DTensor) for p in model.parameters())  # no unit left gathered
            ckpt = tmp_path / name
            dcp.save(fsdp.checkpoint_state(model, named, optimizer), checkpoint_id=str(sharded_dir(ckpt)))
            runs[name] = (losses, {n: p.full_tensor() for n, p in named.items()}, ckpt)
        assert runs["options"][0] == pytest.approx(runs["default"][0], rel=1e-6)
        assert runs["default"][0][-1] < runs["default"][0][0]
        # the checkpoint saved after the eval forward holds the trained weights and loads into a default sharding
        _, model, named, optimizer = _sharded_full()
        fsdp.load_checkpoint_state(runs["options"][2], model, named, optimizer)
        for n, p in named.items():
            torch.testing.assert_close(p.full_tensor(), runs["options"][1][n], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(runs["options"][1][n], runs["default"][1][n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="blocks_per_unit"):
        fsdp.shard(torch.nn.Module(), model, info, compute_dtype=None, prefetch=0)


# ---- the pieces, without processes ----------------------------------------------------------------------------
def test_choose_mode() -> None:
    assert fsdp.choose_mode("auto", "full", 1) == "single"
    assert fsdp.choose_mode("auto", "full", 2) == "fsdp"
    assert fsdp.choose_mode("auto", "freeze", 8) == "fsdp"
    assert fsdp.choose_mode("auto", "lora", 2) == "ddp"
    assert fsdp.choose_mode("fsdp", "ptuning", 2) == "fsdp"
    assert fsdp.choose_mode("ddp", "full", 2) == "ddp"
    with pytest.raises(ValueError, match="train.distributed"):
        fsdp.choose_mode("zero3", "full", 2)
    with pytest.raises(ValueError, match="fp16"):
        fsdp.check_supported(precision="fp16", offload=False, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="fsdp_offload.*GPUs"):
        fsdp.check_supported(precision="fp32", offload=True, device=torch.device("cpu"))


def test_shard_defaults_to_the_config_keep_gathered() -> None:
    """``shard``'s keep_gathered default (what bench/fsdp_speed.py reports as the default) is the config's."""
    import inspect

    from glmtune.train.config import OptimConfig

    assert inspect.signature(fsdp.shard).parameters["keep_gathered"].default == OptimConfig().fsdp_keep_gathered
    assert fsdp.KEEP_GATHERED == OptimConfig().fsdp_keep_gathered


def test_different_configs_on_the_ranks_are_an_error(monkeypatch) -> None:
    info = distributed.DistInfo(rank=0, world_size=3)
    texts = ["a: 1\n", "a: 1\n", "a: 2\n"]
    monkeypatch.setattr(distributed, "gather_objects", lambda _info, _obj: [distributed.config_hash(t) for t in texts])
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\] differ from rank 0"):
        distributed.check_same_config(info, texts[0])
    texts[2] = texts[0]
    distributed.check_same_config(info, texts[0])


def test_resume_with_another_world_size_keeps_the_global_batch(tmp_path: Path) -> None:
    from glmtune.train.resume_check import DataChangedError, check_same_data, data_record

    saved = data_record(units=24, global_batch=8, steps_per_epoch=3, world_size=2, fingerprint="f")
    same = data_record(units=24, global_batch=8, steps_per_epoch=3, world_size=4, fingerprint="f")
    check_same_data(saved, same, tmp_path)  # 4 processes x 2 rows: the same batches
    halved = data_record(units=24, global_batch=4, steps_per_epoch=6, world_size=1, fingerprint="f")
    with pytest.raises(DataChangedError, match=r"global batch of 8 \(2 processes\).*train.grad_accum=8"):
        check_same_data(saved, halved, tmp_path)
    three = data_record(units=24, global_batch=6, steps_per_epoch=4, world_size=3, fingerprint="f")
    with pytest.raises(DataChangedError, match="3 processes do not divide it"):
        check_same_data(saved, three, tmp_path)


def test_a_lost_peer_is_a_train_error_naming_the_resume(tmp_path: Path) -> None:
    from glmtune.train.interrupt import lost_peer_message

    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:43200. This is typically caused by a "
                        "remote worker crashing.")  # fmt: skip
    assert distributed.is_peer_failure(gloo) and not distributed.is_peer_failure(RuntimeError("shape mismatch"))
    msg = lost_peer_message(gloo, 3, tmp_path / "run", None, 8, 4)
    assert msg.startswith("rank 3 lost contact with another process of the run ([pair.cc:553] Connection closed")
    assert "Root Cause" in msg and "No checkpoint was complete yet" in msg
    assert "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT" in msg
