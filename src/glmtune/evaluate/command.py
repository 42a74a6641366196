"""``glmtune eval RUN_OR_MODEL --data dev.json``: generate for the dev set, score ROUGE/BLEU, write metrics.json."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from glmtune.cli_options import (
    add_model_options,
    add_sampling_options,
    check_device,
    generation_config,
    load_model_from_args,
)
from glmtune.data.readers import FORMATS
from glmtune.evaluate.metrics import check_bleu_kinds, compute_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SETTINGS_FILE = "eval_config.json"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="generate on a dev set and score ROUGE-1/2/L and BLEU-4",
        description="Generate a reply for every dev example (batched, KV cache) into generated_predictions.jsonl, "
        "then score ROUGE-1/2/L (jieba words) and BLEU-4 as the official THUDM scripts do, into metrics.json. "
        "Rerunning with the same output folder continues an interrupted run.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="a run folder, checkpoint, adapter or model folder")
    p.add_argument("--data", required=True, help="dev file (JSON, JSONL, CSV or Parquet)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="data format (default: detected)")
    p.add_argument("--out", help="output folder (default: RUN/eval for a run folder, else eval/<model folder name>)")
    p.add_argument("--base", help="base model folder for an adapter or P-Tuning folder")
    p.add_argument("--batch-size", type=int, default=16)
    add_sampling_options(p, max_new_tokens=512, seed=0,
                         greedy_help="greedy decoding (default: sampling, as the official eval scripts)")  # fmt: skip
    p.add_argument("--max-source-length", type=int, help="cut prompts to this many tokens, as the official scripts")
    p.add_argument("--bleu", type=_bleu_list, default=("char",), metavar="char|word[,...]",
                   help="BLEU-4 definitions, comma-separated: char (ChatGLM-6B/ChatGLM2, the default), word "
                   "(ChatGLM3/GLM-4); the first is reported as bleu-4, the others as bleu-4-<kind>")  # fmt: skip
    p.add_argument("--decode", default="auto", choices=["auto", "eager", "graph", "compiled"],
                   help="decode step: auto (a CUDA graph on GPUs), eager, graph, or compiled (torch.compile before the "
                   "graph: faster per token, ~1 min of compiling per batch shape; for long evaluations)")  # fmt: skip
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--overwrite", action="store_true", help="start over instead of continuing an earlier run")
    add_model_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)


def _bleu_list(text: str) -> tuple[str, ...]:
    try:
        return check_bleu_kinds([k.strip() for k in text.split(",") if k.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_out_dir(model: str | Path) -> Path:
    model = Path(model)
    if (model / "run.json").is_file():
        return model / "eval"
    return Path("eval") / model.resolve().name


def _settings(args: argparse.Namespace, gen: Any) -> dict[str, Any]:
    """What the predictions depend on; an earlier run in the same folder must have used the same."""
    return {
        "model": str(Path(args.model).resolve()),
        "base": str(Path(args.base).resolve()) if args.base else None,
        "data": str(Path(args.data).resolve()),
        "format": args.format,
        "max_source_length": args.max_source_length,
        "generation": args.generation,
        "gen": asdict(gen),
    }


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    from glmtune.evaluate.predict import PREDICTIONS_FILE

    path = out / SETTINGS_FILE
    if not path.is_file() or not (out / PREDICTIONS_FILE).exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({e}); use --overwrite to start over") from None
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        raise ValueError(f"{path}: an earlier run in {out} used other settings ({', '.join(changed)}); "
                         "use --overwrite to start over, or another --out")  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    from glmtune.data.encode import eval_examples
    from glmtune.data.readers import ReadOptions, read_samples
    from glmtune.evaluate.predict import PREDICTIONS_FILE, predict_to_file
    from glmtune.io import atomic_write_text
    from glmtune.templates import EncodeOptions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    gen = generation_config(args)
    check_device(args.device)
    out = Path(args.out) if args.out else default_out_dir(args.model)
    settings = _settings(args, gen)
    if args.overwrite:
        for name in (PREDICTIONS_FILE, METRICS_FILE, SETTINGS_FILE):
            (out / name).unlink(missing_ok=True)
    else:
        _check_settings(out, settings)

    samples, report = read_samples(args.data, ReadOptions(format=args.format))
    log.info("%s", report.summary())
    pretrained = load_model_from_args(args)
    examples = eval_examples(pretrained.tokenizer, pretrained.template, samples,
                             EncodeOptions(max_source_length=args.max_source_length))  # fmt: skip
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise ValueError(f"{args.data}: no evaluation examples (a record needs a user turn followed by a reply)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), unit="ex", desc="eval", disable=args.no_progress, file=sys.stderr)
    start = time.perf_counter()
    try:
        preds = predict_to_file(
            pretrained.model, pretrained.tokenizer, pretrained.template, examples, gen, out / PREDICTIONS_FILE,
            batch_size=args.batch_size, on_batch=lambda batch: bar.update(len(batch)), on_resume=bar.update,
            decode=args.decode,
        )  # fmt: skip
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics = compute_metrics([p.prediction for p in preds], [p.label for p in preds], args.bleu)
    result = {
        **metrics.as_dict(),
        "model": settings["model"],
        "data": settings["data"],
        "template": pretrained.template.name,
        "generation_config": settings["gen"],
        "predictions": str((out / PREDICTIONS_FILE).resolve()),
        "seconds": round(seconds, 2),
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.write(metrics.table() + "\n")
    sys.stdout.write(f"wrote {out / PREDICTIONS_FILE} and {out / METRICS_FILE}\n")
    return 0
