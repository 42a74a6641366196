"""``glmtune merge RUN_OR_ADAPTER OUT_DIR`` and ``glmtune export RUN OUT_DIR``: ship a LoRA as a complete checkpoint,
a P-Tuning prefix in the official layout."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from glmtune.cli_options import add_out_dir

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Add ``merge`` and ``export``."""
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model: a complete checkpoint in the original format",
        description="Write OUT_DIR: the base model's weights with the LoRA updates folded in (safetensors shards and "
        "index), its config.json, tokenizer and other files, loadable by glmtune and by the original code. Works "
        "shard by shard, so the host needs little more memory than one shard.",
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER", help="a LoRA run folder, one of its checkpoints, or a PEFT "
                   "adapter folder")  # fmt: skip
    add_out_dir(p)
    p.add_argument("--base", help="base model folder (default: the run's base_model, or the adapter's "
                   "base_model_name_or_path when that is a local folder)")  # fmt: skip
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default: that of the base checkpoint)")  # fmt: skip
    p.add_argument("--bits", type=int, choices=[4, 8],
                   help="write the block linears in THUDM's INT4/INT8 format (what `glmtune quantize` writes); "
                   "default: full precision")  # fmt: skip
    p.add_argument("--base-quantize", choices=["none", "int8", "int4", "nf4"],
                   help="the quantization the adapter was trained over (default: the run's `quantize`; none for an "
                   "adapter folder without a run): the merge adds the adapter to that dequantized base")  # fmt: skip
    p.set_defaults(func=run_merge)

    p = subparsers.add_parser(
        "export",
        help="write a P-Tuning v2 run's prefix in the layout the official demos load",
        description="Write OUT_DIR with the base model's config.json carrying pre_seq_len/prefix_projection, "
        "pytorch_model.bin holding only transformer.prefix_encoder.*, and the tokenizer files (--format official, "
        "the ChatGLM-6B/ChatGLM2 P-Tuning demos); or a PEFT PREFIX_TUNING adapter, adapter_config.json + "
        "adapter_model.safetensors (--format peft, what GLM-4's official finetune and inference scripts use; "
        "ChatGLM2 and later).",
    )
    p.add_argument("source", metavar="RUN", help="a P-Tuning run folder, one of its checkpoints, or a prefix folder "
                   "(official or PEFT)")  # fmt: skip
    add_out_dir(p)
    p.add_argument("--base", help="base model folder (default: the run's base_model)")
    p.add_argument("--format", default="official", choices=["official", "peft"],
                   help="official prefix-only checkpoint (default) or PEFT PREFIX_TUNING adapter")  # fmt: skip
    p.set_defaults(func=run_export)


def run_merge(args: argparse.Namespace) -> int:
    from glmtune.merge import merge_lora_to_checkpoint
    from glmtune.runs import resolve

    r = resolve(args.source, base=args.base)
    if r.kind != "lora":
        what = "a P-Tuning prefix (ship it with `glmtune export`)" if r.kind == "ptuning" else (
            "a complete model already (nothing to merge)")  # fmt: skip
        raise ValueError(f"{args.source}: holds {what}")
    assert r.base_dir is not None
    trained_on, quant_dtype = _trained_quantization(r.run_dir, args.base_quantize)
    out = merge_lora_to_checkpoint(r.base_dir, r.result_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                                   trained_on=trained_on, quant_dtype=quant_dtype, bits=args.bits)  # fmt: skip
    log.info("merged model written to %s", out)
    return 0


def _trained_quantization(run_dir: Path | None, given: str | None) -> tuple[str, Any]:
    """The run's ``quantize`` (or ``given``) and the dtype its base was loaded in (NF4 quantizes in that dtype)."""
    import torch

    from glmtune.pretrained import DTYPES

    if run_dir is None or not (run_dir / "config.yaml").is_file():  # a bare adapter, or a run without its config
        return given or "none", torch.float32
    from glmtune.runs import read_run
    from glmtune.train.config import load_config

    saved = load_config(run_dir / "config.yaml", check_files=False).quantize
    if given is not None and given != saved:
        log.warning("--base-quantize %s: the run %s was trained with quantize: %s", given, run_dir, saved)
    dtype = DTYPES.get(str(read_run(run_dir).get("dtype")), torch.float32)
    return given or saved, dtype


def run_export(args: argparse.Namespace) -> int:
    from glmtune.merge import export_ptuning

    out = export_ptuning(args.source, args.out_dir, base=args.base, overwrite=args.overwrite, format=args.format)
    log.info("P-Tuning checkpoint written to %s", out)
    return 0
