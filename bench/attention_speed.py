"""Attention of one layer on packed rows, forward + backward: FlexAttention (compiled, as the compiled blocks run
it), flash attention over variable-length runs (``torch.nn.attention.varlen``, the "varlen" backend) and SDPA with
the dense mask, through ``glmtune.models.attention.attend`` and masks from ``glmtune.models.masks.build_mask``.

Rows: ``--batch`` rows of ``--seq`` tokens packed (first fit) with synthetic ADGEN-like samples (prompt 20-60 +
response 50-130 tokens), padding at the end of each row; ChatGLM3-6B's attention shape by default (32 query heads,
2 KV groups, head dim 128, bf16). Each variant: ms per layer for forward + backward (CUDA events, median of
``--iters`` after warm-up), the mask build (once per step for all layers), the peak memory over the inputs, and
the largest difference from the fp32 dense reference on real tokens. The varlen form is timed at several
capacities (``max_runs``: the zero-length runs its fixed shape carries) and with the collator's runs, given flash
either the row width or the collator's bound on the run lengths as ``max_seqlen`` (its grid is blocks of that
bound x runs x heads); "K/V not repeated" hands flash the grouped K/V heads as they are; "sdpa causal" ignores the
packing (wrong mask, the flash lower bound). Errors: output and q/k/v gradients against the fp32 dense reference.

    PYTHONPATH=src python3 bench/attention_speed.py --json bench/results/attention_speed.json

On the CPU (``--device cpu``, tiny sizes) only the dense and the varlen form's dense fallback run: a smoke test.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from benchlib import adgen_examples, device_info, markdown_table, op_bench_parser, run_op_bench  # noqa: E402

from glmtune.models.attention import _varlen_api, attend, varlen_supported  # noqa: E402
from glmtune.models.layout import SequenceLayout  # noqa: E402
from glmtune.models.masks import AttentionMask, build_mask, packed_runs, varlen_max_runs  # noqa: E402

log = logging.getLogger("attention_speed")


def packed_segments(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """Segments (b, s) of rows filled in order with ADGEN-like samples (a sample that does not fit starts the next
    row; padding at the end). Sample lengths scale with ``s`` below 1024 (the CPU smoke test)."""
    f = min(1.0, s / 1024)
    prompt, response = (max(1, int(20 * f)), max(1, int(60 * f))), (max(1, int(50 * f)), max(1, int(130 * f)))
    examples = adgen_examples(b * s // 10 + 1, vocab=1000, seed=seed, prompt=prompt, response=response)
    lengths = [len(e.input_ids) for e in examples]
    seg = torch.full((b, s), -1, dtype=torch.long)
    i, pos, j = 0, 0, 0
    for n in lengths:
        if pos + n > s:
            i, pos, j = i + 1, 0, 0
            if i == b:
                break
        seg[i, pos : pos + n] = j
        pos, j = pos + n, j + 1
    return seg


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, wall time on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


Variant = tuple[str, Callable[[], AttentionMask], bool | str, int | None]


def variants(layout: SequenceLayout, device: torch.device, n_runs: int) -> list[Variant]:
    """(name, mask builder, how attend runs (compiled: True/False, "native_gqa"), max_runs) of each variant."""
    b, s = layout.shape
    out: list = [("sdpa dense", lambda: build_mask(layout), False, None)]
    flash = varlen_supported(device)
    caps = {"exact": n_runs, "default": varlen_max_runs(b, s)}
    for label, cap in caps.items():
        if cap < n_runs:  # would trip the builder's device-side assert
            log.info("skipping varlen max_runs=%s (%d): the rows hold %d runs", label, cap, n_runs)
            continue
        out.append((f"varlen max_runs={label} ({cap}), max_len {s}",
                    lambda cap=cap: build_mask(layout, backend="varlen", max_runs=cap), False, cap))  # fmt: skip
    # the collator's runs (masks.packed_runs: its capacity, padding cut to the bound), with the row width as flash's
    # max_seqlen (before) and with the collator's bound on the run lengths
    cu, bound = packed_runs(layout.segments.cpu())
    cu = cu.to(device)
    cap = cu.numel() - 1
    collated = {
        "width": lambda: AttentionMask(cu_seqlens=cu, max_len=s),
        "bound": lambda: AttentionMask(cu_seqlens=cu, max_len=bound),
    }
    out.append((f"varlen collator ({cap}), max_len {s}", collated["width"], False, cap))
    out.append((f"varlen collator ({cap}), max_len {bound} (bound)", collated["bound"], False, cap))
    if device.type == "cuda":
        out.append(("flex (compiled)", lambda: build_mask(layout, backend="flex"), True, None))
        if flash:
            out.append((f"varlen collator, max_len {bound} (compiled)", collated["bound"], True, cap))
            if not _varlen_api()[1]:  # this torch's varlen_attn takes no enable_gqa: attend repeats K/V heads
                out.append((f"varlen collator, max_len {s}, K/V not repeated", collated["width"], "native_gqa",
                            cap))  # fmt: skip
                out.append((f"varlen collator, max_len {bound}, K/V not repeated", collated["bound"], "native_gqa",
                            cap))  # fmt: skip
                out.append((f"varlen collator, max_len {bound}, K/V not repeated (compiled)", collated["bound"],
                            "native_gqa_compiled", cap))  # fmt: skip
        out.append(("sdpa causal (ignores packing)", lambda: AttentionMask(), False, None))
    return out


def native_gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """``varlen_attn`` handed the grouped K/V as they are, without ``enable_gqa`` (flash's kernels group heads
    natively; torch 2.10/2.11's wrapper does not check): does it run, and what does the repeat in ``attend`` cost?"""
    from torch.nn.attention.varlen import varlen_attn

    b, h, s, d = q.shape
    kwargs = {"window_size": (-1, 0)} if _varlen_api()[0] else {"is_causal": True}
    qf, kf, vf = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    cu = mask.cu_seqlens
    return varlen_attn(qf, kf, vf, cu, cu, mask.max_len, mask.max_len, **kwargs).reshape(b, s, h, d).transpose(1, 2)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, s, h, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    seg = packed_segments(b, s, args.seed)
    n_runs = int((torch.cat([torch.ones(b, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)).sum())
    seg = seg.to(device)
    layout = SequenceLayout(torch.zeros((b, s), dtype=torch.long, device=device), seg)
    real = (seg >= 0)[:, None, :, None]
    gen = torch.Generator(device).manual_seed(args.seed)
    # (b, heads, s, d) views of (b, s, heads, d) tensors, as the models' projections give them
    base = [torch.randn(b, s, n, d, device=device, generator=gen).transpose(1, 2) for n in (h, g, g)]
    grad = torch.randn(b, h, s, d, device=device, generator=gen).to(dtype) * real
    leaves = [t.detach().requires_grad_() for t in base]
    ref = attend(*leaves, build_mask(layout)) * real  # fp32 dense reference, and its q/k/v gradients
    ref.backward(grad.float())
    ref, ref_grads = ref.detach(), [t.grad for t in leaves]
    compiled_attend = torch.compile(attend, dynamic=False) if device.type == "cuda" else attend
    compiled_native = torch.compile(native_gqa_attend, dynamic=False) if device.type == "cuda" else None
    rows = []
    for name, make_mask, compiled, cap in variants(layout, device, n_runs):
        fn = {True: compiled_attend, False: attend, "native_gqa": native_gqa_attend,
              "native_gqa_compiled": compiled_native}.get(compiled)  # fmt: skip
        q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in base)  # (fresh leaves: gradients per variant)

        def step(fn=fn, q=q, k=k, v=v, mask=None) -> torch.Tensor:
            out = fn(q, k, v, mask)
            out.backward(grad)
            return out

        try:
            mask = make_mask()
            out = step(mask=mask)
            grad_err = max((t.grad.float() - r).abs().max().item() for t, r in zip((q, k, v), ref_grads, strict=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step(mask=mask)
                torch.cuda.synchronize(device)
                peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                peak_mib = None
            row = {
                "variant": name,
                "max_runs": cap,
                "fwd_bwd_ms": timed(lambda mask=mask: step(mask=mask), device, args.iters),
                "fwd_ms": timed(
                    lambda fn=fn, q=q, k=k, v=v, mask=mask: fn(q, k, v, mask).detach(), device, args.iters
                ),  # fmt: skip
                "mask_ms": timed(make_mask, device, args.iters),
                "peak_mib": peak_mib,
                "max_err": ((out.detach().float() * real) - ref).abs().max().item(),
                "max_grad_err": grad_err,  # q, k, v gradients against the fp32 dense reference's
                "finite": bool(torch.isfinite(out).all()),
            }
        except Exception as e:  # a variant this torch cannot run: recorded, the others go on
            log.warning("%s failed: %s", name, e)
            row = {"variant": name, "max_runs": cap, "error": f"{type(e).__name__}: {e}"[:300]}
        log.info("%s", row)
        rows.append(row)
    return {
        "shape": {"batch": b, "seq": s, "heads": h, "kv_heads": g, "head_dim": d, "dtype": str(dtype)},
        "runs": n_runs,
        "real_tokens": int((seg >= 0).sum()),
        "torch": torch.__version__,
        "device": device_info(device) if device.type == "cuda" else {"name": "cpu"},
        "rows": rows,
    }


COLUMNS = [("variant", "variant", ""), ("fwd+bwd ms", "fwd_bwd_ms", ".3f"), ("fwd ms", "fwd_ms", ".3f"),
           ("mask ms", "mask_ms", ".3f"), ("peak MiB", "peak_mib", ".0f"), ("max err", "max_err", ".2e"),
           ("max grad err", "max_grad_err", ".2e")]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = op_bench_parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    return run_op_bench(p, argv, measure, lambda args, r: f"{r['runs']} runs, {r['real_tokens']} real tokens of "
                        f"{args.batch * args.seq}\n{markdown_table(r['rows'], COLUMNS)}")  # fmt: skip


if __name__ == "__main__":
    main()
