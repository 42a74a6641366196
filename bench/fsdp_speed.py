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
    # sharding variants measured one after the other in one run (compiled once): keep = last block units kept
    # gathered from forward to backward, prefetch = units gathered ahead, units = blocks per FSDP unit,
    # ctas = NCCL's CTAs (SMs) per collective at most (0: NCCL's choice)
    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 bench/fsdp_speed.py --checkpointing false \
        --variant keep=0 --variant keep=1 --variant keep=1,prefetch=2 --json out/fsdp-variants.json
    # (sdpa=1: the compiled blocks attend through SDPA's dense masks rather than FlexAttention)

The profiled step is broken down by kernel kind (rank 0): matmuls, FlexAttention, compiled elementwise kernels,
the optimizer (fused AdamW) and gradient clipping, NCCL, FSDP's copies, and how much of NCCL's time no other kernel
overlapped ("exposed").
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
               compile: bool, offload: bool, sharding: dict | None = None):  # fmt: skip
    """The trainer's full fine-tuning step on a random model: sharded over the processes when there are several
    (``sharding``: :func:`glmtune.train.fsdp.shard`'s options, ``ctas`` for a process group of that many NCCL CTAs)."""
    model = build_model(cfg, device="meta", dtype=torch.float32, generation="chatglm3")
    method = build_method("full", {})
    method.setup(model)
    names = list(trainable_parameters(method, model))
    apply_checkpointing(model, checkpointing)
    options = dict(sharding or {})
    net = LMLoss(model, OptimConfig().loss_chunk_tokens, recompute=not options.pop("norecompute", 0))
    sharded = info.world_size > 1
    sdpa = options.pop("sdpa", 0)
    if sharded:
        compute = None if precision == torch.float32 else precision
        mesh = comm_mesh(info, options.pop("ctas", 0))
        fsdp.shard(net, model, info, compute_dtype=compute, offload=offload, mesh=mesh, **options)
    random_fill(model, info.device, torch.float32)  # (sharded: each rank draws its shard only)
    named = dict(model.named_parameters())
    named = {n: named[n] for n in names}
    if compile:
        compile_blocks(model)
        if sdpa:  # packed rows through SDPA's dense masks instead of FlexAttention's block masks
            model.set_attention_backend("sdpa")
    optimizer = build_optimizer(named, OptimConfig(learning_rate=1e-5), info.device)
    autocast = torch.autocast(info.device.type, dtype=precision, enabled=precision != torch.float32)
    step_class = fsdp.ShardedTrainStep if sharded else TrainStep
    model.train()
    return step_class(net, list(named.values()), optimizer, info=info, autocast=autocast, max_grad_norm=1.0)


VARIANT_KEYS = {
    "keep": "keep_gathered",
    "prefetch": "prefetch",
    "units": "blocks_per_unit",
    "ctas": "ctas",
    "sdpa": "sdpa",
    "norecompute": "norecompute",
}


def parse_variant(text: str) -> dict[str, int]:
    """``keep=1,prefetch=2,units=1,ctas=8`` -> shard options (unnamed ones: fsdp.shard's defaults, ctas 0);
    ``sdpa=1``: compiled blocks attend through SDPA rather than FlexAttention; ``norecompute=1``: the chunked loss
    keeps its logits for the backward instead of recomputing the output layer (``train.loss_recompute: false``)."""
    out = {"keep_gathered": fsdp.KEEP_GATHERED, "prefetch": fsdp.PREFETCH, "blocks_per_unit": fsdp.BLOCKS_PER_UNIT,
           "ctas": 0}  # fmt: skip
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS:
            raise ValueError(f"unknown variant key {key!r} in {text!r} (known: {', '.join(VARIANT_KEYS)})")
        out[VARIANT_KEYS[key]] = int(value)
    return out


def comm_mesh(info: distributed.DistInfo, ctas: int):
    """A device mesh over a new NCCL group whose collectives use at most ``ctas`` CTAs (0: None, the default
    group)."""
    if not ctas:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = ctas
    return DeviceMesh.from_group(dist.new_group(backend="nccl", pg_options=opts), info.device.type)


KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("nccl", ("nccl",)),
    ("optimizer", ("adam",)),
    ("clip/foreach", ("multi_tensor_apply", "foreach", "norm_kernel", "lpnorm")),
    ("flex attention", ("flex", "triton_tem")),
    ("flash attention", ("flash", "fmha")),  # varlen_attn on packed rows (masks' varlen form)
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "sm90")),
    ("loss", ("softmax", "nll_loss", "cross_entropy")),
    ("compiled elementwise", ("triton_",)),
    ("fsdp copies", ("chunk_cat", "split_with_sizes", "catarraybatched", "copy", "cast", "fill", "zero")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(spans: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of ``spans`` (disjoint, sorted) that ``cover`` (disjoint, sorted) covers."""
    total, j = 0.0, 0
    for a, b in spans:
        while j < len(cover) and cover[j][1] <= a:
            j += 1
        k = j
        while k < len(cover) and cover[k][0] < b:
            total += min(b, cover[k][1]) - max(a, cover[k][0])
            k += 1
    return total


def kernel_breakdown(events: list[dict], steps: int) -> dict[str, float]:
    """Milliseconds per step of each kernel kind (:data:`KINDS`), memcpy/memset, the span from the first kernel to
    the last, the time no kernel ran ("idle") and NCCL's time that no other kernel overlapped ("nccl exposed"),
    from a profiler's Chrome trace events."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not gpu:
        return {}
    out: dict[str, float] = {}
    spans = {"nccl": [], "other": []}
    for e in gpu:
        kind = kind_of(e.get("name", "")) if e["cat"] == "kernel" else "memcpy/memset"
        start, dur = float(e["ts"]), float(e["dur"])
        out[kind] = out.get(kind, 0.0) + dur
        spans["nccl" if kind == "nccl" else "other"].append((start, start + dur))
    busy = _union(spans["nccl"] + spans["other"])
    nccl, other = _union(spans["nccl"]), _union(spans["other"])
    out["span"] = busy[-1][1] - busy[0][0]
    out["idle"] = out["span"] - sum(b - a for a, b in busy)
    out["nccl exposed"] = sum(b - a for a, b in nccl) - _overlap(nccl, other)
    return {k: v / 1e3 / steps for k, v in sorted(out.items())}


def idle_gaps(events: list[dict], top: int = 6, min_ms: float = 0.5) -> list[dict]:
    """The ``top`` longest stretches (of at least ``min_ms``) in which no kernel ran: where (ms after the first
    kernel), how long, and the kernels on either side (where the GPU waited for the host, or for a peer)."""
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", "")) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)  # fmt: skip
    if not gpu:
        return []
    gaps, end, before = [], gpu[0][1], gpu[0][2]
    for start, stop, name in gpu[1:]:
        if start - end >= min_ms * 1e3:
            gaps.append({"at_ms": (end - gpu[0][0]) / 1e3, "ms": (start - end) / 1e3, "before": before[:80],
                         "after": name[:80]})  # fmt: skip
        if stop > end:
            end, before = stop, name
    return sorted(gaps, key=lambda g: -g["ms"])[:top]


def profile_step(run, device: torch.device, steps: int, trace: Path | None = None) -> tuple[dict, list[dict]]:
    """(:func:`kernel_breakdown`, :func:`idle_gaps`) of ``run()`` (``steps`` steps) under the profiler (CUDA
    kernels; with ``trace``, the host's operators too, and the Chrome trace written there, gzipped)."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace is not None else [])
    with profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        text = path.read_text()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_bytes(gzip.compress(text.encode()))
    events = json.loads(text).get("traceEvents", [])
    return kernel_breakdown(events, steps), idle_gaps(events)


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


def measure(args) -> list[dict]:
    """One row per sharding variant (``--variant``; one process: the plain path, one row)."""
    info = distributed.setup(args.device)
    try:
        cfg = model_config(args.tiny)
        precision = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
        n_params = non_embedding_params(build_model(cfg, device="meta"))
        data, tokens = batches(cfg, info, rows=args.rows, pack_length=args.pack_length,
                               n=args.warmup + args.steps + args.profile_steps, seed=args.seed)  # fmt: skip
        variants = [parse_variant(v) for v in args.variant or [""]] if info.world_size > 1 else [None]
        rows = []
        for sharding in variants:
            try:
                rows.append(measure_one(args, info, cfg, precision, n_params, data, tokens, sharding))
                if info.is_main:  # each row as it comes (a run stopped early keeps them in its log)
                    r = rows[-1]
                    kernels = {k: round(v, 2) for k, v in r["kernels_ms_rank0"].items()}
                    log.info("row %s: MFU %.4f, step %.1f ms, peak %.2f GiB, start %.2f GiB; ms/step %s",
                             sharding_text(sharding), r["mfu"] or 0.0, r["step_ms"], r["peak_gib_per_gpu"] or 0.0,
                             r["start_gib"] or 0.0, json.dumps(kernels))  # fmt: skip
                    for g in r["idle_gaps_rank0"]:
                        log.info("  idle %.1f ms at %.1f ms, after %s, before %s", g["ms"], g["at_ms"], g["before"],
                                 g["after"])  # fmt: skip
            except Exception as e:  # an OOM of one variant is a result too; the next one runs
                log.exception("variant %s failed", sharding)
                rows.append({"gpus": info.world_size, "mode": "?", "sharding": sharding, "is_main": info.is_main,
                             "error": f"{type(e).__name__}: {e}"[:500]})  # fmt: skip
            free_memory()
        return rows
    finally:
        distributed.teardown(info, together=True)


def measure_one(args, info, cfg, precision, n_params, data, tokens, sharding: dict | None) -> dict:
    free_memory()
    cuda = info.device.type == "cuda"
    start_gib = torch.cuda.memory_allocated(info.device) / 2**30 if cuda else None
    torch.manual_seed(args.seed)  # (DTensor's random ops draw from the default generators, not random_fill's)
    t0 = time.perf_counter()
    step = build_step(cfg, info, precision=precision, checkpointing=args.checkpointing, compile=args.compile,
                      offload=args.offload, sharding=sharding)  # fmt: skip
    build_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    kernels, gaps = {}, []
    timing = time_steps(lambda b: losses.append(step([b])), data, tokens, device=info.device,
                        warmup=args.warmup, steps=args.steps, profile_steps=0)  # fmt: skip
    run_s = time.perf_counter() - t0
    if cuda and args.profile_steps:
        first = args.warmup + args.steps
        trace = None
        if args.trace is not None and info.is_main:
            trace = args.trace / f"trace-{sharding_text(sharding).replace(', ', '_').replace(' ', '')}.json.gz"
        kernels, gaps = profile_step(lambda: [step([b]) for b in data[first : first + args.profile_steps]],
                                     info.device, args.profile_steps, trace)  # fmt: skip
    kernel_ms = sum(v for k, v in kernels.items() if k not in ("span", "idle", "nccl exposed")) or None
    mine = {"tokens_per_s": timing.useful_tokens_per_s, "step_ms": timing.step_ms,
            "gpu_busy": kernel_ms / timing.step_ms if kernel_ms else None,
            "peak_gib": torch.cuda.max_memory_allocated(info.device) / 2**30 if cuda else None}  # fmt: skip
    every = distributed.gather_objects(info, mine)
    first_loss = losses[0].loss_sum / max(float(losses[0].targets), 1.0)
    last_loss = losses[-1].loss_sum / max(float(losses[-1].targets), 1.0)
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
        "sharding": sharding,
        "n_params": n_params,
        "useful_tokens_per_s_per_gpu": per_gpu,
        "useful_tokens_per_s_total": per_gpu * info.world_size,
        "mfu": mfu(6 * n_params, per_gpu, args.peak_tflops if cuda else None),
        "peak_gib_per_gpu": max(peaks) if peaks else None,
        "step_ms": max(r["step_ms"] for r in every),
        "gpu_busy": min(busy) if busy else None,
        "kernels_ms_rank0": kernels,
        "idle_gaps_rank0": gaps,
        "start_gib": start_gib,
        "build_s": build_s,
        "run_s": run_s,
        "first_loss": float(first_loss),
        "last_loss": float(last_loss),
        "is_main": info.is_main,
    }


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
    ("GPU busy", "gpu_busy", ".0%"), ("scaling", "scaling", ".2f"), ("sharding", "sharding_text", ""),
]  # fmt: skip


def sharding_text(sharding: dict | None) -> str:
    """``keep 1, prefetch 1, 1 block/unit`` (with ``, 8 CTAs`` when NCCL's CTAs were limited); ``-`` for none."""
    if not sharding:
        return "-"
    text = (f"keep {sharding['keep_gathered']}, prefetch {sharding['prefetch']}, "
            f"{sharding['blocks_per_unit']} block/unit")  # fmt: skip
    text += f", {sharding['ctas']} CTAs" if sharding.get("ctas") else ""
    text += ", SDPA" if sharding.get("sdpa") else ""
    return text + (", loss not recomputed" if sharding.get("norecompute") else "")


def table(rows: list[dict]) -> str:
    shown = [{**r, "sharding_text": sharding_text(r.get("sharding"))} for r in rows]
    shown = [r if "error" not in r else {**r, "mode": f"failed: {r['error'][:80]}"} for r in shown]
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
    ap.add_argument("--variant", action="append", default=None,
                    help="sharding options measured in turn in this run, e.g. keep=1,prefetch=2,units=1,ctas=8 "
                         "(unnamed: fsdp.shard's defaults); default: one run with the defaults")  # fmt: skip
    ap.add_argument("--rows", type=int, default=4, help="packed rows per GPU and step")
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile-steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="for MFU (H200 bf16 dense)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--trace", type=Path, default=None, help="folder: rank 0's profiled step as a gzipped Chrome "
                    "trace per variant (host operators too)")  # fmt: skip
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
        rows = measure(args)
    except Exception as e:  # the JSON says what failed (an OOM at 6B is a result too)
        log.exception("run failed")
        rows = [{"gpus": None, "mode": "?", "error": f"{type(e).__name__}: {e}"[:500],
                 "is_main": os.environ.get("RANK", "0") == "0"}]  # fmt: skip
    device = torch.cuda.get_device_name() if cuda else "cpu"  # (benchlib.device_info also imports transformers)
    info = {"device": device, "torch": torch.__version__, "precision": args.precision,
            "peak_tflops": args.peak_tflops, "tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
            "command": " ".join(sys.argv), "note": args.note}  # fmt: skip
    is_main = all([r.pop("is_main") for r in rows])
    result = {"info": info, "rows": rows}
    if is_main:
        if args.json:
            write_json(args.json, result)
        print(table(result["rows"]))
        for r in rows:
            if r.get("kernels_ms_rank0"):
                print(sharding_text(r.get("sharding")), "ms/step:",
                      ", ".join(f"{k} {v:.1f}" for k, v in r["kernels_ms_rank0"].items()))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
