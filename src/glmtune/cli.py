"""The glmtune command line. Thin: parse, build objects, call."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument(
        "--generation",
        choices=["chatglm", "chatglm2", "chatglm3", "glm4"],
        help="override the generation detected from the model folder (ChatGLM2 and 3 share one architecture)",
    )


def _add_generation_args(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.95)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _generation_config(args: argparse.Namespace):
    from glmtune.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    from glmtune.chat import ChatSession, run_terminal_chat
    from glmtune.runs import load_for_inference

    pretrained = load_for_inference(
        args.model, dtype=args.dtype, device=args.device, generation=args.generation, base=args.base
    )
    session = ChatSession(pretrained, _generation_config(args), system=args.system, postprocess=not args.raw)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.prompt is not None:
        for piece in session.reply_stream(args.prompt):
            write(piece)
        write("\n")
        return 0
    run_terminal_chat(session, input, write)
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="streaming chat in the terminal (or one answer with --prompt)")
    p.add_argument(
        "model",
        help="a model folder in the original layout, a run folder, a checkpoint, a PEFT adapter or P-Tuning folder",
    )
    p.add_argument("--base", help="base model folder for an adapter or P-Tuning folder that does not name one")
    p.add_argument("--prompt", help="answer this one message, print the reply and exit")
    p.add_argument("--system", help="system prompt (ChatGLM3 and GLM-4)")
    p.add_argument("--raw", action="store_true", help="show replies without the generation's original clean-up")
    _add_model_args(p)
    _add_generation_args(p, max_new_tokens=1024)
    p.set_defaults(func=cmd_chat)

    from glmtune.adapters.command import add_parser as add_adapter_parsers
    from glmtune.data.command import add_parser as add_data_parser
    from glmtune.evaluate.command import add_parser as add_eval_parser
    from glmtune.train.command import add_parser as add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_adapter_parsers(sub)
    add_data_parser(sub)

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
