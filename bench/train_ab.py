"""Two runs of bench/train_speed.py interleaved in one process: a ratio that the machine's drift cannot tip.

train_speed.py times one run after the other; on the shared machines a step's GPU time drifts by up to ~10 % within
a minute (bench/RESULTS.md, fifth session), so a ratio from 8 steps of each moves by about 1 %. Here both steps are
built, warmed up and captured first, then timed in ``--rounds`` rounds of ``--steps`` steps each, alternating which
goes first (A B, B A, ...): each round's ratio compares neighbours in time. The JSON has every round; the table the
median step of each run, the ratio of the medians and the rounds' smallest and largest ratio.

    PYTHONPATH=src python bench/train_ab.py --a packed-4x1024-lora/hf-compile --b packed-4x1024-lora/glmtune-compile
    PYTHONPATH=src python bench/train_ab.py --a packed-4x1024-lora/glmtune-compile \\
        --b packed-4x1024-lora/glmtune-compile-kv-unfused --rounds 8 --json bench/results/train_ab.json

Both runs must train on the same data kind (the same token batches, each collated as its trainer does).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import adgen_examples, device_info, markdown_table, sync, write_json
from train_speed import GLMTUNE, RUNS, Run, build_step, fixed_shapes, make_batches, model_config, run_batches

log = logging.getLogger("train_ab")


def _run(run_id: str) -> Run:
    for run in RUNS:
        if run.id == run_id:
            return run
    raise SystemExit(f"no run {run_id!r}; runs: {', '.join(r.id for r in RUNS)}")


def _steps_of(run: Run, cfg, data, device: torch.device, precision: torch.dtype):
    """(step, its batches) of ``run``: the step built, and the batches as its trainer hands them over."""
    step = build_step(run, cfg, device, precision)
    batches = run_batches(run, data)
    return step, [step.trainer_batch(b) for b in batches] if run.impl == GLMTUNE else batches


def _timed(step, batches: list, first: int, n: int, device: torch.device) -> float:
    """Mean wall milliseconds of ``n`` steps on ``batches[first:]`` (cycled), from a synchronised start to a
    synchronised end."""
    sync(device)
    start = time.perf_counter()
    for i in range(first, first + n):
        step(batches[i % len(batches)])
    sync(device)
    return 1e3 * (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the baseline run id (train_speed.py's ids)")
    ap.add_argument("--b", required=True, help="the run compared with it")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="steps of each run a round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    ap.add_argument("--pool", type=int, default=512)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = _run(args.a), _run(args.b)
    if runs[0].data != runs[1].data or runs[0].model != runs[1].model:
        raise SystemExit(f"{args.a} and {args.b} train on different data or models: nothing to compare")
    cfg = model_config(runs[0].model, args.tiny)
    pool = adgen_examples(args.pool, vocab=cfg.padded_vocab_size, seed=args.seed)
    built = []
    for run in runs:
        data = make_batches(
            run.data,
            pool,
            samples=args.samples,
            rows=args.rows,
            pack_length=args.pack_length,
            n=args.batches,
            seed=args.seed,
            fixed_shapes=fixed_shapes(run, device),
        )  # (same samples)
        log.info("building %s", run.id)
        step, batches = _steps_of(run, cfg, data, device, precision)
        if getattr(step, "graphed", False):
            step.prepare(batches)  # every batch key captured before timing
        for i in range(max(args.warmup, 1)):
            step(batches[i % len(batches)])
        built.append((step, batches, data.tokens))
    rounds = []
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        ms = [0.0, 0.0]
        for k in order:
            step, batches, _ = built[k]
            ms[k] = _timed(step, batches, r * args.steps, args.steps, device)
        rounds.append({"a_ms": ms[0], "b_ms": ms[1], "ratio": ms[0] / ms[1], "first": "a" if order[0] == 0 else "b"})
        log.info("round %d: a %.2f ms, b %.2f ms, a/b %.4f", r, ms[0], ms[1], ms[0] / ms[1])
    a_ms = statistics.median(x["a_ms"] for x in rounds)
    b_ms = statistics.median(x["b_ms"] for x in rounds)
    ratios = [x["ratio"] for x in rounds]
    tokens = statistics.mean(built[0][2])  # (the same samples for both: useful tokens a step)
    summary = {
        "a": args.a, "b": args.b, "a_step_ms": a_ms, "b_step_ms": b_ms, "a_over_b": a_ms / b_ms,
        "round_ratio_min": min(ratios), "round_ratio_median": statistics.median(ratios), "round_ratio_max": max(ratios),
        "a_useful_tokens_per_s": 1e3 * tokens / a_ms, "b_useful_tokens_per_s": 1e3 * tokens / b_ms,
    }  # fmt: skip
    info = {**device_info(device), "precision": str(precision), "tiny": args.tiny, "rounds": args.rounds,
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "command": " ".join(sys.argv),
            "note": args.note}  # fmt: skip
    out = {"info": info, "summary": summary, "rounds": rounds}
    columns = [("A", "a", ""), ("B", "b", ""), ("A step ms", "a_step_ms", ".1f"), ("B step ms", "b_step_ms", ".1f"),
               ("A / B", "a_over_b", ".4f"), ("rounds' min", "round_ratio_min", ".4f"),
               ("rounds' max", "round_ratio_max", ".4f")]  # fmt: skip
    table = markdown_table([summary], columns)
    if args.json:
        write_json(args.json, out)
        args.json.with_suffix(".md").write_text(table + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
