"""SDPA forward+backward time for the attention masks training uses: causal (no mask), a boolean padding/packing
mask broadcast over heads, the same as an additive float mask, and with the key length padded to a multiple of 8.

    PYTHONPATH=src python3 bench/sdpa_masks.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def measure(b: int, t: int, h: int = 32, d: int = 128) -> dict[str, float]:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    seg = torch.randint(0, 3, (b, t), device=dev).sort(-1).values  # three packed samples per row
    causal = torch.ones(t, t, device=dev, dtype=torch.bool).tril()
    bool_mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (b, 1, t, t)
    float_mask = torch.zeros(b, 1, t, t, device=dev, dtype=dt).masked_fill(~bool_mask, float("-inf"))

    def run(**kw) -> None:
        F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()

    return {
        "is_causal": bench(lambda: run(is_causal=True)),
        "bool mask (b,1,t,t)": bench(lambda: run(attn_mask=bool_mask)),
        "float mask (b,1,t,t)": bench(lambda: run(attn_mask=float_mask)),
        "bool mask expanded (b,h,t,t)": bench(lambda: run(attn_mask=bool_mask.expand(b, h, t, t))),
    }


def main() -> None:
    for b, t in [(8, 200), (32, 400), (32, 401)]:
        for name, ms in measure(b, t).items():
            print(f"b={b} t={t} {name:30s} {ms:8.3f} ms fwd+bwd", flush=True)


if __name__ == "__main__":
    main()
