"""``glmtune data inspect FILE --model DIR``: what a data file becomes for a model's template."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from glmtune.cli_options import GENERATION_CHOICES


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("data", help="look at training data the way glmtune encodes it")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = sub.add_parser(
        "inspect",
        help="detected format, counts, first samples with trained tokens marked, token-length statistics",
        description="Read a data file as training would: the detected format and counts, the first samples rendered "
        "with the trained (loss) tokens marked [[like this]] (green on a terminal), and prompt/response token-length "
        "statistics with how many samples the configured lengths would truncate.",
    )
    q.add_argument("file", help="JSON, JSONL, CSV or Parquet file")
    q.add_argument("--model", required=True, help="model folder (only its tokenizer files are read)")
    q.add_argument("--generation", choices=GENERATION_CHOICES, help="override detection")
    q.add_argument("--format", default="auto", help="data format (default: detected from the fields)")
    q.add_argument("--encoding", default="utf-8",
                   help="text encoding of a file without a byte-order mark (default utf-8; gb18030 for GBK files), "
                   "as data.encoding in training")  # fmt: skip
    q.add_argument("--prompt-column", help="field holding the prompt (the official prompt_column)")
    q.add_argument("--response-column", help="field holding the response (the official response_column)")
    q.add_argument("--history-column", help="field holding [[question, answer], ...] history")
    q.add_argument("--source-prefix", default="", help="text put before every prompt (the official source_prefix)")
    q.add_argument(
        "--max-source-length",
        type=int,
        help="prompt token budget (v3/GLM-4: max_input_length; default: the generation's official one)",
    )
    q.add_argument(
        "--max-target-length",
        type=int,
        help="response token budget (v3/GLM-4: max_output_length; default: the generation's official one)",
    )
    q.add_argument("--train-on-prompt", action="store_true")
    q.add_argument("--mask-history", action="store_true", help="train only the last assistant turn")
    q.add_argument("-n", "--samples", type=int, default=3, help="how many samples to render (default 3)")
    q.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    q.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from glmtune.data.inspect import inspect_data
    from glmtune.data.readers import ReadOptions
    from glmtune.templates import EncodeOptions, get_template
    from glmtune.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.model, args.generation)
    template = get_template(args.generation or tokenizer.generation)
    columns = {
        key: value
        for key, value in (
            ("prompt", args.prompt_column),
            ("response", args.response_column),
            ("history", args.history_column),
        )
        if value
    }
    fmt = "columns" if columns and args.format == "auto" else args.format
    read = ReadOptions(format=fmt, columns=columns or None, source_prefix=args.source_prefix, skip_bad=True,
                       encoding=args.encoding)  # fmt: skip
    src, tgt = template.official_lengths  # as training does when the lengths are not set
    encode = EncodeOptions(
        max_source_length=args.max_source_length if args.max_source_length is not None else src,
        max_target_length=args.max_target_length if args.max_target_length is not None else tgt,
        train_on_prompt=args.train_on_prompt,
        mask_history=args.mask_history,
    )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    report = inspect_data(
        args.file, tokenizer, template, read_options=read, options=encode, n_samples=args.samples, color=color
    )
    sys.stdout.write(report + "\n")
    return 0
