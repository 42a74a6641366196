"""What the speed benchmarks share: synthetic ADGEN-like examples, random weights drawn on the device, step timing,
kernel profiling (GPU-busy fraction, kernels per step), MFU, and writing JSON + a markdown table.

Definitions (the same for every implementation, so rows compare like with like):
- useful tokens: prompt + target tokens of real samples in a step (padding never counts);
- MFU: ``flops_per_token * useful tokens/s / peak``; flops_per_token = 4N for adapter methods (forward + the
  backward pass to the activations; frozen weights get no gradient), 6N for full fine-tuning, N = the model's
  parameters without the input embedding (attention's own FLOPs are not counted, as is usual);
- GPU busy: summed CUDA kernel (+ memcpy/memset) time of a step, from ``torch.profiler`` over a few steps after
  warm-up, divided by the step's wall time measured without the profiler;
- peak: ``torch.cuda.max_memory_allocated`` from before the model is built to the end of the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glmtune.templates import IGNORE_INDEX, Encoded

H200_BF16_PEAK_TFLOPS = 989.0  # dense bf16, NVIDIA's H100/H200 SXM datasheet (no sparsity)


# ---- data ---------------------------------------------------------------------------------------------------------
def adgen_examples(
    n: int, *, vocab: int, seed: int = 0, prompt: tuple[int, int] = (20, 60), response: tuple[int, int] = (50, 130)
) -> list[Encoded]:
    """``n`` synthetic ADGEN-like examples: a prompt of 20-60 tokens (no loss) then a response of 50-130 tokens
    (loss), lengths and ids drawn from ``seed``. Ids avoid the first and last 10 of the vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(*prompt), rng.randint(*response)
        ids = [rng.randrange(10, vocab - 10) for _ in range(p + r)]
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * p + ids[p:]))
    return out


def useful_tokens(units: Sequence) -> int:
    """Real tokens of a list of examples or packed rows (a packed row has ``.examples``)."""
    return sum(sum(len(e.input_ids) for e in getattr(u, "examples", [u])) for u in units)


# ---- models -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def random_fill(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Random weights drawn on the device (fast at 6B): N(0, 0.02) matrices, unit norms, zero biases; parameters
    cast to ``dtype`` (buffers keep theirs). A model built on "meta" is materialised on ``device`` first and its
    rotary inverse frequencies recomputed (base 10000)."""
    was_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    if was_meta:
        model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if "." in name else ""
        if "norm" in module and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
        p.data = p.data.to(dtype)
    if was_meta:
        for name, b in model.named_buffers():
            if name.endswith("inv_freq"):
                n = b.shape[0] * 2
                b.copy_(1.0 / (10000 ** (torch.arange(0, n, 2, dtype=torch.float32, device=device) / n)))


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters without the input embedding (the N of MFU); the output layer counts."""
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next(m.weight for n, m in model.named_modules() if n.endswith("word_embeddings"))
    seen = {id(emb)}
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def free_memory() -> None:
    """Between runs: what earlier runs left allocated is freed, so each run's peak is its own. cuBLAS keeps a
    workspace per stream it ran on (each graphed step captures on its own stream) until told to drop them: the
    runs of one process started ~64 MiB higher each (2026-11-30, bench/RESULTS.md)."""
    gc.collect()
    if torch.cuda.is_available():
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # (private; CUDA builds)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- timing and profiling -----------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """ms per call: CUDA-graph replays on the GPU (``glmtune.models.gemv.replay_ms``: kernels without launch gaps, as
    a captured training step runs them), the median wall time of ``iters`` calls on the CPU."""
    if device.type == "cuda":
        from glmtune.models.gemv import replay_ms

        return replay_ms([fn] * iters)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# the table of an op's forward / backward micro-benchmark (bench/swiglu_speed.py, bench/repeat_kv_speed.py)
FWD_BWD_COLUMNS = [("variant", "variant", ""), ("fwd ms", "fwd_ms", ".4f"), ("fwd TB/s", "fwd_tbs", ".2f"),
                   ("bwd ms", "bwd_ms", ".4f"), ("bwd TB/s", "bwd_tbs", ".2f"), ("fwd+bwd ms", "fwd_bwd_ms", ".4f"),
                   ("max err", "max_err", ".2e"), ("max grad err", "max_grad_err", ".2e")]  # fmt: skip


def fwd_bwd_row(
    name: str,
    *,
    errors: Callable[[], tuple[float, float]],
    forward: Callable[[], object],
    backward: Callable[[], object],
    fwd_bwd: Callable[[], object] | None,
    fwd_bytes: int,
    bwd_bytes: int,
    device: torch.device,
    iters: int,
) -> dict:
    """One variant's row of an op's micro-benchmark: ``errors()`` (largest value and gradient differences from the
    reference), the forward, the backward called on its own and (unless None) both through autograd timed by
    :func:`time_ms`, with the bytes each direction moves per second. A variant this torch cannot run (or capture) is
    recorded with its error; the others go on."""
    row: dict = {"variant": name}
    try:
        row["max_err"], row["max_grad_err"] = errors()
        row["fwd_ms"] = time_ms(forward, device, iters)
        row["bwd_ms"] = time_ms(backward, device, iters)
        row["fwd_tbs"] = fwd_bytes / row["fwd_ms"] / 1e9  # bytes per ms -> TB/s
        row["bwd_tbs"] = bwd_bytes / row["bwd_ms"] / 1e9
        if fwd_bwd is not None:
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, iters)
    except Exception as e:
        logging.getLogger(__name__).warning("%s failed: %s", name, e)
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    logging.getLogger(__name__).info("%s", row)
    return row


def op_bench_parser(doc: str) -> argparse.ArgumentParser:
    """An op micro-benchmark's command line (its module docstring's first paragraph as the description): ``--device``,
    ``--iters``, ``--seed`` and ``--json``; the benchmark adds its shape arguments."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p


def run_op_bench(parser: argparse.ArgumentParser, argv: list[str] | None, measure: Callable[[argparse.Namespace], dict],
                 table: Callable[[argparse.Namespace, dict], str]) -> dict:  # fmt: skip
    """Parse ``argv``, run ``measure``, log ``table`` of its result and write the result to ``--json``."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args)
    logging.getLogger("benchlib").info("%s", table(args, result))
    if args.json:
        write_json(args.json, result)
    return result


def fwd_bwd_table(_args: argparse.Namespace, result: dict) -> str:
    """An op micro-benchmark's shape and its :data:`FWD_BWD_COLUMNS` table (``run_op_bench``'s ``table``)."""
    return f"{result['shape']}\n{markdown_table(result['rows'], FWD_BWD_COLUMNS)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    step_ms: float  # mean wall time of a step
    useful_tokens_per_s: float
    kernels_per_step: float | None = None
    kernel_ms_per_step: float | None = None
    kernel_kinds: dict | None = None  # ``breakdown``'s summary of the profiled steps (time_steps)
    # where a timed step's wall time goes (CUDA): the host's time inside ``step()`` (mean, max) and the device's
    # time from one step's start to the next, read from events recorded on the stream between the calls
    host_ms: float | None = None
    host_max_ms: float | None = None
    device_step_ms: list[float] | None = None

    @property
    def gpu_busy(self) -> float | None:
        return None if self.kernel_ms_per_step is None else self.kernel_ms_per_step / self.step_ms


def time_steps(
    step: Callable[[object], object],
    batches: Sequence,
    tokens: Sequence[int],
    *,
    device: torch.device,
    warmup: int,
    steps: int,
    profile_steps: int,
    breakdown: Callable[[list[dict], int], dict] | None = None,
) -> Timing:
    """Run ``warmup`` steps (and one of each batch shape still unseen), then time ``steps`` steps, then profile
    ``profile_steps`` more (CUDA only).

    ``batches[i]`` is consumed by ``step`` and holds ``tokens[i]`` useful tokens; batches are cycled.
    ``breakdown(trace events, profile_steps)``: a summary of the profiled steps' kernels (``Timing.kernel_kinds``).
    """
    n = len(batches)
    seen = set()
    for i in range(warmup):
        step(batches[i % n])
        seen.add(_shape(batches[i % n]))
    for i in range(warmup, warmup + steps + profile_steps):  # every shape once before timing: compiles stay out
        if _shape(batches[i % n]) not in seen:
            step(batches[i % n])
            seen.add(_shape(batches[i % n]))
    sync(device)
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    host = []
    start = time.perf_counter()
    done = 0
    for j, i in enumerate(range(warmup, warmup + steps)):
        if cuda:
            events[j].record()
        t = time.perf_counter()
        step(batches[i % n])
        host.append(time.perf_counter() - t)
        done += tokens[i % n]
    if cuda:
        events[-1].record()
    sync(device)
    wall = time.perf_counter() - start
    timing = Timing(step_ms=1e3 * wall / steps, useful_tokens_per_s=done / wall,
                    host_ms=1e3 * sum(host) / steps, host_max_ms=1e3 * max(host))  # fmt: skip
    if cuda:
        timing.device_step_ms = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=True)]
    if device.type == "cuda" and profile_steps > 0:
        first = warmup + steps
        events: list[dict] | None = [] if breakdown is not None else None
        k, ms = profile_kernels(lambda: [step(batches[i % n]) for i in range(first, first + profile_steps)], device,
                                events)  # fmt: skip
        timing.kernels_per_step, timing.kernel_ms_per_step = k / profile_steps, ms / profile_steps
        if breakdown is not None:
            timing.kernel_kinds = breakdown(events, profile_steps)
    return timing


def _shape(batch) -> tuple:
    # (host ints, such as the collator's max_seqlen, are part of a batch's shape: a compiled variant each)
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in batch.values()) \
        if isinstance(batch, dict) else ()  # fmt: skip


def profile_kernels(run: Callable[[], object], device: torch.device, events_out: list[dict] | None = None
                    ) -> tuple[int, float]:  # fmt: skip
    """(number of kernels, summed kernel + memcpy/memset milliseconds) that ``run()`` launched, read from the
    profiler's Chrome trace (its event categories are stable across torch versions); the trace's events are added
    to ``events_out`` when given."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    finally:
        os.unlink(path)
    if events_out is not None:
        events_out.extend(events)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    busy_us = sum(float(e.get("dur", 0)) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    return len(kernels), busy_us / 1e3


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else flops_per_token * tokens_per_s / (peak_tflops * 1e12)


# ---- output -------------------------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}  # fmt: skip
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def write_json(path: Path, data: dict) -> None:
    """Atomic: a half-written file never replaces a good one (the benchmarks rewrite it after every row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (header, key, format spec); a missing or None value prints as "-"."""
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "|".join("---" if f == "" else "---:" for _, _, f in columns) + "|"]  # fmt: skip
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
