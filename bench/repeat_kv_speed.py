"""K and V heads repeated for flash varlen attention on a torch whose kernel takes no grouped heads (ChatGLM3-6B: 4 x
1024 packed tokens, 2 K/V heads of 128 repeated 16 times, bf16), forward and backward: glmtune's ops
(``glmtune.models.repeat_kv``) against ``expand`` + ``reshape`` eager and compiled by Inductor (what the compiled
blocks run without the ops).

Each variant repeats K and V: the forward (k, v (N, n_kv, d) -> (N, n_kv * g, d) each), the backward called on its
own (the two gradients (N, n_kv * g, d) -> their group sums (N, n_kv, d): the ops' backwards, the kernels with each
candidate configuration, and the sum autograd takes, eager and compiled) and forward + backward through autograd
(ms per layer), with the bytes each moves per second (forward: k, v read, the copies written; backward: the
gradients read, the sums written). On CUDA every time is a CUDA graph's replays (``glmtune.models.gemv.replay_ms``:
kernels without launch gaps, as a captured training step runs them). Errors: the largest difference from the
float32 reference (values and gradients).

Inductor's forward here is a copy kernel of its own; in the compiled blocks it is fused into the rotary kernel
(which the ops cannot join), so the ``inductor`` forward is an upper bound of what the step spends on it.

    PYTHONPATH=src python3 bench/repeat_kv_speed.py --json bench/results/repeat_kv_speed.json
    PYTHONPATH=src python3 bench/repeat_kv_speed.py --tokens 748   # an ADGEN step's tokens

On the CPU (``--device cpu``, tiny sizes) the compiled variant and the candidates are left out: a smoke test
(wall time, the ops take the torch reference there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from benchlib import device_info, fwd_bwd_row, fwd_bwd_table, op_bench_parser, run_op_bench  # noqa: E402

from glmtune.models import repeat_kv as rk  # noqa: E402

log = logging.getLogger("repeat_kv_speed")


def _torch_forward(groups: int) -> Callable:
    return lambda k, v: (rk.reference(k, groups), rk.reference(v, groups))


def _torch_backward(groups: int) -> Callable:
    return lambda dk, dv: (rk.reference_backward(dk, groups), rk.reference_backward(dv, groups))


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n, n_kv, d, groups = args.tokens, args.kv_heads, args.head_dim, args.groups
    gen = torch.Generator(device=device).manual_seed(args.seed)
    k, v = (torch.randn(n, n_kv, d, generator=gen, device=device).to(dtype) for _ in range(2))
    dk, dv = (torch.randn(n, n_kv * groups, d, generator=gen, device=device).to(dtype) for _ in range(2))
    ref = _torch_forward(groups)(k.float(), v.float())
    ref_grad = _torch_backward(groups)(dk.float(), dv.float())
    small = 2 * k.numel() * k.element_size()  # K and V, n_kv heads
    moved = small * (1 + groups)  # forward: read K, V, write g copies; backward: read the g copies, write the sums
    cuda = device.type == "cuda"
    compile_kw = {"fullgraph": True, "dynamic": False}
    variants: list[tuple[str, Callable, Callable]] = [  # (name, forward (k, v), backward (dk, dv) called on its own)
        ("torch", _torch_forward(groups), _torch_backward(groups)),
        ("glmtune::repeat_kv_pair", lambda a, b: rk.repeat_kv_pair(a, b, groups),
         lambda a, b: rk.repeat_kv_pair_backward(a, b, groups)),
        ("glmtune::repeat_kv x2", lambda a, b: (rk.repeat_kv(a, groups), rk.repeat_kv(b, groups)),
         lambda a, b: (rk.repeat_kv_backward(a, groups), rk.repeat_kv_backward(b, groups))),
    ]  # fmt: skip
    if cuda:
        variants.insert(1, ("inductor", torch.compile(_torch_forward(groups), **compile_kw),
                            torch.compile(_torch_backward(groups), **compile_kw)))  # fmt: skip
        for c in rk.CANDIDATES:
            variants.append((f"kernels block {c.block} warps {c.num_warps}",
                             lambda a, b, c=c: rk.fused_forward((a, b), groups, c),
                             lambda a, b, c=c: rk.fused_backward((a, b), groups, c)))  # fmt: skip
    rows = []
    for name, forward, backward in variants:
        kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()

        def fwd_bwd(forward=forward, kl=kl, vl=vl) -> None:
            torch.autograd.grad(forward(kl, vl), (kl, vl), (dk, dv))

        def errors(forward=forward, backward=backward) -> tuple[float, float]:
            outs, sums = forward(k, v), backward(dk, dv)
            return (max((o.float() - r).abs().max().item() for o, r in zip(outs, ref, strict=True)),
                    max((s.float() - r).abs().max().item() for s, r in zip(sums, ref_grad, strict=True)))  # fmt: skip

        rows.append(fwd_bwd_row(name, errors=errors, forward=lambda forward=forward: forward(k, v),
                                backward=lambda backward=backward: backward(dk, dv),
                                # the candidates have no autograd of their own
                                fwd_bwd=None if name.startswith("kernels") else fwd_bwd, fwd_bytes=moved,
                                bwd_bytes=moved, device=device, iters=args.iters))  # fmt: skip
    return {
        "shape": {"tokens": n, "kv_heads": n_kv, "head_dim": d, "groups": groups, "dtype": str(dtype)},
        "bytes": {"fwd": moved, "bwd": moved},
        "default": {"block": rk.DEFAULT.block, "num_warps": rk.DEFAULT.num_warps},
        "torch": torch.__version__,
        "device": device_info(device) if cuda else {"name": "cpu"},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = op_bench_parser(__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="N: 4 x 1024 packed (an ADGEN step: 748)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--groups", type=int, default=16, help="query heads per K/V head")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    return run_op_bench(p, argv, measure, fwd_bwd_table)


if __name__ == "__main__":
    main()
