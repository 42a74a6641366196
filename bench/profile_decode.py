"""Where a decode step's GPU time goes: the top kernels of glmtune's decode step at one batch size.

Builds a ChatGLM3-6B-shaped model with random bf16 weights, runs the decode step as a CUDA graph (``--decode
graph``, what generation uses on CUDA) or op by op (``eager``), and prints the kernels by total CUDA time under
``torch.profiler`` over ``--steps`` steps, plus the step's wall time from CUDA events.

    PYTHONPATH=src python3 bench/profile_decode.py --batch 1 --steps 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import random_fill  # noqa: E402

from glmtune.generate import Decoder, GenerationConfig  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.config import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--decode", default="graph", choices=["graph", "eager"])
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    args = ap.parse_args()

    device = torch.device("cuda")
    model = build_model(preset(args.preset), device=device, dtype=torch.bfloat16, generation="chatglm3")
    random_fill(model, device, torch.bfloat16, seed=0)
    model.eval()
    prompts = torch.randint(10, 60000, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(model, decode=args.decode)
    n = args.steps + 1
    cfg = GenerationConfig(max_new_tokens=n)

    def run() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in decoder.stream(prompts.tolist(), cfg, stop_ids=[], pad_id=0):
            pass
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run()  # capture, warm-up
    wall = run()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
    print(f"batch {args.batch}, {args.decode}: {n} tokens in {wall:.3f} s (prefill included), "
          f"{1000 * wall / n:.2f} ms a token")  # fmt: skip
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=80))


if __name__ == "__main__":
    main()
