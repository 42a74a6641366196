"""Where a decode step's GPU time goes: the top kernels of glmtune's decode step at one batch size.

Builds a ChatGLM3-6B-shaped model with random bf16 weights, runs the decode step as a CUDA graph (``--decode
graph``, what generation uses on CUDA), compiled then captured (``compiled``) or op by op (``eager``), with the
``--matvec`` path for one-row products, and prints the kernels by total CUDA time under ``torch.profiler`` over
``--steps`` steps (prefill included), the kernel time and launches per token, and the wall time per token.

    PYTHONPATH=src python3 bench/profile_decode.py --batch 1 --steps 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from benchlib import random_fill  # noqa: E402
from torch.profiler import ProfilerActivity, profile

from glmtune.generate import Decoder, GenerationConfig  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.config import preset  # noqa: E402


def kernel_profile(run: Callable[[], object], tokens: int) -> tuple[dict, profile]:
    """``run()`` under torch.profiler: its CUDA kernel time and launches per token over ``tokens`` tokens per row
    (whatever the run did, prefill included), and the profile."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    return {"kernel_ms_per_token": kernel_us / 1000 / tokens, "launches_per_token": launches / tokens}, prof


def top_kernels(prof: profile, rows: int, width: int = 80) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--decode", default="graph", choices=["graph", "compiled", "eager"])
    ap.add_argument("--matvec", default="auto", choices=["auto", "torch", "triton", "inductor"])
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    args = ap.parse_args()

    device = torch.device("cuda")
    model = build_model(preset(args.preset), device=device, dtype=torch.bfloat16, generation="chatglm3")
    random_fill(model, device, torch.bfloat16, seed=0)
    model.eval()
    prompts = torch.randint(10, 60000, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(model, decode=args.decode, matvec=args.matvec)
    n = args.steps + 1
    cfg = GenerationConfig(max_new_tokens=n)

    def run() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in decoder.stream(prompts.tolist(), cfg, stop_ids=[], pad_id=0):
            pass
        torch.cuda.synchronize()
        return time.perf_counter() - t

    t = time.perf_counter()
    run()  # capture, warm-up
    first = time.perf_counter() - t
    wall = run()
    summary, prof = kernel_profile(run, n)
    print(f"batch {args.batch}, decode={args.decode} matvec={decoder.matvec}: {n} tokens in {wall:.3f} s (prefill "
          f"included), {1000 * wall / n:.2f} ms a token; kernels {summary['kernel_ms_per_token']:.2f} ms and "
          f"{summary['launches_per_token']:.0f} launches a token; first run (warm-up, capture, compilation) "
          f"{first:.1f} s")  # fmt: skip
    print(top_kernels(prof, args.rows))


if __name__ == "__main__":
    main()
