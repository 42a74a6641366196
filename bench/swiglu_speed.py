"""SwiGLU of ChatGLM3-6B's MLP (silu(a) * g for ag = [a | g], 4 x 1024 tokens x 2 x 13696 bf16) forward and
backward: glmtune's fused ops (``glmtune.models.swiglu``) against the torch expressions eager and compiled by
Inductor (what the compiled blocks run without the ops).

Each variant: the forward (ag -> out), the backward called on its own (ag, grad -> [da | dg]: the op's backward, the
kernels with each candidate configuration, and the reference backward formula eager and compiled) and forward +
backward through autograd (ms per layer), with the bytes each moves per second (forward: ag read, out written;
backward: ag and grad read, [da | dg] written). On CUDA every time is a CUDA graph's replays
(``glmtune.models.gemv.replay_ms``: kernels without launch gaps, as a captured training step runs them); the
tensors are larger than the L2 cache, so they stream from memory as in a step. Errors: the largest difference from
the float32 reference (values and gradients).

    PYTHONPATH=src python3 bench/swiglu_speed.py --json bench/results/swiglu_speed.json

On the CPU (``--device cpu``, tiny sizes) the compiled variant and the candidates are left out: a smoke test
(wall time, the ops take the torch reference there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from benchlib import device_info, fwd_bwd_row, fwd_bwd_table, op_bench_parser, run_op_bench  # noqa: E402

from glmtune.models import swiglu as sw  # noqa: E402

log = logging.getLogger("swiglu_speed")


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator(device=device).manual_seed(args.seed)
    ag = (torch.randn(args.rows, 2 * args.ffn, generator=g, device=device) * 2).to(dtype)
    grad = torch.randn(args.rows, args.ffn, generator=g, device=device).to(dtype)
    x = ag.float().requires_grad_()
    ref = sw.reference(x)
    (ref_grad,) = torch.autograd.grad(ref, x, grad.float())
    size = ag.element_size()
    fwd_bytes, bwd_bytes = 3 * ag.numel() // 2 * size, 5 * ag.numel() // 2 * size
    cuda = device.type == "cuda"
    compile_kw = {"fullgraph": True, "dynamic": False}
    variants: list[tuple[str, Callable, Callable | None]] = [  # (name, forward, backward called on its own)
        ("torch", sw.reference, sw.reference_backward),
        ("glmtune::swiglu", sw.swiglu, sw.swiglu_backward),
    ]
    if cuda:
        variants.insert(1, ("inductor", torch.compile(sw.reference, **compile_kw),
                            torch.compile(sw.reference_backward, **compile_kw)))  # fmt: skip
        for c in sw.CANDIDATES:
            variants.append((f"kernels block {c.block} warps {c.num_warps}", lambda t, c=c: sw.fused_forward(t, c),
                             lambda t, dy, c=c: sw.fused_backward(t, dy, c)))  # fmt: skip
    rows = []
    for name, forward, backward in variants:
        leaf = ag.clone().requires_grad_()

        def fwd_bwd(forward=forward, leaf=leaf) -> None:
            torch.autograd.grad(forward(leaf), leaf, grad)

        def errors(forward=forward, backward=backward) -> tuple[float, float]:
            return ((forward(ag).float() - ref).abs().max().item(),
                    (backward(ag, grad).float() - ref_grad).abs().max().item())  # fmt: skip

        rows.append(fwd_bwd_row(name, errors=errors, forward=lambda forward=forward: forward(ag),
                                backward=lambda backward=backward: backward(ag, grad),
                                # the candidates have no autograd of their own
                                fwd_bwd=None if name.startswith("kernels") else fwd_bwd, fwd_bytes=fwd_bytes,
                                bwd_bytes=bwd_bytes, device=device, iters=args.iters))  # fmt: skip
    return {
        "shape": {"rows": args.rows, "ffn": args.ffn, "dtype": str(dtype)},
        "bytes": {"fwd": fwd_bytes, "bwd": bwd_bytes},
        "default": {"block": sw.DEFAULT.block, "num_warps": sw.DEFAULT.num_warps},
        "torch": torch.__version__,
        "device": device_info(device) if cuda else {"name": "cpu"},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = op_bench_parser(__doc__)
    p.add_argument("--rows", type=int, default=4096, help="tokens (4 x 1024 packed)")
    p.add_argument("--ffn", type=int, default=13696, help="F: ag is (rows, 2F)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    return run_op_bench(p, argv, measure, fwd_bwd_table)


if __name__ == "__main__":
    main()
