"""``glmtune quantize MODEL OUT --bits 4|8``: write a model folder in THUDM's INT4/INT8 format (``models/quant.py``),
shard by shard, in the original layout."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from glmtune.cli_options import add_out_dir

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a model folder in THUDM's INT4/INT8 format (what chatglm-6b-int4 ships)",
        description="Write OUT_DIR: the model's block linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) "
        "as int8 weights with a per-row fp16 weight_scale, everything else as it is, config.json with "
        "quantization_bit, and the tokenizer files. glmtune chat/eval load it as it is. Works shard by shard.",
    )
    p.add_argument("source", metavar="MODEL", help="a full-precision model folder in the original layout")
    add_out_dir(p)
    p.add_argument("--bits", type=int, required=True, choices=[4, 8], help="4 (two values per byte) or 8")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    out = quantize_folder(args.source, args.out_dir, args.bits, overwrite=args.overwrite)
    log.info("INT%d model written to %s", args.bits, out)
    return 0


def quantize_folder(model_dir: str | Path, out_dir: str | Path, bits: int, *, overwrite: bool = False) -> Path:
    """Write ``out_dir``: ``model_dir`` with its block linears in THUDM's INT``bits`` format, atomically; one shard of
    the output is held on the host at a time."""
    from glmtune.io import atomic_write_dir
    from glmtune.merge import _check_out_dir, _copy_side_files
    from glmtune.models.checkpoint import DEFAULT_MAX_SHARD_BYTES, ShardWriter, checkpoint_files, iter_checkpoint
    from glmtune.models.config import GLMConfig
    from glmtune.models.quant import QUANTIZED_WEIGHT, check_bits, config_bits, quantize_weight

    start = time.perf_counter()
    check_bits(bits)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config_path = model_dir / "config.json"
    config = GLMConfig.from_json(config_path)
    if stored := config_bits(config, config_path):
        raise ValueError(f"{config_path}: the weights are quantized already (quantization_bit {stored})")
    _check_out_dir(out_dir, [model_dir], overwrite)
    raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    checkpoint_files(model_dir)  # a clear error for a folder without weights

    def fill(tmp: Path) -> None:
        n = 0
        with ShardWriter(tmp, DEFAULT_MAX_SHARD_BYTES) as writer:
            for name, t, _file in iter_checkpoint(model_dir):
                if QUANTIZED_WEIGHT.match(name) and t.is_floating_point():
                    q, scale = quantize_weight(t, bits)
                    writer.add(name, q)
                    writer.add(name + "_scale", scale)
                    n += 1
                else:
                    writer.add(name, t.clone())
                del t
            if n == 0:
                raise ValueError(f"{model_dir}: no block linear weights to quantize")
            writer.finish()
        (tmp / "config.json").write_text(
            json.dumps({**raw_config, "quantization_bit": bits}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _copy_side_files(model_dir, tmp, skip={"config.json"})

    atomic_write_dir(out_dir, fill)
    log.info("quantized %s to INT%d -> %s in %.1fs", model_dir, bits, out_dir, time.perf_counter() - start)
    return out_dir
