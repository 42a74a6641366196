"""Peak host RAM and time of loading an original-format checkpoint, against the model's size in the target dtype.

Writes a random checkpoint with the original tensor names and shapes of a preset (shard by shard, so writing it needs
about one shard of RAM), then loads it with ``glmtune.models.checkpoint.load_weights`` into a model built on "meta",
in a fresh Python process, and reads that process's RSS high-water mark (VmHWM). Prints a table, writes JSON.

    python bench/load_memory.py --preset chatglm3-6b --layers 6 --format safetensors bin --dtype bfloat16

The loading process runs a stand-in module with the original parameter names (``--model standin``, the default), so
the number measures the loader and nothing else; ``--model real`` builds glmtune's own model class instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmtune.models.config import GLMConfig, preset

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the original tensor names and shapes -------------------------------------------------------------------------
def original_shapes(cfg: GLMConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """name -> shape in checkpoint order, and the tied names (checkpoint name -> name it duplicates)."""
    h, f, v, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size, cfg.head_dim
    s: dict[str, tuple[int, ...]] = {}
    if cfg.arch == "chatglm":
        s["transformer.embedding.word_embeddings.weight"] = (v, h)
        s["transformer.rotary_pos_emb.inv_freq"] = (hd // 4,)
        for i in range(cfg.num_layers):
            p = f"transformer.encoder.layers.{i}."
            s[p + "input_layernorm.weight"] = (h,)
            s[p + "self_attention.query_key_value.weight"] = (cfg.qkv_size, h)
            if cfg.add_qkv_bias:
                s[p + "self_attention.query_key_value.bias"] = (cfg.qkv_size,)
            s[p + "self_attention.dense.weight"] = (h, cfg.num_attention_heads * hd)
            s[p + "post_attention_layernorm.weight"] = (h,)
            s[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
            s[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        s["transformer.encoder.final_layernorm.weight"] = (h,)
        s["transformer.output_layer.weight"] = (v, h)
        return s, {}
    s["transformer.word_embeddings.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            s[p + norm + ".weight"] = (h,)
            s[p + norm + ".bias"] = (h,)
        s[p + "attention.rotary_emb.inv_freq"] = (hd // 4,)
        s[p + "attention.query_key_value.weight"] = (3 * h, h)
        s[p + "attention.query_key_value.bias"] = (3 * h,)
        s[p + "attention.dense.weight"] = (h, h)
        s[p + "attention.dense.bias"] = (h,)
        s[p + "mlp.dense_h_to_4h.weight"] = (f, h)
        s[p + "mlp.dense_h_to_4h.bias"] = (f,)
        s[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        s[p + "mlp.dense_4h_to_h.bias"] = (h,)
    s["transformer.final_layernorm.weight"] = (h,)
    s["transformer.final_layernorm.bias"] = (h,)
    s["lm_head.weight"] = (v, h)
    return s, {"lm_head.weight": "transformer.word_embeddings.weight"}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- writing the random checkpoint --------------------------------------------------------------------------------
def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, block: int = 1 << 22
) -> torch.Tensor:
    """Random N(0, 1) values, fast: one block drawn and repeated with a random offset per tensor (the loader does not
    care about the values, and drawing 6B normals on the CPU would dominate the benchmark's run time)."""
    t = torch.empty(shape, dtype=dtype)
    flat = t.view(-1)
    base = torch.randn(2 * block, generator=gen).to(dtype)
    offset = int(torch.randint(0, block, (1,), generator=gen))
    for start in range(0, flat.numel(), block):
        n = min(block, flat.numel() - start)
        flat[start : start + n].copy_(base[offset : offset + n])
    return t


def write_checkpoint(
    folder: Path, shapes: dict[str, tuple[int, ...]], fmt: str, dtype: torch.dtype, shard_bytes: int, seed: int
) -> list[Path]:
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = numel(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    files = []
    for i, names in enumerate(shards, 1):
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        fname = f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        part = {name: random_tensor(shapes[name], dtype, gen) for name in names}
        path = folder / fname
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)
        del part
        weight_map.update(dict.fromkeys(names, fname))
        files.append(path)
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(numel(s) * dtype.itemsize for s in shapes.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def drop_page_cache(files: list[Path]) -> None:
    """Evict the files from the page cache (no root needed), so the load reads from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the measuring child process ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def standin_model(shapes: dict[str, tuple[int, ...]], ties: dict[str, str]) -> torch.nn.Module:
    """A module tree with exactly the checkpoint's names, on meta; tied names share one parameter."""
    root = torch.nn.Module()
    made: dict[str, torch.nn.Parameter | torch.Tensor] = {}
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if name in ties:
            mod.register_parameter(leaf, made[ties[name]])  # type: ignore[arg-type]
        elif leaf == "inv_freq":
            mod.register_buffer(leaf, torch.empty(shape, device="meta"))
        else:
            made[name] = torch.nn.Parameter(torch.empty(shape, device="meta"))
            mod.register_parameter(leaf, made[name])
    return root


def naive_load(model: torch.nn.Module, model_dir: Path, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """For comparison: each shard read whole (safetensors load_file / torch.load), converted, then
    ``load_state_dict(assign=True)`` at the end."""
    from safetensors.torch import load_file

    from glmtune.models.checkpoint import checkpoint_files

    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        if path.suffix == ".safetensors":
            shard = load_file(str(path))
        else:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        state.update({k: v.to(device=device, dtype=dtype) for k, v in shard.items()})
        del shard
    model.load_state_dict(state, assign=True, strict=False)
    return sum(t.nbytes for t in state.values()), len(state)


def child(args: argparse.Namespace) -> None:
    from glmtune.models.checkpoint import load_weights

    cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    shapes, ties = original_shapes(cfg)
    rules: dict = {}
    if args.model == "real":
        from glmtune.models import build_model

        model = build_model(cfg, device="meta")
        rules = model.checkpoint_rules() if hasattr(model, "checkpoint_rules") else {}
    else:
        model = standin_model(shapes, ties)
    device = torch.device(args.device)
    baseline_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    if args.loader == "naive":
        num_bytes, tensors = naive_load(model, args.model_dir, DTYPES[args.dtype], device)
    else:
        report = load_weights(model, args.model_dir, dtype=DTYPES[args.dtype], device=device, **rules)
        num_bytes, tensors = report.num_bytes, len(report.loaded)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {
        "seconds": seconds,
        "baseline_rss_bytes": baseline_kb * 1024,
        "peak_rss_bytes": _status_kb("VmHWM") * 1024,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loaded_bytes": num_bytes,
        "tensors": tensors,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    print("RESULT " + json.dumps(out))


# ---- the driver -----------------------------------------------------------------------------------------------------
def run_one(args: argparse.Namespace, fmt: str, work: Path) -> dict:
    cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    shapes, ties = original_shapes(cfg)
    src_dtype = DTYPES[args.src_dtype]
    folder = work / f"{args.preset}-{cfg.num_layers}L-{fmt}"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = write_checkpoint(folder, shapes, fmt, src_dtype, int(args.shard_mb * 2**20), args.seed)
    write_s = time.perf_counter() - t0
    if args.cold:
        drop_page_cache(files)
    cmd = [
        sys.executable, __file__, "--child", "--model-dir", str(folder), "--preset", args.preset,
        "--layers", str(cfg.num_layers), "--dtype", args.dtype, "--device", args.device, "--model", args.model,
        "--loader", args.loader,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"loading process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line.removeprefix("RESULT "))
    unique = {n: s for n, s in shapes.items() if n not in ties}
    model_bytes = sum(numel(s) for s in unique.values()) * DTYPES[args.dtype].itemsize
    ckpt_bytes = sum(p.stat().st_size for p in files)
    row = {
        "preset": args.preset, "layers": cfg.num_layers, "format": fmt, "src_dtype": args.src_dtype,
        "dtype": args.dtype, "device": args.device, "model": args.model, "loader": args.loader, "shards": len(files),
        "largest_shard_bytes": max(p.stat().st_size for p in files), "checkpoint_bytes": ckpt_bytes,
        "model_bytes": model_bytes, "write_seconds": write_s, "cold_cache": args.cold, **res,
        "peak_over_model": res["peak_rss_bytes"] / model_bytes,
        "peak_minus_baseline_over_model": (res["peak_rss_bytes"] - res["baseline_rss_bytes"]) / model_bytes,
        "read_gb_per_s": ckpt_bytes / 1e9 / res["seconds"],
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }  # fmt: skip
    if not args.keep:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return row


def print_table(rows: list[dict]) -> None:
    gb = 1e9
    head = ["loader", "format", "layers", "src->dtype", "device", "shards", "model GB", "load s", "GB/s", "base GB",
            "peak GB", "peak/model", "(peak-base)/model"]  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append([
            r["loader"], r["format"], str(r["layers"]), f"{r['src_dtype']}->{r['dtype']}", r["device"],
            str(r["shards"]),
            f"{r['model_bytes'] / gb:.2f}", f"{r['seconds']:.2f}", f"{r['read_gb_per_s']:.2f}",
            f"{r['baseline_rss_bytes'] / gb:.2f}", f"{r['peak_rss_bytes'] / gb:.2f}", f"{r['peak_over_model']:.3f}",
            f"{r['peak_minus_baseline_over_model']:.3f}",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--layers", type=int, default=0, help="shrink to N layers (0: the preset's)")
    ap.add_argument("--format", nargs="+", choices=["safetensors", "bin"], default=["safetensors", "bin"])
    ap.add_argument("--src-dtype", choices=list(DTYPES), default="float16", help="dtype stored in the checkpoint")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype to load into")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["standin", "real"], default="standin")
    ap.add_argument(
        "--loader", choices=["glmtune", "naive"], default="glmtune", help="naive: whole shards + load_state_dict"
    )
    ap.add_argument("--shard-mb", type=float, default=1907.0, help="max shard size (default: the originals' ~2 GB)")
    ap.add_argument("--work-dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--warm", dest="cold", action="store_false", help="leave the files in the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="results file (default: bench/results/load_memory-*.json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="glmtune-loadbench-") as tmp:
        rows = [run_one(args, fmt, Path(tmp)) for fmt in args.format]
    print_table(rows)
    out = args.json or Path(__file__).parent / "results" / (
        f"load_memory-{args.preset}-{rows[0]['layers']}L-{args.dtype}-{args.device.replace(':', '')}-{args.loader}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
