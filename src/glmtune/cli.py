"""The glmtune command line. Thin: parse, build objects, call."""

from __future__ import annotations

import argparse
import logging
import sys

from glmtune import __version__
from glmtune.cli_options import (
    add_model_options,
    add_model_path,
    add_sampling_options,
    check_device,
    generation_config,
    load_model_from_args,
)


def cmd_chat(args: argparse.Namespace) -> int:
    from glmtune.chat import ChatSession, line_reader, run_terminal_chat

    gen = generation_config(args)
    check_device(args.device)
    pretrained = load_model_from_args(args)
    session = ChatSession(pretrained, gen, system=args.system, postprocess=not args.raw)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        for piece in session.reply_stream(args.prompt):
            write(piece)
        write("\n")
        return 0
    run_terminal_chat(session, line_reader(), write)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from glmtune.demo import run_demo

    run_demo(args.out, seed=args.seed, steps=args.steps, pretrain_steps=args.pretrain_steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmtune",
        description="Fine-tune, evaluate, chat with and export ChatGLM models "
        "(ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat) from their original model folders.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"glmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="streaming chat in the terminal (or one answer with --prompt)")
    add_model_path(p)
    p.add_argument("--prompt", help="answer this one message, print the reply and exit")
    p.add_argument("--system", help="system prompt (ChatGLM3 and GLM-4)")
    p.add_argument("--raw", action="store_true", help="show replies without the generation's original clean-up")
    add_model_options(p)
    add_sampling_options(p, max_new_tokens=1024, seed=None)
    p.set_defaults(func=cmd_chat)

    from glmtune.data.command import add_parser as add_data_parser
    from glmtune.evaluate.command import add_parser as add_eval_parser
    from glmtune.merge_command import add_parser as add_adapter_parsers
    from glmtune.quantize_command import add_parser as add_quantize_parser
    from glmtune.serve.command import add_parser as add_serve_parser
    from glmtune.train.command import add_parser as add_train_parser
    from glmtune.web.command import add_parser as add_web_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_adapter_parsers(sub)
    add_quantize_parser(sub)
    add_data_parser(sub)
    add_serve_parser(sub)
    add_web_parser(sub)

    p = sub.add_parser("demo", help="the whole pipeline on a tiny built-in model, on the CPU")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's model and run (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=120, help="LoRA training steps (default 120)")
    p.add_argument("--pretrain-steps", type=int, default=150, help="steps of the base model's pre-training (150)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as e:  # our errors name the file and field; no traceback for those
        if args.verbose:
            raise
        print(f"glmtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
