"""Where a decode step's GPU time goes: the top kernels of glmtune's decode step at one batch size.

Builds a ChatGLM3-6B-shaped model with random bf16 weights, runs the decode step as a CUDA graph (``--decode
graph``, what generation uses on CUDA), compiled then captured (``compiled``) or op by op (``eager``), with the
``--matvec`` path for one-row products and the ``--attention`` path over the cache, and prints the kernels by total
CUDA time under ``torch.profiler`` over ``--steps`` steps (prefill included), the kernel time and launches per token,
and the wall time per token.

``--kernels``: instead, the decode step's kernels alone, each timed as CUDA-graph replays (no launch gaps): the
attention over the cache (ChatGLM3's 2 KV heads x 16 folded queries, d 128) by SDPA and by the Triton kernel at
several split settings, batch and cache lengths; the matrix-vector kernel on the five ChatGLM3 linears with each
candidate block shape (and ``EXTRA_MATVEC``), over weight copies larger than the L2 cache.

    PYTHONPATH=src python3 bench/profile_decode.py --batch 1 --steps 32
    PYTHONPATH=src python3 bench/profile_decode.py --kernels --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

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


def graph_us(calls: list[Callable[[], object]]) -> float:
    """Median µs per call of ``calls`` captured in turn in one CUDA graph (``gemv.replay_ms``)."""
    from glmtune.models.gemv import replay_ms

    return 1e3 * replay_ms(calls, replays=50)


def attention_kernels(layers: int = 28) -> list[dict]:
    """SDPA against the Triton decode attention at several splits: ``layers`` calls on distinct caches a graph."""
    from glmtune.models import decode_attention as da

    configs = {"one program a head": da.DecodeAttentionConfig(programs=1)}
    for programs in (32, 64, 128, 256):
        for block_t in (32, 64):
            configs[f"{programs} programs, block_t {block_t}"] = da.DecodeAttentionConfig(block_t, block_t, programs)
    rows = [_attention_row(b, t, layers, configs) for b in (1, 8, 32) for t in (384, 1024)]
    return rows


def _attention_row(b: int, t: int, layers: int, configs: dict) -> dict:
    import torch.nn.functional as F

    from glmtune.models import decode_attention as da

    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(layers, b, 2, 16, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(layers, 2, b, 2, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.ones(b, 1, 16, t, device="cuda", dtype=torch.bool)
    mask[..., t - t // 3 :] = False  # the last third of the slots not written yet
    ref = F.scaled_dot_product_attention(q[0], kv[0, 0], kv[0, 1], attn_mask=mask).float()
    sdpa = [lambda i=i: F.scaled_dot_product_attention(q[i], kv[i, 0], kv[i, 1], attn_mask=mask) for i in range(layers)]
    row = {"batch": b, "keys": t, "sdpa_us": graph_us(sdpa)}
    for name, c in configs.items():
        out = da.attention(q[0], kv[0, 0], kv[0, 1], mask, config=c).float()
        calls = [lambda i=i, c=c: da.attention(q[i], kv[i, 0], kv[i, 1], mask, config=c) for i in range(layers)]
        row[name] = {"us": graph_us(calls), "rel_err": ((out - ref).norm() / ref.norm()).item(),
                     "splits": da.splits_for(b, 2, t, c)[1]}  # fmt: skip
    best = min(configs, key=lambda n: row[n]["us"])
    times = ", ".join(f"{n}: {row[n]['us']:.2f}" for n in configs)
    print(f"attention b={b} t={t}: sdpa {row['sdpa_us']:.2f} us; {times}; best {best}", flush=True)
    return row


# block shapes timed beside gemv.CANDIDATES (smaller programs for the small linears)
EXTRA_MATVEC = ((1, 1024, 4), (1, 2048, 8), (1, 512, 2), (2, 2048, 8), (2, 512, 4), (4, 256, 2), (2, 1024, 4, 4),
                (2, 1024, 2), (1, 1024, 2), (4, 2048, 8))  # fmt: skip
CHATGLM3_LINEARS = {"qkv": (4608, 4096, True), "dense": (4096, 4096, False), "h_to_4h": (27392, 4096, False),
                    "4h_to_h": (4096, 13696, False), "output": (65024, 4096, False)}  # fmt: skip


def matvec_kernels() -> list[dict]:
    """Each candidate block shape on ChatGLM3-6B's linears, over enough weight copies to miss the L2 cache."""
    from glmtune.models import gemv

    configs = list(gemv.CANDIDATES) + [gemv.MatvecConfig(*c) for c in EXTRA_MATVEC]
    return [_matvec_row(name, *shape, configs) for name, shape in CHATGLM3_LINEARS.items()]


def _matvec_row(name: str, n: int, k: int, bias: bool, configs: list, min_bytes: float = 256e6) -> dict:
    from glmtune.models import gemv

    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, int(min_bytes // (n * k * 2))))]
    bs = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    row = {"linear": name, "out": n, "in": k, "tuned": str(gemv.tune(x, ws[0], bs))}
    for c in configs:
        row[str(c)] = graph_us([lambda w=w, c=c: gemv.launch(x, w, bs, c) for w in ws])
    row["cublas"] = graph_us([lambda w=w: torch.nn.functional.linear(x, w, bs) for w in ws])
    best = min((str(c) for c in configs), key=row.__getitem__)
    print(f"matvec {name}: tuned {row['tuned']} {row[row['tuned']]:.2f} us; best {best} {row[best]:.2f} us "
          f"({n * k * 2 / row[best] / 1e6:.2f} TB/s); cublas {row['cublas']:.2f} us", flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--decode", default="graph", choices=["graph", "compiled", "eager"])
    ap.add_argument("--matvec", default="auto", choices=["auto", "torch", "triton", "inductor"])
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton"])
    ap.add_argument("--kernels", action="store_true", help="time the attention and matvec kernels alone")
    ap.add_argument("--json", type=Path, default=None, help="--kernels: where to write the timings")
    ap.add_argument("--rows", type=int, default=25, help="kernels to list")
    args = ap.parse_args()
    if args.kernels:
        result = {"attention": attention_kernels(), "matvec": matvec_kernels()}
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return

    device = torch.device("cuda")
    model = build_model(preset(args.preset), device=device, dtype=torch.bfloat16, generation="chatglm3")
    random_fill(model, device, torch.bfloat16, seed=0)
    model.eval()
    prompts = torch.randint(10, 60000, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    decoder = Decoder(model, decode=args.decode, matvec=args.matvec, attention=args.attention)
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
    print(f"batch {args.batch}, decode={args.decode} matvec={decoder.matvec} attention={decoder.attention}: {n} "
          f"tokens in {wall:.3f} s (prefill "
          f"included), {1000 * wall / n:.2f} ms a token; kernels {summary['kernel_ms_per_token']:.2f} ms and "
          f"{summary['launches_per_token']:.0f} launches a token; first run (warm-up, capture, compilation) "
          f"{first:.1f} s")  # fmt: skip
    print(top_kernels(prof, args.rows))


if __name__ == "__main__":
    main()
