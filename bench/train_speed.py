"""Training speed, glmtune against transformers' GlmForCausalLM + PEFT, on the same token batches in one process.

Settings (ChatGLM3-6B shape unless said; random weights drawn on the device; synthetic ADGEN-like samples: prompt
20-60 tokens, response 50-130, drawn from a fixed seed):
- adgen-lora: the ChatGLM3 official ADGEN LoRA recipe (r 8, alpha 32, dropout 0.1, query_key_value; transformers:
  q/k/v_proj), 4 samples per step. transformers with and without gradient checkpointing on padded batches;
  glmtune on the same padded batches, and packed as its recipe config does (rows of up to the longest sample,
  4 rows per step, so more samples per step).
- packed-4x1024-lora: the same LoRA on 4 rows of 1024 packed tokens: transformers eager and under torch.compile,
  glmtune eager and compiled (and compiled with flash's run bound = the row width, "compile-width", as before the
  collator's bound; "compile-recompute": ``train.loss_recompute: true``, the eager loss chunks recomputed in the
  backward, as before the compiled loss; the same for ADGEN packed, "packed-recompute"; "compile-inductor-swiglu"
  and ADGEN's "packed-inductor-swiglu": the MLPs' SwiGLU left to Inductor, as before compiled blocks took glmtune's
  fused SwiGLU ops; "compile-coordinate-descent", "compile-autotune": with those Inductor options;
  the K/V heads repeated for flash varlen (torch < 2.13), ``attention.KVRepeat``: compiled runs repeat them with
  glmtune's Triton ops by default (``compile_blocks``, ``models/repeat_kv.py``), "compile-kv-unfused" and ADGEN's
  "packed-kv-unfused" with expand + reshape, as before; "compile-kv-recomputed" and ADGEN's "packed-kv-recomputed" /
  "padded-kv-recomputed": ``train.recompute_kv`` (the recipe's example config sets it), the 2 grouped heads kept and
  repeated again in the backward; ADGEN's
  "packed-mlp-recomputed", "packed-mlp4", "packed-mlp8": ``train.gradient_checkpointing: mlp`` over every block, or
  the first 4 / 8 (``train.recompute_layers``): the memory options that keep CUDA graphs; "compile-lora-input-saved"
  and ADGEN's "packed-lora-input-saved": compiled LoRA keeps A's float32 input for the backward instead of recomputing
  it, as before ``LoraLinear.recompute_input``).
- adgen-ptuning: P-Tuning v2, pre_seq_len 128, 4 samples (glmtune only: no peer has it), padded and packed.
- full-1.5b: full fine-tuning of a ~1.5B-parameter ChatGLM-shaped model (24 layers, hidden 2048) on packed 4x1024
  (and with Inductor's SwiGLU, "inductor-swiglu").

Each run: ``--warmup`` steps (compilation happens there), ``--steps`` timed steps, ``--profile-steps`` under
torch.profiler. benchlib's docstring defines useful tokens, MFU, GPU busy and peak. Rows are written to ``--json``
after every run (a killed run keeps what it measured; compiled runs go last) and a markdown table next to it.

    PYTHONPATH=src python bench/train_speed.py --json bench/results/train_speed.json
    PYTHONPATH=src python bench/train_speed.py --runs 'adgen-lora/*' --steps 10   # a subset (glob on run ids)

glmtune's compiled runs replay the whole step as CUDA graphs (``train.cuda_graph``'s default; ``--cuda-graph off``
measures them without); every batch key is captured before the timed steps (``prepare_steps`` in the JSON).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from benchlib import (  # noqa: E402
    H200_BF16_PEAK_TFLOPS,
    adgen_examples,
    device_info,
    free_memory,
    markdown_table,
    mfu,
    non_embedding_params,
    time_steps,
    useful_tokens,
    write_json,
)
from step_glmtune import default_compile  # noqa: E402

from glmtune.data.collate import collate, collate_packed  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.attention import KVRepeat  # noqa: E402
from glmtune.models.config import GLMConfig, preset  # noqa: E402

log = logging.getLogger("train_speed")

LORA = {"rank": 8, "alpha": 32, "dropout": 0.1, "target_modules": "query_key_value"}
PTUNING = {"pre_seq_len": 128, "prefix_projection": False}
HF, GLMTUNE = "transformers+peft", "glmtune"
DESCENT = (("coordinate_descent_tuning", True),)  # Inductor tunes each kernel's launch configuration


@dataclass(frozen=True)
class Run:
    setting: str
    impl: str
    variant: str
    data: str  # "adgen-padded" | "adgen-packed" | "packed"
    method: str = "lora"
    model: str = "6b"  # "6b" | "1.5b"
    checkpointing: bool | str = False  # glmtune: train.gradient_checkpointing (true, mlp, half); transformers: bool
    recompute_layers: int | None = None  # glmtune: train.recompute_layers (the first N blocks of checkpointing)
    compile: bool | None = None  # None: the implementation's default (glmtune: train.compile's; transformers: off)
    cuda_graph: bool | None = None  # glmtune: None = train.cuda_graph's default (on when compiled on CUDA)
    run_bound: bool = True  # glmtune: False drops the collator's max_seqlen (flash bounds runs by the row width)
    loss_recompute: bool | None = None  # glmtune: None = train.loss_recompute's default (auto), or forced
    fused_swiglu: bool | None = None  # glmtune: the MLPs' SwiGLU as the fused ops; None = compile_blocks' default
    inductor: tuple[tuple[str, object], ...] = ()  # glmtune: Inductor options for compile_blocks (() = its default)
    kv_repeat: KVRepeat | None = None  # glmtune: the K/V repeat for flash varlen; None = compile_blocks' default
    lora_input_saved: bool = False  # glmtune: compiled LoRA keeps A's input (float32) instead of recomputing it
    recompute_kv: bool = False  # glmtune: train.recompute_kv (the K/V copies for flash recomputed in the backward)

    @property
    def id(self) -> str:
        return f"{self.setting}/{'hf' if self.impl == HF else 'glmtune'}-{self.variant}"


RUNS = [
    Run("adgen-lora", HF, "ckpt", "adgen-padded", checkpointing=True),
    Run("adgen-lora", HF, "eager", "adgen-padded"),
    Run("adgen-lora", GLMTUNE, "padded", "adgen-padded"),
    Run("adgen-lora", GLMTUNE, "packed", "adgen-packed"),
    Run("packed-4x1024-lora", HF, "eager", "packed"),
    Run("packed-4x1024-lora", HF, "compile", "packed", compile=True),
    Run("packed-4x1024-lora", GLMTUNE, "eager", "packed", compile=False),
    Run("packed-4x1024-lora", GLMTUNE, "compile", "packed", compile=True),
    Run("packed-4x1024-lora", GLMTUNE, "compile-width", "packed", compile=True, run_bound=False),
    Run("packed-4x1024-lora", GLMTUNE, "compile-recompute", "packed", compile=True, loss_recompute=True),
    Run("packed-4x1024-lora", GLMTUNE, "compile-inductor-swiglu", "packed", compile=True, fused_swiglu=False),
    Run("packed-4x1024-lora", GLMTUNE, "compile-coordinate-descent", "packed", compile=True, inductor=DESCENT),
    Run("packed-4x1024-lora", GLMTUNE, "compile-autotune", "packed", compile=True, inductor=(("max_autotune", True),)),
    Run("packed-4x1024-lora", GLMTUNE, "compile-kv-recomputed", "packed", compile=True, recompute_kv=True),
    Run("packed-4x1024-lora", GLMTUNE, "compile-kv-unfused", "packed", compile=True, kv_repeat=KVRepeat()),
    Run("packed-4x1024-lora", GLMTUNE, "compile-lora-input-saved", "packed", compile=True, lora_input_saved=True),
    Run("adgen-lora", GLMTUNE, "packed-recompute", "adgen-packed", loss_recompute=True),
    Run("adgen-lora", GLMTUNE, "packed-inductor-swiglu", "adgen-packed", fused_swiglu=False),
    Run("adgen-lora", GLMTUNE, "packed-mlp-recomputed", "adgen-packed", checkpointing="mlp"),  # the memory option
    Run("adgen-lora", GLMTUNE, "packed-mlp4", "adgen-packed", checkpointing="mlp", recompute_layers=4),
    Run("adgen-lora", GLMTUNE, "packed-mlp8", "adgen-packed", checkpointing="mlp", recompute_layers=8),
    # the K/V heads repeated for flash varlen (torch < 2.13) repeated again in the backward, not saved: the peak
    Run("adgen-lora", GLMTUNE, "packed-kv-recomputed", "adgen-packed", recompute_kv=True),
    Run("adgen-lora", GLMTUNE, "padded-kv-recomputed", "adgen-padded", recompute_kv=True),
    Run("adgen-lora", GLMTUNE, "packed-kv-unfused", "adgen-packed", kv_repeat=KVRepeat()),  # the repeat before
    Run("adgen-lora", GLMTUNE, "packed-lora-input-saved", "adgen-packed", lora_input_saved=True),
    Run("adgen-ptuning", GLMTUNE, "padded", "adgen-padded", method="ptuning"),
    Run("adgen-ptuning", GLMTUNE, "packed", "adgen-packed", method="ptuning"),
    Run("full-1.5b", GLMTUNE, "default", "packed", method="full", model="1.5b"),
    # full fine-tuning: dense_4h_to_h's weight gradient also reads silu(a) * g (saved, as Inductor saves it)
    Run("full-1.5b", GLMTUNE, "inductor-swiglu", "packed", method="full", model="1.5b", fused_swiglu=False),
    Run("full-1.5b", HF, "eager", "packed", method="full", model="1.5b"),
]


def model_config(name: str, tiny: bool) -> GLMConfig:
    """ChatGLM3-6B, or a ~1.5B model of the same family (24 layers, hidden 2048, 16 heads of 128, 2 KV groups)."""
    if tiny:
        return preset("tiny-chatglm3")
    cfg = preset("chatglm3-6b")
    if name == "1.5b":
        cfg = cfg.replace(num_layers=24, hidden_size=2048, ffn_hidden_size=6912, num_attention_heads=16)
    return cfg


@dataclass
class Batches:
    """The batches of ``n`` steps: the same samples for every implementation, each collated as its trainer does."""

    glmtune: list[dict]  # glmtune's Batcher.collate (its padding side, bucketed widths, fixed packed shapes)
    hf: list[dict]  # right-padded to the longest sample; packed rows to exactly pack_length (fixed shapes)
    tokens: list[int]  # useful tokens of each step
    samples: list[int]  # samples of each step


def make_batches(
    kind: str, examples, *, samples: int, rows: int, pack_length: int, n: int, seed: int, fixed_shapes: bool = False
) -> Batches:
    """Batches of data ``kind`` for ``n`` steps, in the order glmtune's trainer takes them from ``examples``.

    "adgen-padded": ``samples`` samples a step; "adgen-packed": ``rows`` rows of up to the longest sample (glmtune's
    default for the ADGEN recipe); "packed": ``rows`` rows of ``pack_length`` tokens."""
    from step_glmtune import glmtune_batcher

    packing = kind != "adgen-padded"
    if kind not in ("adgen-padded", "adgen-packed", "packed"):
        raise ValueError(f"unknown data kind {kind!r}")
    length = pack_length if kind == "packed" else None
    per = rows if packing else samples
    batcher = glmtune_batcher(list(examples), packing=packing, pack_length=length, batch_size=per, seed=seed,
                              fixed_shapes=fixed_shapes)  # fmt: skip
    out = Batches([], [], [], [])
    for i in range(n):
        (units,) = batcher.step_units(i, 0)
        out.glmtune.append(batcher.collate(units))
        if packing:
            out.hf.append(collate_packed(units, pad_id=0, pad_to=length))
        else:
            out.hf.append(collate(units, pad_id=0, pad_side="right"))
        out.tokens.append(useful_tokens(units))
        out.samples.append(sum(len(getattr(u, "examples", [u])) for u in units))
    return out


def build_step(run: Run, cfg: GLMConfig, device: torch.device, precision: torch.dtype):
    if run.impl == HF:
        from peer_hf import HFStep

        return HFStep(cfg, method=run.method, device=device, precision=precision, lora=LORA,
                      gradient_checkpointing=run.checkpointing, compile=run.compile)  # fmt: skip
    from step_glmtune import GlmtuneStep

    options = {"lora": LORA, "ptuning": PTUNING, "full": {}}[run.method]
    kw = {"cuda_graph": run.cuda_graph} if run.cuda_graph is not None else {}
    if run.loss_recompute is not None:
        kw["loss_recompute"] = run.loss_recompute
    if run.recompute_layers is not None:
        kw["recompute_layers"] = min(run.recompute_layers, cfg.num_layers)  # (--tiny models have 2 blocks)
    if run.fused_swiglu is not None:
        kw["fused_swiglu"] = run.fused_swiglu
    if run.inductor:
        kw["compile_options"] = dict(run.inductor)
    if run.kv_repeat is not None:
        kw["kv_repeat"] = run.kv_repeat
    if run.lora_input_saved:
        kw["lora_input_saved"] = True
    if run.recompute_kv:
        kw["recompute_kv"] = True
    return GlmtuneStep(cfg, method=run.method, options=options, device=device, precision=precision,
                       gradient_checkpointing=run.checkpointing, compile=run.compile, **kw)  # fmt: skip


def fixed_shapes(run: Run, device: torch.device) -> bool:
    """Whether ``run``'s batches get fixed shapes: glmtune's batcher makes them when its step is compiled (as the
    trainer does)."""
    return run.impl == GLMTUNE and (default_compile(device) if run.compile is None else run.compile)


def run_batches(run: Run, data: Batches) -> list[dict]:
    """The batches ``run`` trains on, before its step sees them: transformers' in its form; glmtune's as collated,
    without the collator's run bound where the run asks (flash's max_seqlen = the row width, as before the bound)."""
    from peer_hf import hf_batch

    if run.impl == HF:
        return [hf_batch(b, packed=run.data != "adgen-padded") for b in data.hf]
    if run.run_bound:
        return data.glmtune
    return [{k: v for k, v in b.items() if k != "max_seqlen"} for b in data.glmtune]


def measure(run: Run, cfg: GLMConfig, data: Batches, args, device: torch.device, precision: torch.dtype) -> dict:
    batches = run_batches(run, data)
    n_params = non_embedding_params(build_model(cfg, device="meta"))
    flops_per_token = (6 if run.method == "full" else 4) * n_params
    impl = "transformers" if (run.impl == HF and run.method == "full") else run.impl
    row = {"id": run.id, "setting": run.setting, "impl": impl, "variant": run.variant, "method": run.method,
           "n_params": n_params, "flops_per_token": flops_per_token}  # fmt: skip
    free_memory()
    t0 = time.perf_counter()
    step = build_step(run, cfg, device, precision)
    row["build_s"] = time.perf_counter() - t0
    if run.impl == GLMTUNE:
        batches = [step.trainer_batch(b) for b in batches]
    row["compiled"] = bool(getattr(step, "compile_mode", None)) if run.impl == GLMTUNE else bool(run.compile)
    if getattr(step, "compile_mode", None):
        row["compile_mode"] = step.compile_mode
    if run.impl == GLMTUNE:
        row["fused_swiglu_mlps"] = step.fused_swiglu_mlps
        row["kv_recomputed_attentions"] = getattr(step, "kv_recomputed_attentions", 0)
        row["kv_fused_repeats"] = getattr(step, "kv_fused_repeats", 0)
        row["lora_inputs_recomputed"] = getattr(step, "lora_inputs_recomputed", 0)
    if run.inductor:
        row["inductor_options"] = dict(run.inductor)
    row["cuda_graph"] = bool(getattr(step, "graphed", False))
    cuda = device.type == "cuda"
    peaks = [torch.cuda.max_memory_allocated(device) / 2**30] if cuda else []  # the model's build
    if row["cuda_graph"]:  # every batch key captured before timing (as compilation: warm-up)
        t0 = time.perf_counter()
        row["prepare_steps"] = step.prepare(batches[: args.warmup + args.steps + args.profile_steps])
        row["prepare_s"] = time.perf_counter() - t0
        # where the peak comes from: the eager first runs (with the compiles), the captures (each from a reset)
        row["peak_passes_gib"] = list(getattr(step, "pass_peaks_gib", []))
        row["peak_calls_gib"] = dict(getattr(step, "call_peaks_gib", {}))  # an eager call's, a capture's
        row["peak_call_memory_gib"] = dict(getattr(step, "peak_call_memory", {}))
        peaks += row["peak_passes_gib"]
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
    losses = []

    def one(batch):
        losses.append(step(batch))

    row["peak_build_gib"] = peaks[0] if cuda else None
    t0 = time.perf_counter()
    timing = time_steps(one, batches, data.tokens, device=device, warmup=args.warmup, steps=args.steps,
                        profile_steps=args.profile_steps, breakdown=kernel_summary)  # fmt: skip
    row["run_s"] = time.perf_counter() - t0
    timed = range(args.warmup, args.warmup + args.steps)
    row.update({
        "useful_tokens_per_s": timing.useful_tokens_per_s,
        "mfu": mfu(flops_per_token, timing.useful_tokens_per_s, args.peak_tflops if device.type == "cuda" else None),
        # the whole run's peak: the build, the preparing passes and the steps (timed and profiled)
        "peak_gib": max(peaks + [torch.cuda.max_memory_allocated(device) / 2**30]) if cuda else None,
        "peak_steps_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        # what the caching allocator holds during the steps: a CUDA graph's pool counts here, not as allocated
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "gpu_busy": timing.gpu_busy,
        "kernels_per_step": timing.kernels_per_step,
        "step_ms": timing.step_ms,
        "kernel_ms_per_step": timing.kernel_ms_per_step,
        "host_ms": timing.host_ms,
        "host_max_ms": timing.host_max_ms,
        "device_step_ms": timing.device_step_ms,
        **(timing.kernel_kinds or {}),
        "rows_per_step": batches[0]["input_ids"].shape[0],
        "mean_width": sum(batches[i]["input_ids"].shape[1] for i in timed) / len(timed),
        "samples_per_step": sum(data.samples[i] for i in timed) / len(timed),
        "useful_tokens_per_step": sum(data.tokens[i] for i in timed) / len(timed),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    })  # fmt: skip
    return row


def kernel_summary(events: list[dict], steps: int, top: int = 20) -> dict:
    """The profiled steps' kernels: ms per step by kind (bench/fsdp_speed.py's kinds; flash attention's forward
    and backward apart) and the ``top`` kernels by time (name, launches and ms per step)."""
    from fsdp_speed import kernel_breakdown

    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.get("name", "")[:120], [0, 0.0])
        entry[0] += 1
        entry[1] += float(e["dur"]) / 1e3
    flash_bwd = sum(ms for name, (_, ms) in by_name.items() if "flash" in name.lower() and "bwd" in name.lower())
    kinds = kernel_breakdown(events, steps)
    if "flash attention" in kinds:
        kinds["flash attention bwd"] = flash_bwd / steps
    tops = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    # the host's CUDA runtime/driver calls by time (where a step's host thread waits: a launch, a sync, an alloc)
    calls: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in e:
            entry = calls.setdefault(e.get("name", ""), [0, 0.0])
            entry[0] += 1
            entry[1] += float(e["dur"]) / 1e3
    host_calls = sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]

    def per_step(items):
        return [{"name": n, "per_step": c / steps, "ms": ms / steps} for n, (c, ms) in items]

    return {"kernel_kinds_ms": kinds, "top_kernels": per_step(tops), "host_calls": per_step(host_calls)}


COLUMNS = [
    ("setting", "setting", ""), ("impl", "impl", ""), ("variant", "variant", ""), ("compiled", "compiled", ""),
    ("CUDA graphs", "graphs", ""),
    ("rows x width", "shape", ""), ("samples/step", "samples_per_step", ".1f"),
    ("useful tok/s", "useful_tokens_per_s", ",.0f"), ("MFU", "mfu", ".1%"), ("step ms", "step_ms", ".1f"),
    ("GPU busy", "gpu_busy", ".0%"), ("kernels/step", "kernels_per_step", ",.0f"), ("peak GiB", "peak_gib", ".2f"),
    ("reserved GiB", "peak_reserved_gib", ".2f"),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    shown = []
    for r in rows:
        if "error" in r:
            shown.append({**r, "variant": f"{r['variant']} (failed: {r['error'][:80]})"})
        else:
            shown.append({**r, "shape": f"{r['rows_per_step']} x {r['mean_width']:.0f}",
                          "compiled": "yes" if r["compiled"] else "no",
                          "graphs": "yes" if r.get("cuda_graph") else "no"})  # fmt: skip
    return markdown_table(shown, COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["*"], help="globs on run ids (default: all): " +
                    ", ".join(r.id for r in RUNS))  # fmt: skip
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers+peft runs")
    ap.add_argument("--compile", choices=["default", "on", "off"], default="default",
                    help="glmtune runs of no fixed compile setting: train.compile's default, or forced")  # fmt: skip
    ap.add_argument("--cuda-graph", choices=["default", "on", "off"], default="default",
                    help="glmtune runs: train.cuda_graph's default (on when compiled on CUDA), or forced")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--pool", type=int, default=512, help="synthetic samples to draw batches from")
    ap.add_argument("--samples", type=int, default=4, help="samples per step (padded ADGEN batches)")
    ap.add_argument("--rows", type=int, default=4, help="rows per step (packed batches)")
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU smoke test)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS, help="for MFU (H200 bf16 dense)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None, help="kept in the JSON (e.g. the glmtune commit measured)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    default = "bf16" if device.type == "cuda" else "fp32"
    precision = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision or default]
    runs = [r for r in RUNS if any(fnmatch.fnmatch(r.id, g) for g in args.runs) and not (args.no_hf and r.impl == HF)]
    if not runs:
        ap.error(f"no run matches {args.runs}; runs: {', '.join(r.id for r in RUNS)}")
    info = {**device_info(device), "precision": str(precision), "peak_tflops": args.peak_tflops, "tiny": args.tiny,
            "warmup": args.warmup, "steps": args.steps, "profile_steps": args.profile_steps, "seed": args.seed,
            "command": " ".join(sys.argv), "note": args.note}  # fmt: skip
    n_batches = args.warmup + args.steps + args.profile_steps
    data_cache: dict[tuple, Batches] = {}
    rows: list[dict] = []
    order = {r.id: i for i, r in enumerate(RUNS)}
    if args.compile != "default":
        forced = args.compile == "on"
        runs = [replace(r, compile=forced) if r.impl == GLMTUNE and r.compile is None else r for r in runs]
    if args.cuda_graph != "default":
        runs = [replace(r, cuda_graph=args.cuda_graph == "on") if r.impl == GLMTUNE else r for r in runs]
    for run in sorted(runs, key=lambda r: r.compile is True):  # compiled runs last: the slowest to start
        cfg = model_config(run.model, args.tiny)
        fixed = fixed_shapes(run, device)
        key = (run.data, run.model, fixed)
        if key not in data_cache:
            pool = adgen_examples(args.pool, vocab=cfg.padded_vocab_size, seed=args.seed)
            data_cache[key] = make_batches(run.data, pool, samples=args.samples, rows=args.rows,
                                           pack_length=args.pack_length, n=n_batches, seed=args.seed,
                                           fixed_shapes=fixed)  # fmt: skip
        log.info("run %s", run.id)
        try:
            row = measure(run, cfg, data_cache[key], args, device, precision)
        except Exception as e:  # one failed run (OOM, a compile error, no transformers) must not lose the others
            log.exception("run %s failed", run.id)
            row = {"id": run.id, "setting": run.setting, "impl": run.impl, "variant": run.variant,
                   "error": f"{type(e).__name__}: {e}"[:500]}  # fmt: skip
        torch._dynamo.reset()  # compiled code of one run must not serve (or count against) the next
        free_memory()  # the run's model and optimizer went with measure()'s frame
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k not in ("setting", "impl", "variant")})
        rows.sort(key=lambda r: order[r["id"]])
        if args.json:  # after every run: a command cut short keeps its rows
            write_json(args.json, {"info": info, "rows": rows})
            args.json.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
