"""Training over a frozen quantized base (issue 12): peak GPU memory and useful tok/s of glmtune's real training step
(``step_glmtune.GlmtuneStep``: the trainer's LMLoss, trainable_parameters, optimizer and TrainStep) on a
ChatGLM3-6B-shaped model with random weights, synthetic ADGEN samples (prompt 20-60 tokens, response 50-130).

Runs (each with gradient checkpointing unless ``--no-gradient-checkpointing``):
- ptuning-int4: P-Tuning v2 (pre_seq_len 128) over THUDM's INT4 base, 1 sample a step (target: peak <= 7 GiB).
- qlora-nf4: LoRA r 8, alpha 32, dropout 0.1 on query_key_value over an NF4 base (torchao's NF4 with double
  quantization), 4 samples a step (target: peak <= 7 GiB).
- lora-bf16: the same LoRA over the bf16 base on the same batches: qlora-nf4's useful tok/s / this one's is the
  QLoRA speed ratio (target >= 0.6).

The quantized model is built block by block on the device: each block is drawn in bf16 (benchlib.random_fill's
N(0, 0.02)), its four linears quantized (the same ``QuantizedLinear`` / ``NF4Linear`` a checkpoint loads into) and
the bf16 copies dropped, so the whole bf16 model never exists; ``peak_build_gib`` is the peak of that build,
``peak_train_gib`` the peak of the training steps (model + optimizer + activations), both from
``torch.cuda.max_memory_allocated`` (``peak_reserved_gib``: the caching allocator's). Rows go to ``--json`` after
every run; a run that fails records its error and the next one runs.

    PYTHONPATH=src python3 bench/quant_train.py --json bench/results/quant_train.json
    PYTHONPATH=src python3 bench/quant_train.py --tiny --device cpu       # smoke test (tests/test_quant_bench.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import adgen_examples, device_info, free_memory, markdown_table, random_fill, time_steps, write_json  # noqa: E402,I001
from torch import nn
from train_speed import make_batches  # noqa: E402

from glmtune.models import build_model  # noqa: E402
from glmtune.models.config import GLMConfig, preset  # noqa: E402
from glmtune.models.nf4 import NF4Linear  # noqa: E402
from glmtune.models.quant import QUANTIZED_LINEARS, QuantizedLinear  # noqa: E402

log = logging.getLogger("quant_train")

GIB = 2**30
LORA = {"rank": 8, "alpha": 32, "dropout": 0.1, "target_modules": "query_key_value"}
PTUNING = {"pre_seq_len": 128, "prefix_projection": False}
# hidden 256: NF4's groups of 64 x 256 values fit every block linear (the tiny preset's hidden 64 does not)
TINY = {"hidden_size": 256, "ffn_hidden_size": 512, "num_attention_heads": 4, "kv_channels": 64}


@dataclass(frozen=True)
class Run:
    id: str
    method: str
    quantize: str  # none, int4, int8, nf4
    samples: int  # ADGEN samples a step
    target_gib: float | None = None


RUNS = [
    Run("ptuning-int4", "ptuning", "int4", 1, target_gib=7.0),
    Run("qlora-nf4", "lora", "nf4", 4, target_gib=7.0),
    Run("lora-bf16", "lora", "none", 4),
]


def model_config(tiny: bool) -> GLMConfig:
    return preset("tiny-chatglm3").replace(**TINY) if tiny else preset("chatglm3-6b")


def _quantized(linear: nn.Linear, quantize: str) -> nn.Module:
    if quantize == "nf4":
        return NF4Linear.from_linear(linear)
    return QuantizedLinear.from_linear(linear, int(quantize[3:]))


@torch.no_grad()
def build_quantized_model(cfg: GLMConfig, quantize: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model with random weights, its block linears in ``quantize``, built one block at a time on ``device``."""
    model = build_model(cfg, device="meta", dtype=dtype, generation="chatglm3")
    encoder = model.transformer.encoder
    blocks, encoder.layers = encoder.layers, nn.ModuleList()
    random_fill(model, device, dtype)  # everything but the blocks: embeddings, norms, output layer, rotary
    encoder.layers = blocks
    for i, block in enumerate(blocks):
        random_fill(block, device, dtype, seed=1 + i)
        if quantize != "none":
            for module in list(block.modules()):
                for name, child in list(module.named_children()):
                    if name in QUANTIZED_LINEARS and isinstance(child, nn.Linear):
                        setattr(module, name, _quantized(child, quantize))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model


def measure(run: Run, cfg: GLMConfig, pool, args, device: torch.device, dtype: torch.dtype) -> dict:
    from step_glmtune import GlmtuneStep

    free_memory()
    start = time.perf_counter()
    model = build_quantized_model(cfg, run.quantize, device, dtype)
    row = {"run": run.id, "method": run.method, "quantize": run.quantize, "samples_per_step": run.samples,
           "build_s": time.perf_counter() - start}  # fmt: skip
    if device.type == "cuda":
        row["peak_build_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["model_gib"] = torch.cuda.memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    options = LORA if run.method == "lora" else PTUNING
    step = GlmtuneStep(cfg, method=run.method, options=options, device=device, precision=dtype, model=model,
                       gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)  # fmt: skip
    data = make_batches("adgen-padded", pool, samples=run.samples, rows=run.samples, pack_length=0, n=args.batches,
                        seed=args.seed, fixed_shapes=bool(step.compile_mode))  # fmt: skip
    losses: list[float] = []

    def one(batch):
        losses.append(step(batch))

    timing = time_steps(one, data.glmtune, data.tokens, device=device, warmup=args.warmup, steps=args.steps,
                        profile_steps=0)  # fmt: skip
    row.update(step_ms=timing.step_ms, useful_tok_s=timing.useful_tokens_per_s, compile=step.compile_mode or "eager",
               gradient_checkpointing=args.gradient_checkpointing,
               loss_first=float(losses[0]), loss_last=float(losses[-1]))  # fmt: skip
    if device.type == "cuda":
        row["peak_train_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        if run.target_gib is not None:
            row["target_gib"] = run.target_gib
            row["within_target"] = row["peak_train_gib"] <= run.target_gib
    return row  # the model and optimizer go with ``step``; the next run frees their memory first


def table(rows: list[dict]) -> str:
    return markdown_table(rows, [
        ("run", "run", ""), ("samples/step", "samples_per_step", "d"), ("step ms", "step_ms", ".1f"),
        ("useful tok/s", "useful_tok_s", ",.0f"), ("vs bf16 LoRA", "vs_bf16_lora", ".2f"),
        ("model GiB", "model_gib", ".2f"), ("build peak GiB", "peak_build_gib", ".2f"),
        ("train peak GiB", "peak_train_gib", ".2f"), ("target GiB", "target_gib", ".1f"), ("error", "error", ""),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 256, 2 layers): a CPU smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", default=",".join(r.id for r in RUNS), help="comma-separated run ids")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batches", type=int, default=16, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                   help="torch.compile the blocks as train.compile does (auto: the trainer's default, on CUDA); off "
                   "by default: compiling a 6B model's shapes costs more than this benchmark's budget")  # fmt: skip
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--json", type=Path, help="write the rows here (after every run) and a .md table beside it")
    args = p.parse_args(argv)
    args.compile = {"auto": None, "on": True, "off": False}[args.compile]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(args.tiny)
    pool = adgen_examples(max(64, 4 * args.batches), vocab=cfg.padded_vocab_size, seed=args.seed)
    wanted = [r for r in RUNS if r.id in args.runs.split(",")]
    if not wanted:
        raise SystemExit(f"--runs {args.runs}: no such run; choose from {', '.join(r.id for r in RUNS)}")
    rows: list[dict] = []
    out = {"info": {**device_info(device), "model": "tiny" if args.tiny else "chatglm3-6b", "argv": argv or sys.argv},
           "rows": rows}  # fmt: skip
    for run in wanted:
        log.info("run %s", run.id)
        try:
            rows.append(measure(run, cfg, pool, args, device, dtype))
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            log.exception("run %s failed", run.id)
            free_memory()
            rows.append({"run": run.id, "error": f"{type(e).__name__}: {e}"[:300]})
        bf16 = next((r for r in rows if r["run"] == "lora-bf16" and "useful_tok_s" in r), None)
        for r in rows:
            if bf16 is not None and r.get("method") == "lora" and "useful_tok_s" in r:
                r["vs_bf16_lora"] = r["useful_tok_s"] / bf16["useful_tok_s"]
        if args.json:
            write_json(args.json, out)
            args.json.with_suffix(".md").write_text(table(rows) + "\n")
        log.info("%s", rows[-1])
    print(table(rows))  # noqa: T201 - the benchmark's report
    return rows


if __name__ == "__main__":
    main()
