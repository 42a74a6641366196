"""Quantized inference (THUDM's INT4/INT8 format) of a ChatGLM3-6B-shaped model with random weights: decode speed
against bf16, peak GPU memory of a quantized folder loaded as a user loads it, and the kernels alone.

- ``decode``: batch 1, greedy, a ``--prompt-len`` prompt, ``--new-tokens`` new tokens, glmtune's ``Decoder`` in
  each ``--decode`` mode (graph: the CUDA default; compiled), timed as bench/decode_speed.py times it (decode tok/s
  = (new tokens - 1) / (whole run - 1-token run), after a warm-up run of the timed length; every run over the same
  cache size). bf16: the model built on the device with random weights; INT8/INT4: the folders below, loaded (INT4
  in each of ``--int4-layouts``: THUDM's bytes, or tinygemm's repacked words). Ratios are to bf16 in the same mode.
  The first 16 tokens of the timed run are checked against the eager mode's (``graph_equals_eager``).
- ``memory``: for each ``--bits``, a THUDM-format folder (int8 ``weight`` + fp16 ``weight_scale`` per block linear,
  ``quantization_bit`` in config.json, a tiny ChatGLM3 tokenizer) with random weights is written to local disk
  tensor by tensor (drawn on the GPU, written by the checkpoint's shard writer: no full-precision model exists),
  then loaded with ``glmtune.pretrained.load_pretrained`` (bf16, cuda) and asked for ``--mem-new-tokens`` tokens
  after a prompt that fills ``--context`` tokens, batch 1. Peak = ``torch.cuda.max_memory_allocated`` from before
  the load to the end (the prefill computes logits for the last position only).
- ``kernels`` (``--kernels``): each linear of a block (qkv, dense, h_to_4h, 4h_to_h) at M rows through each path of
  ``models/quant_kernels.py`` and bf16 cuBLAS, timed as replays of a CUDA graph over enough weight copies that
  none comes from L2 (the host's launch cost left out, as in graph decode: ``_bench``), each result checked against
  the dequantized product; at one row the bf16 Triton matvec (what bf16 decode runs); INT4 also in tinygemm's
  layout (``models/int4_pack.py``: aten's INT4 kernel on the repacked weight, checked against the reference
  packing); and a sweep of the matrix-vector and tiled kernels' blocks (``--gemv-sweep``).

    PYTHONPATH=src python3 bench/quant_speed.py --kernels --json bench/results/quant_speed.json

Nothing is downloaded. On the CPU (``--device cpu``, a tiny preset) it runs the reference path: a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import (  # noqa: E402
    device_info,
    free_memory,
    markdown_table,
    profile_kernels,
    random_fill,
    sync,
    write_json,
)
from decode_speed import prompts_for, timed  # noqa: E402

from glmtune.generate import Decoder, GenerationConfig, generate, generate_stream  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.checkpoint import save_pretrained  # noqa: E402
from glmtune.models.config import GLMConfig, preset  # noqa: E402
from glmtune.models.quant import dequantize_weight, quantize_model_  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402

log = logging.getLogger("quant_speed")
GIB = 2**30


# ---- a quantized folder with random weights ------------------------------------------------------------------------
def tokenizer_files(work: Path) -> list[Path]:
    """A tiny ChatGLM3 tokenizer (the loader needs one; generation here feeds token ids directly)."""
    from glmtune.demo_data import corpus_lines
    from glmtune.tiny import make_tiny_model_dir

    tiny = make_tiny_model_dir(work / "tiny-tokenizer", corpus_lines(60), generation="chatglm3")
    return [tiny / "tokenizer.model", tiny / "tokenizer_config.json"]


@torch.no_grad()
def write_random_quantized(cfg: GLMConfig, bits: int, out: Path, tokenizers: list[Path], device: torch.device,
                           seed: int = 0) -> int:  # fmt: skip
    """Write ``out``: the model's checkpoint in THUDM's INT``bits`` format with random values, one tensor at a time
    (drawn on ``device``, then handed to the shard writer on the host). Returns the bytes written."""
    model = quantize_model_(build_model(cfg, device="meta", generation="chatglm3"), bits)
    optional = [re.compile(p) for p in model.checkpoint_rules().get("optional", [])]
    gen = torch.Generator(device=device).manual_seed(seed)
    # dequantized weights of std ~0.02: uniform integers have std 4.6 (int4 nibbles) or 73 (int8)
    scale = 0.02 / (4.6 if bits == 4 else 73.0)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if any(p.search(name) for p in optional):
            continue
        if t.dtype == torch.int8:  # INT4: any byte is two valid nibbles
            v = torch.randint(-128 if bits == 4 else -127, 128, t.shape, dtype=torch.int8, device=device,
                              generator=gen)  # fmt: skip
        elif name.endswith("weight_scale"):
            v = torch.full(t.shape, scale, dtype=torch.float16, device=device)
        elif "norm" in name:
            v = torch.ones(t.shape, dtype=torch.bfloat16, device=device)
        elif name.endswith(".bias"):
            v = torch.zeros(t.shape, dtype=torch.bfloat16, device=device)
        else:
            v = (torch.randn(t.shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        tensors[name] = v.cpu()
        del v
    config = cfg.replace(extra={**cfg.extra, "quantization_bit": bits})
    save_pretrained(tensors, config, out, tokenizer_files=tokenizers)
    return sum(t.nbytes for t in tensors.values())


# ---- end to end ----------------------------------------------------------------------------------------------------
def decode_row(model, args: argparse.Namespace, device: torch.device, vocab: int, mode: str) -> dict:
    """Decode tok/s of ``generate`` in ``mode`` (what a user gets; one Decoder kept, as chat and a server keep it),
    the GPU's kernel time per token from the profiler (the step's bound when the host keeps up) and whether the
    first 16 tokens of the timed run equal the eager mode's."""
    prompts = prompts_for(1, args.prompt_len, vocab).tolist()
    decoder = Decoder(model, decode=mode, attention=args.attention)
    last: list[int] = []

    def run(n: int, dec: Decoder = decoder) -> int:
        """``n`` tokens of a ``--new-tokens`` generation: one cache size, hence one compiled and captured step (and
        the eager reference over the same cache size: near-tied logits of random weights can tip otherwise)."""
        last.clear()
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False)
        for token in generate_stream(model, prompts, cfg, stop_ids=[], pad_id=0, decoder=dec):
            last.append(int(token[0]))
            if len(last) == n:
                break
        return len(last)

    r = timed(run, args.new_tokens, device, warmup_tokens=args.new_tokens)
    r["whole_run_tokens_per_s"] = r["new_tokens"] / r["whole_s"]  # prefill included: robust to that outlier
    tokens = last[:16]
    if device.type == "cuda":
        n = 33
        kernels_n, ms_n = profile_kernels(lambda: run(n), device)
        kernels_1, ms_1 = profile_kernels(lambda: run(1), device)
        r["gpu_ms_per_token"] = (ms_n - ms_1) / (n - 1)
        r["kernels_per_token"] = (kernels_n - kernels_1) / (n - 1)
        r["wall_ms_per_token"] = 1e3 / r["tokens_per_s_per_seq"]
    run(len(tokens), Decoder(model, decode="eager", attention=args.attention))
    return {**r, "decode": mode, "graph_equals_eager": tokens == last,
            **first_difference(model, prompts[0], eager=list(last), other=tokens)}  # fmt: skip


def first_difference(model, prompt: list[int], *, eager: list[int], other: list[int]) -> dict:
    """Where ``other`` (a fast mode's greedy tokens) leaves ``eager``'s, and the eager logit gap there between the
    two choices relative to the logits' range: a gap near 0 is a near tie that another summation order tips; at
    token 0 or with a large gap, a wrong step."""
    first = next((i for i, (a, b) in enumerate(zip(eager, other, strict=True)) if a != b), None)
    if first is None:
        return {"first_difference": None, "difference_gap": None}
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + eager[:first]], device=device)
    with torch.no_grad():
        logits = model(ids)[0, -1].float()
    gap = (logits[eager[first]] - logits[other[first]]) / (logits.max() - logits.min())
    return {"first_difference": first, "difference_gap": float(gap)}


@contextlib.contextmanager
def gemv_blocks(table: dict[tuple[int, int, int], dict]):
    """The matrix-vector kernel at batch 1 with the swept blocks (``table``: (out, stored cols, bits) -> config)
    instead of ``quant_kernels.gemv_config``'s, while the block runs."""
    from glmtune.models import quant_kernels as qk

    default = qk.gemv_config

    def pick(m: int, n: int, kp: int, bits: int):
        found = table.get((n, kp, bits)) if m == 1 else None
        return qk.GemvConfig(**found) if found else default(m, n, kp, bits)

    qk.gemv_config = pick
    try:
        yield
    finally:
        qk.gemv_config = default


def memory_row(model, args: argparse.Namespace, device: torch.device, vocab: int, base: int) -> dict:
    """Peak memory of a ``--context``-token batch-1 generation (prompt + ``--mem-new-tokens``, graph decode)."""
    ids = prompts_for(1, args.context - args.mem_new_tokens, vocab)
    decoder = Decoder(model, decode="graph" if device.type == "cuda" else "eager", attention=args.attention)
    cfg = GenerationConfig(max_new_tokens=args.mem_new_tokens, do_sample=False)
    made = len(generate(model, ids.tolist(), cfg, stop_ids=[], pad_id=0, decoder=decoder)[0])
    sync(device)
    out = {"context": args.context, "mem_new_tokens": made}
    if device.type == "cuda":
        out["peak_allocated_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return out


def end_to_end(args: argparse.Namespace, device: torch.device, work: Path, add,
               gemv_table: dict | None = None) -> None:  # fmt: skip
    """bf16, then each of ``--bits`` (INT4 in each of ``--int4-layouts``), each decoded in each ``--decode`` mode."""
    cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    vocab = cfg.padded_vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.skip_bf16:
        model = build_model(cfg, device=device, dtype=dtype, generation="chatglm3")
        random_fill(model, device, dtype, seed=0)
        model.eval()
        for mode in args.decode:
            add({"precision": "bf16", "weight_gib": sum(p.nbytes for p in model.parameters()) / GIB,
                 **decode_row(model, args, device, vocab, mode)})  # fmt: skip
        del model
        free_memory()
    tokenizers = tokenizer_files(work)
    for bits in args.bits:
        folder = work / f"{args.preset}-int{bits}"
        t0 = time.perf_counter()
        written = write_random_quantized(cfg, bits, folder, tokenizers, device)
        write_s = time.perf_counter() - t0
        for layout in args.int4_layouts if bits == 4 else ["thudm"]:
            free_memory()  # resets the peak: what follows is what a user's process would hold
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            model = load_pretrained(folder, dtype="bfloat16" if device.type == "cuda" else "float32",
                                    device=str(device), int4_layout=layout).model  # fmt: skip
            sync(device)
            load_s = time.perf_counter() - t0
            label = f"int{bits}" + (f" {layout}" if bits == 4 and len(args.int4_layouts) > 1 else "")
            row = {"precision": label, "layout": layout, "folder_gib": written / GIB, "write_s": write_s,
                   "load_s": load_s}  # fmt: skip
            if device.type == "cuda":
                row["load_peak_allocated_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
                row["weight_gib"] = (torch.cuda.memory_allocated(device) - base) / GIB
            row |= memory_row(model, args, device, vocab, base)
            for mode in args.decode:
                add({**row, **decode_row(model, args, device, vocab, mode)})
            swept = {key: c for key, c in (gemv_table or {}).items() if key[2] == bits}
            if swept and layout == "thudm":
                with gemv_blocks(swept):
                    add({"precision": f"{label} (swept blocks)", "blocks": {str(k): c for k, c in swept.items()},
                         **decode_row(model, args, device, vocab, args.decode[0])})  # fmt: skip
            del model
            free_memory()
        if not args.keep:
            shutil.rmtree(folder)


# ---- the kernels alone ---------------------------------------------------------------------------------------------
def block_shapes(cfg: GLMConfig) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of the four quantized linears of a block."""
    h = cfg.hidden_size
    return {"qkv": (cfg.qkv_size, h), "dense": (h, cfg.num_attention_heads * cfg.head_dim),
            "h_to_4h": (2 * cfg.ffn_hidden_size, h), "4h_to_h": (h, cfg.ffn_hidden_size)}  # fmt: skip


def copies_for(tensors: tuple[torch.Tensor, ...], min_bytes: float = 256e6) -> list[tuple[torch.Tensor, ...]]:
    """Enough copies of a weight (its tensors) that reading them in turn moves ``min_bytes``: several times the
    H200's 50 MB L2, so that each timed call reads its weight from device memory, as decode does."""
    nbytes = sum(t.nbytes for t in tensors)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(max(1, -int(-min_bytes // nbytes)) - 1)]


def _bench(call, copies: list, rep_ms: int) -> float:
    """Median µs of ``call(*copy)``: one CUDA graph calls it once per copy (the weights in turn, so none is read
    from L2), replayed about ``rep_ms`` ms (``gemv.replay_ms``). A graph leaves out the host's launch cost (a Triton
    launch from Python costs more than these kernels take) as the decode step's graph does."""
    from glmtune.models.gemv import replay_ms

    calls = [lambda c=c: call(*c) for c in copies]
    once_ms = replay_ms(calls, replays=1) * len(calls)  # one replay (also the warm-up)
    return 1e3 * replay_ms(calls, replays=max(5, min(200, int(rep_ms / max(once_ms, 1e-3)))))


def kernel_row(qk, w_bf16: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int, m: int, sweeps: list,
               rep_ms: int) -> dict:  # fmt: skip
    """One linear at ``m`` rows: bf16 cuBLAS, dequantize + cuBLAS, the automatic choice, and each (label, path,
    config) of ``sweeps`` (config None: the default); the best of each label is kept beside the whole sweep. Every
    result is compared with x @ the dequantized weight (float32): ``max_rel_err`` over all of them."""
    n, k = w_bf16.shape
    x = torch.randn(m, k, device=w_bf16.device, dtype=torch.bfloat16)
    ref = x.float() @ dequantize_weight(q, scale, bits, torch.float32).T
    errors = []

    def checked(y: torch.Tensor) -> None:
        errors.append(((y.float() - ref).norm() / ref.norm()).item())

    quantized = copies_for((q, scale))
    checked(qk.linear(x, q, scale, bits, None))
    row = {"n": n, "k": k, "bits": bits, "m": m, "copies": len(quantized),
           "bf16_cublas_us": _bench(lambda w: torch.nn.functional.linear(x, w), copies_for((w_bf16,)), rep_ms),
           "dequant_cublas_us": _bench(lambda q_, s_: qk.linear(x, q_, s_, bits, None, path="dequant"), quantized,
                                       rep_ms),
           "auto_us": _bench(lambda q_, s_: qk.linear(x, q_, s_, bits, None), quantized, rep_ms),
           "sweep": []}  # fmt: skip
    best: dict[str, tuple[float, dict]] = {}
    for label, path, c in sweeps:
        checked(qk.linear(x, q, scale, bits, None, path=path, config=c))
        us = _bench(lambda q_, s_, path=path, c=c: qk.linear(x, q_, s_, bits, None, path=path, config=c), quantized,
                    rep_ms)  # fmt: skip
        config = vars(c if c is not None else qk.gemv_config(m, n, q.shape[1], bits))
        row["sweep"].append({"label": label, "path": path, "us": us, **config})
        if label not in best or us < best[label][0]:
            best[label] = (us, config)
    for label, (us, config) in best.items():
        row[f"{label}_us"], row[f"{label}_config"] = us, config
    row["max_rel_err"] = max(errors)
    if m == 1:
        row["bf16_matvec_us"] = matvec_us(x, w_bf16, rep_ms)
    if bits == 4:
        row |= tinygemm_columns(x, q, scale, ref, rep_ms)
    row["weight_gb_per_s_auto"] = (q.nbytes + scale.nbytes) / (row["auto_us"] * 1e-6) / 1e9
    row["bf16_weight_gb_per_s"] = w_bf16.nbytes / (row["bf16_cublas_us"] * 1e-6) / 1e9
    return row


def tinygemm_columns(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ref: torch.Tensor, rep_ms: int) -> dict:
    """INT4 in the tinygemm layout (``models/int4_pack.py``, the inference layout): the repacked weight checked
    against the reference layout and unpacked back bit for bit, then timed: aten's INT4 kernel, the layout's op at
    these rows (``glmtune::int4_tc_linear``: tinygemm or dequantize + cuBLAS) and dequantize + cuBLAS from it."""
    from glmtune.models import int4_pack
    from glmtune.models import quant_kernels as qk

    n, k = q.shape[0], q.shape[1] * 2
    inner_k_tiles, group = int4_pack.tinygemm_params(n, k)
    packed = int4_pack.pack(q, inner_k_tiles)
    sz = int4_pack.scales_and_zeros(scale, k, group)
    out = {"inner_k_tiles": inner_k_tiles, "group": group,
           "pack_equals_reference": torch.equal(packed, int4_pack.pack_reference(int4_pack.to_unsigned(q),
                                                                                  inner_k_tiles)),
           "unpack_equals_thudm": torch.equal(int4_pack.unpack(packed), q)}  # fmt: skip
    errors = []
    for y in (torch.ops.aten._weight_int4pack_mm(x, packed, group, sz), qk.int4_tc_linear(x, packed, sz, scale, group),
              torch.nn.functional.linear(x, qk.dequantize_tc(packed, scale, x.dtype))):  # fmt: skip
        errors.append(((y.float() - ref).norm() / ref.norm()).item())
    out["tinygemm_rel_err"] = max(errors)
    copies = copies_for((packed, sz, scale))
    out["tinygemm_us"] = _bench(lambda p_, sz_, s_: torch.ops.aten._weight_int4pack_mm(x, p_, group, sz_), copies,
                                rep_ms)  # fmt: skip
    out["tc_op_us"] = _bench(lambda p_, sz_, s_: qk.int4_tc_linear(x, p_, sz_, s_, group), copies, rep_ms)
    out["tc_dequant_cublas_us"] = _bench(
        lambda p_, sz_, s_: torch.nn.functional.linear(x, qk.dequantize_tc(p_, s_, x.dtype)), copies, rep_ms
    )
    out["tinygemm_weight_gb_per_s"] = (packed.nbytes + sz.nbytes) / (out["tinygemm_us"] * 1e-6) / 1e9
    return out


def matvec_us(x: torch.Tensor, w: torch.Tensor, rep_ms: int) -> float | None:
    """bf16 at one row through glmtune's Triton matrix-vector kernel (``models/gemv.py``, what bf16 decode runs)."""
    try:
        from glmtune.models import gemv
    except ImportError:
        return None
    return _bench(lambda w_: gemv.gemv(x, w_), copies_for((w,)), rep_ms)


def kernels(args: argparse.Namespace, device: torch.device, add) -> None:
    from glmtune.models import quant_kernels as qk
    from glmtune.models.quant import quantize_weight

    cuda_cores = [qk.GemvConfig(1, bn, bk, nw) for bn, bk, nw in
                  [(2, 1024, 4), (4, 256, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8),
                   (16, 256, 4)]]  # fmt: skip
    mma = [qk.GemvConfig(1, bn, bk, nw, mma=True) for bn, bk, nw in  # bk: bytes a step (words: bk / 4)
           [(4, 256, 4), (8, 256, 4), (4, 512, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8), (8, 1024, 4),
            (16, 1024, 8), (32, 1024, 8)]]  # fmt: skip
    dot_skinny = [qk.DotConfig(16, bn, bk, 1) for bn, bk in [(16, 128), (32, 64), (32, 128), (32, 256)]]
    dot_large = [qk.DotConfig(bm, bn, bk, 8, nw, st) for bm, bn, bk, nw, st in
                 [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 128, 64, 4, 4)]]  # fmt: skip
    for name, (n, k) in block_shapes(preset(args.preset)).items():
        w = torch.randn(n, k, device=device) * 0.02
        for bits in args.bits:
            q, scale = quantize_weight(w, bits)
            for m in args.kernel_rows:
                sweeps: list = []
                if m == 1:
                    sweeps += [("gemv_cuda_cores", "gemv", c) for c in cuda_cores if args.gemv_sweep == "all"]
                    if bits == 4 and args.gemv_sweep != "none":
                        sweeps += [("gemv_mma", "gemv", c) for c in mma]
                elif m <= 4:
                    sweeps.append(("gemv_cuda_cores", "gemv", None))
                if m > 1 and args.gemv_sweep == "all":
                    large = [c for c in dot_large if c.block_m <= max(64, m)]
                    sweeps += [("dot", "dot", c) for c in (dot_skinny if m <= 16 else large)]
                add({"shape": name, **kernel_row(qk, w.to(torch.bfloat16), q, scale, bits, m, sweeps, args.rep_ms)})
        del w
        free_memory()


def best_gemv(rows: list[dict]) -> dict[tuple[int, int, int], dict]:
    """(out, stored cols, bits) -> the fastest matrix-vector config at one row, where it beat the default."""
    rows = [r for r in rows if r["m"] == 1 and r.get("sweep")]
    if not rows:
        return {}
    from glmtune.models import quant_kernels as qk

    table = {}
    for r in rows:
        kp = r["k"] // 2 if r["bits"] == 4 else r["k"]
        fastest = min((e for e in r["sweep"] if e["path"] == "gemv"), key=lambda e: e["us"])
        config = {f: fastest[f] for f in qk.GemvConfig.__dataclass_fields__}
        if config != vars(qk.gemv_config(1, r["n"], kp, r["bits"])):
            table[(r["n"], kp, r["bits"])] = config
    return table


# ---- driver --------------------------------------------------------------------------------------------------------
E2E_COLUMNS = [("precision", "precision", ""), ("decode", "decode", ""),
               ("decode tok/s", "tokens_per_s_per_seq", ",.1f"),
               ("x bf16", "speedup", ".2f"), ("whole-run tok/s", "whole_run_tokens_per_s", ",.1f"),
               ("whole-run x bf16", "whole_run_speedup", ".2f"),
               ("wall ms/token", "wall_ms_per_token", ".2f"),
               ("GPU ms/token", "gpu_ms_per_token", ".2f"), ("GPU x bf16", "gpu_speedup", ".2f"),
               ("kernels/token", "kernels_per_token", ".0f"), ("graph = eager", "graph_equals_eager", ""),
               ("first difference", "first_difference", ""), ("gap there", "difference_gap", ".2e"),
               ("folder GiB", "folder_gib", ".2f"), ("weights GiB", "weight_gib", ".2f"),
               ("load s", "load_s", ".1f"), ("load peak GiB", "load_peak_allocated_gib", ".2f"),
               ("peak GiB (load + context)", "peak_allocated_gib", ".2f"),
               ("reserved GiB", "peak_reserved_gib", ".2f")]  # fmt: skip
KERNEL_COLUMNS = [("shape", "shape", ""), ("bits", "bits", "d"), ("M", "m", "d"),
                  ("bf16 cuBLAS µs", "bf16_cublas_us", ".1f"),
                  ("auto µs", "auto_us", ".1f"), ("gemv CUDA-core µs", "gemv_cuda_cores_us", ".1f"),
                  ("gemv mma µs", "gemv_mma_us", ".1f"), ("dot µs", "dot_us", ".1f"),
                  ("bf16 matvec µs", "bf16_matvec_us", ".1f"), ("tinygemm µs", "tinygemm_us", ".1f"),
                  ("tinygemm GB/s", "tinygemm_weight_gb_per_s", ",.0f"), ("tc op µs", "tc_op_us", ".1f"),
                  ("tc dequant+cuBLAS µs", "tc_dequant_cublas_us", ".1f"),
                  ("tinygemm rel err", "tinygemm_rel_err", ".1e"), ("pack = ref", "pack_equals_reference", ""),
                  ("dequant+cuBLAS µs", "dequant_cublas_us", ".1f"),
                  ("auto weight GB/s", "weight_gb_per_s_auto", ",.0f"),
                  ("max rel err", "max_rel_err", ".1e")]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--layers", type=int, default=0, help="shrink to N layers (0: the preset's)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument(
        "--decode",
        nargs="+",
        default=["graph"],
        help="glmtune decode modes, each a row (graph: the CUDA default; compiled)",
    )
    ap.add_argument("--attention", default="auto", help="the decode step's attention (generate.ATTENTION_MODES)")
    ap.add_argument(
        "--int4-layouts",
        nargs="+",
        default=["thudm", "tinygemm"],
        choices=["thudm", "tinygemm"],
        help="INT4's layouts in memory, each loaded and decoded (tinygemm: the inference layout)",
    )
    ap.add_argument("--context", type=int, default=2048, help="tokens (prompt + new) of the memory run")
    ap.add_argument("--mem-new-tokens", type=int, default=16)
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--no-e2e", action="store_true", help="only the kernels")
    ap.add_argument("--kernels", action="store_true", help="also time the kernels alone")
    ap.add_argument("--kernel-rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 2048])
    ap.add_argument(
        "--gemv-sweep",
        choices=["all", "mma", "none"],
        default="all",
        help="the kernels' block sweeps: all, only the INT4 tensor-core GEMV's, none",
    )
    ap.add_argument("--rep-ms", type=int, default=40, help="graph replay time per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work-dir", type=Path, default=None, help="where to write the folders (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written folders")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None, help="kept in the JSON (e.g. the glmtune commit measured)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    info = {**device_info(device), "preset": args.preset, "layers": args.layers or None,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "decode": args.decode,
            "attention": args.attention,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "note": args.note}  # fmt: skip
    result: dict = {"info": info, "end_to_end": [], "kernels": []}

    def save() -> None:
        if args.json:  # after every row: a command cut short keeps its rows
            write_json(args.json, result)
            args.json.with_suffix(".md").write_text(tables(result) + "\n")

    def add_e2e(row: dict) -> None:
        bf16 = next((r for r in result["end_to_end"] if r["precision"] == "bf16" and r["decode"] == row["decode"]),
                    None)  # fmt: skip
        if bf16 is not None:
            row["speedup"] = row["tokens_per_s_per_seq"] / bf16["tokens_per_s_per_seq"]
            row["whole_run_speedup"] = row["whole_run_tokens_per_s"] / bf16["whole_run_tokens_per_s"]
            if "gpu_ms_per_token" in bf16:
                row["gpu_speedup"] = bf16["gpu_ms_per_token"] / row["gpu_ms_per_token"]
        result["end_to_end"].append(row)
        log.info("%s", row)
        save()

    def add_kernel(row: dict) -> None:
        result["kernels"].append(row)
        log.info("%s", row)
        save()

    if args.kernels:  # first: the decode runs also try the batch-1 blocks the sweep found best
        kernels(args, device, add_kernel)
    if not args.no_e2e:
        with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="glmtune-quantbench-") as tmp:
            end_to_end(args, device, Path(tmp), add_e2e, best_gemv(result["kernels"]))
    print(tables(result))
    return result


def tables(result: dict) -> str:
    out = []
    if result["end_to_end"]:
        out.append(markdown_table(result["end_to_end"], E2E_COLUMNS))
    if result["kernels"]:
        out.append(markdown_table(result["kernels"], KERNEL_COLUMNS))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
