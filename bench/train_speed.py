"""Training speed and peak GPU memory of `glmtune train` on a ChatGLM3-6B-shaped model with random weights.

Writes a model folder (random bf16 weights in the original layout, a small SentencePiece tokenizer trained here,
the real 65,024-token embedding/output sizes) and an ADGEN-like dataset (product tags -> advertising copy), then runs
the real training loop for each setting and reads tokens/s (real tokens only, padding not counted) from the run's
metrics.jsonl, skipping the first log window (warm-up). Side by side: packing (glmtune's default) against dynamic
padding, and LoRA against P-Tuning v2.

    PYTHONPATH=src python3 bench/train_speed.py --steps 30 --json train-h100.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from glmtune.demo_data import corpus_lines, make_dataset
from glmtune.models import build_model
from glmtune.models.checkpoint import save_pretrained
from glmtune.models.config import preset
from glmtune.tiny import make_tiny_model_dir
from glmtune.train.config import load_config
from glmtune.train.loop import train

SETTINGS = {
    "lora-packed": ["method.name=lora", "data.packing=true", "train.learning_rate=3e-4"],
    "lora-padded": ["method.name=lora", "data.packing=false", "train.learning_rate=3e-4"],
    "ptuning-packed": [
        "method.name=ptuning",
        "method.pre_seq_len=128",
        "data.packing=true",
        "train.learning_rate=2e-2",
    ],  # fmt: skip
}


def write_model(folder: Path, preset_name: str, device: torch.device) -> None:
    """A full-size random model folder: tokenizer from a tiny folder, weights random N(0, 0.02) in bf16."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model_dir(Path(tmp) / "tiny", corpus_lines(seed=0), generation="chatglm3")
        tok = json.loads((tiny / "config.json").read_text())
        cfg = preset(preset_name)
        cfg = cfg.replace(eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"], torch_dtype="bfloat16",
                          padded_vocab_size=max(cfg.padded_vocab_size, tok["padded_vocab_size"]))  # fmt: skip
        model = build_model(cfg, device="meta", generation="chatglm3")
        model.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            model.transformer.rotary_pos_emb.inv_freq.copy_(
                1.0 / (10000 ** (torch.arange(0, cfg.head_dim // 2, 2, dtype=torch.float32) / (cfg.head_dim // 2)))
            )
        model.to(torch.bfloat16)
        save_pretrained(model, cfg, folder, tokenizer_files=[tiny / "tokenizer.model", tiny / "tokenizer_config.json"])
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        write_model(work / "model", args.preset, device)
        print(f"wrote the random model folder in {time.perf_counter() - t:.1f}s", flush=True)
        data = work / "train.json"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_dataset(args.records, seed=1)))
        for name in args.settings:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run = work / f"run-{name}"
            cfg = load_config(None, [
                f"model={work / 'model'}", f"output_dir={run}", f"data.train={data}", "data.max_source_length=64",
                "data.max_target_length=128", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                "train.precision=bf16" if device.type == "cuda" else "train.precision=fp32", "train.warmup_steps=0",
                "log.every_steps=5", "log.progress=false", "log.plot=false", "log.tensorboard=false",
                f"save.every_steps={args.steps * 10}", *SETTINGS[name],
            ])  # fmt: skip
            t = time.perf_counter()
            result = train(cfg)
            wall = time.perf_counter() - t
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            windows = [x["tokens_per_s"] for x in lines if x.get("split") == "train" and "tokens_per_s" in x]
            steady = windows[1:] or windows
            row = {
                "setting": name, "steps": result.steps, "batch_size": args.batch_size,
                "tokens_per_s": sum(steady) / len(steady), "windows": windows, "wall_s": wall,
                "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "preset": args.preset}  # fmt: skip
    print("| setting | batch | real tokens/s | peak GPU GB | loss first -> last |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        peak = f"{r['peak_gpu_bytes'] / 1e9:.1f}" if r["peak_gpu_bytes"] else "-"
        print(f"| {r['setting']} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | {peak} | "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
