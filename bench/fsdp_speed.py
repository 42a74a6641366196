"""FSDP2 full fine-tuning of a ChatGLM3-6B-shaped model: peak memory per GPU, useful tokens/s per GPU, MFU, and the
scaling from one GPU to several.

Each process builds the model on "meta", shards it as the trainer does (``glmtune.train.fsdp.shard``: every block,
then the loss module as the root; bf16 compute, float32 gradient reduction, float32 master weights and AdamW state)
and only then allocates its shard on its GPU with random weights (benchlib.random_fill), so no process ever holds
the whole model. One process runs the trainer's plain path (no FSDP: the whole model, gradients and optimizer state
on the one GPU). The step is the trainer's own (``TrainStep`` / ``ShardedTrainStep``), blocks compiled by
``train.compile``'s ``compile_blocks``, activation checkpointing as ``train.gradient_checkpointing`` says
(``true`` by default: the 6B optimizer state alone is 75 GB, half of it per GPU on two).

Data: synthetic ADGEN-like samples packed into ``--rows`` rows of ``--pack-length`` tokens per GPU and step (each
rank its own rows, as the trainer's batcher gives them). MFU = 6N x useful tokens/s per GPU / peak (N: parameters
without the input embedding; the recomputed forward of checkpointing is not counted). Peak: the largest
``max_memory_allocated`` over the ranks.

    # one GPU, then two, then the table (one machine)
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=src python bench/fsdp_speed.py --json out/fsdp-1.json
    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 bench/fsdp_speed.py --json out/fsdp-2.json
    python bench/fsdp_speed.py --combine out/fsdp-1.json out/fsdp-2.json --json bench/results/fsdp_speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib when imported from the tests

from benchlib import (  # noqa: E402
    H200_BF16_PEAK_TFLOPS,
    adgen_examples,
    free_memory,
    markdown_table,
    mfu,
    non_embedding_params,
    random_fill,
    time_steps,
    useful_tokens,
    write_json,
)

from glmtune.adapters import build_method  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.config import GLMConfig, preset  # noqa: E402
from glmtune.templates import get_template  # noqa: E402
from glmtune.train import distributed, fsdp  # noqa: E402
from glmtune.train.compile import compile_blocks  # noqa: E402
from glmtune.train.config import DataConfig, OptimConfig  # noqa: E402
from glmtune.train.data import make_batcher  # noqa: E402
from glmtune.train.recompute import apply_checkpointing  # noqa: E402
from glmtune.train.setup import build_optimizer, trainable_parameters  # noqa: E402
from glmtune.train.step import LMLoss, TrainStep  # noqa: E402

log = logging.getLogger("fsdp_speed")


def model_config(tiny: bool) -> GLMConfig:
    return preset("tiny-chatglm3") if tiny else preset("chatglm3-6b")


def build_step(cfg: GLMConfig, info: distributed.DistInfo, *, precision: torch.dtype, checkpointing: bool | str,
               compile: bool, offload: bool):  # fmt: skip
    """The trainer's full fine-tuning step on a random model: sharded over the processes when there are several."""
    model = build_model(cfg, device="meta", dtype=torch.float32, generation="chatglm3")
    method = build_method("full", {})
    method.setup(model)
    names = list(trainable_parameters(method, model))
    apply_checkpointing(model, checkpointing)
    net = LMLoss(model, OptimConfig().loss_chunk_tokens)
    sharded = info.world_size > 1
    if sharded:
        compute = None if precision == torch.float32 else precision
        fsdp.shard(net, model, info, compute_dtype=compute, offload=offload)
    random_fill(model, info.device, torch.float32)  # (sharded: each rank draws its shard only)
    named = dict(model.named_parameters())
    named = {n: named[n] for n in names}
    if compile:
        compile_blocks(model)
    optimizer = build_optimizer(named, OptimConfig(learning_rate=1e-5), info.device)
    autocast = torch.autocast(info.device.type, dtype=precision, enabled=precision != torch.float32)
    step_class = fsdp.ShardedTrainStep if sharded else TrainStep
    model.train()
    return step_class(net, list(named.values()), optimizer, info=info, autocast=autocast, max_grad_norm=1.0)


def batches(cfg: GLMConfig, info: distributed.DistInfo, *, rows: int, pack_length: int, n: int, seed: int):
    """This rank's packed batches of ``n`` steps, from the trainer's batcher (fixed shapes, as when compiled)."""
    from types import SimpleNamespace

    pool = adgen_examples(max(64, 2 * n * rows * info.world_size * pack_length // 120), vocab=cfg.padded_vocab_size,
                          seed=seed)  # fmt: skip
    batcher = make_batcher(pool, cfg=DataConfig(packing=True, pack_length=pack_length), batch_size=rows, grad_accum=1,
                           world_size=info.world_size, seed=seed, tokenizer=SimpleNamespace(pad_id=0),
                           template=get_template("chatglm3"), fixed_shapes=True)  # fmt: skip
    out, tokens = [], []
    for i in range(n):
        (units,) = batcher.step_units(i, info.rank)
        out.append(batcher.collate(units))
        tokens.append(useful_tokens(units))
    return out, tokens


def measure(args) -> dict:
    info = distributed.setup(args.device)
    try:
        cfg = model_config(args.tiny)
        precision = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
        n_params = non_embedding_params(build_model(cfg, device="meta"))
        data, tokens = batches(cfg, info, rows=args.rows, pack_length=args.pack_length,
                               n=args.warmup + args.steps + args.profile_steps, seed=args.seed)  # fmt: skip
        free_memory()
        t0 = time.perf_counter()
        step = build_step(cfg, info, precision=precision, checkpointing=args.checkpointing, compile=args.compile,
                          offload=args.offload)  # fmt: skip
        build_s = time.perf_counter() - t0
        losses = []
        t0 = time.perf_counter()
        timing = time_steps(lambda b: losses.append(step([b])), data, tokens, device=info.device, warmup=args.warmup,
                            steps=args.steps, profile_steps=args.profile_steps)  # fmt: skip
        run_s = time.perf_counter() - t0
        cuda = info.device.type == "cuda"
        mine = {"tokens_per_s": timing.useful_tokens_per_s, "step_ms": timing.step_ms, "gpu_busy": timing.gpu_busy,
                "peak_gib": torch.cuda.max_memory_allocated(info.device) / 2**30 if cuda else None}  # fmt: skip
        every = distributed.gather_objects(info, mine)
        first = losses[0].loss_sum / max(float(losses[0].targets), 1.0)
        last = losses[-1].loss_sum / max(float(losses[-1].targets), 1.0)
        per_gpu = sum(r["tokens_per_s"] for r in every) / len(every)
        peaks = [r["peak_gib"] for r in every if r["peak_gib"] is not None]
        busy = [r["gpu_busy"] for r in every if r["gpu_busy"] is not None]
        return {
            "gpus": info.world_size,
            "mode": "fsdp" if info.world_size > 1 else "single",
            "checkpointing": args.checkpointing,
            "compiled": args.compile,
            "offload": args.offload,
            "rows_x_length": f"{args.rows}x{args.pack_length}",
            "n_params": n_params,
            "useful_tokens_per_s_per_gpu": per_gpu,
            "useful_tokens_per_s_total": per_gpu * info.world_size,
            "mfu": mfu(6 * n_params, per_gpu, args.peak_tflops if cuda else None),
            "peak_gib_per_gpu": max(peaks) if peaks else None,
            "step_ms": max(r["step_ms"] for r in every),
            "gpu_busy": min(busy) if busy else None,
            "build_s": build_s,
            "run_s": run_s,
            "first_loss": float(first),
            "last_loss": float(last),
            "is_main": info.is_main,
        }
    finally:
        distributed.teardown(info, together=True)


SAME_SETTING = ("checkpointing", "compiled", "offload", "rows_x_length")


def combine(paths: list[Path]) -> dict:
    """The rows of several runs (1 GPU, 2 GPUs, ...) with the scaling of total throughput against the 1-GPU row of
    the same settings (none: no scaling)."""
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [{**r, "command": run["info"]["command"]} for run in runs for r in run["rows"]]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        base = next((b for b in ok if b["gpus"] == 1 and all(b[k] == r[k] for k in SAME_SETTING)), None)
        if base is not None:
            r["scaling"] = r["useful_tokens_per_s_total"] / base["useful_tokens_per_s_total"]
    info = {k: v for k, v in runs[0]["info"].items() if k != "command"}
    return {"info": info, "rows": rows}


COLUMNS = [
    ("GPUs", "gpus", ""), ("mode", "mode", ""), ("checkpointing", "checkpointing", ""), ("compiled", "compiled", ""),
    ("rows x length / GPU", "rows_x_length", ""), ("useful tok/s / GPU", "useful_tokens_per_s_per_gpu", ",.0f"),
    ("MFU (6N)", "mfu", ".1%"), ("peak GiB / GPU", "peak_gib_per_gpu", ".1f"), ("step ms", "step_ms", ".0f"),
    ("GPU busy", "gpu_busy", ".0%"), ("scaling", "scaling", ".2f"),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    shown = [r if "error" not in r else {**r, "mode": f"failed: {r['error'][:80]}"} for r in rows]
    return markdown_table(shown, COLUMNS)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--combine", nargs="+", type=Path, help="JSON files of earlier runs: write their table")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (the CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when there is a GPU, else cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--checkpointing", default="true", help="train.gradient_checkpointing: true, false, mlp, half")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="blocks eager (default: compiled)")
    ap.add_argument("--offload", action="store_true", help="train.fsdp_offload (shards and AdamW on the CPU)")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per GPU and step")
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile-steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="for MFU (H200 bf16 dense)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None, help="kept in the JSON (e.g. the glmtune commit measured)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.combine:
        result = combine(args.combine)
        if args.json:
            write_json(args.json, result)
            args.json.with_suffix(".md").write_text(table(result["rows"]) + "\n")
        print(table(result["rows"]))
        return result
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.checkpointing = {"true": True, "false": False}.get(args.checkpointing, args.checkpointing)
    try:
        row = measure(args)
    except Exception as e:  # the JSON says what failed (an OOM at 6B is a result too)
        log.exception("run failed")
        row = {"gpus": None, "mode": "?", "error": f"{type(e).__name__}: {e}"[:500],
               "is_main": os.environ.get("RANK", "0") == "0"}  # fmt: skip
    device = torch.cuda.get_device_name() if cuda else "cpu"  # (benchlib.device_info also imports transformers)
    info = {"device": device, "torch": torch.__version__, "precision": args.precision,
            "peak_tflops": args.peak_tflops, "tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
            "command": " ".join(sys.argv), "note": args.note}  # fmt: skip
    result = {"info": info, "rows": [row]}
    if row.pop("is_main"):
        if args.json:
            write_json(args.json, result)
        print(table(result["rows"]))
    return result


if __name__ == "__main__":
    main()
