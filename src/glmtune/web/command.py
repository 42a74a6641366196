"""``glmtune web PATH``: chat with a model, run, checkpoint, PEFT adapter or P-Tuning folder in the browser;
``--adapter NAME=PATH`` adds LoRA adapters the page picks per conversation (as ``serve`` serves them).

Building the parser imports neither torch nor Gradio; ``run`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from glmtune.cli_options import (
    add_adapter_option,
    add_listen_options,
    add_model_options,
    add_model_path,
    check_device,
    load_model_with_adapters,
    parse_adapters,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860  # Gradio's


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="chat in the browser (a Gradio page on 127.0.0.1, the engine of `serve`)")
    add_model_path(p)
    add_listen_options(p, port=DEFAULT_PORT)
    p.add_argument("--system", default="", help="the system prompt the page starts with (ChatGLM3 and GLM-4)")
    p.add_argument("--temperature", type=float, default=0.95, help="the page's starting temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.7, help="the page's starting top p (default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="the page's starting reply limit (default 1024)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=8,
        help="replies generated at once (default 8; the KV cache holds this many conversations)",
    )
    add_adapter_option(p)
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2] (0 means greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    check_device(args.device)
    adapters = parse_adapters(args.adapter)  # a malformed --adapter fails before anything loads
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no telemetry, no version check

    from glmtune.serve.engine import Engine, Limits
    from glmtune.web.page import Sampling, build_page, launch_page

    pretrained, adapters, name = load_model_with_adapters(args, Path(args.model).resolve().name, adapters)
    engine = Engine(pretrained, model_name=name, adapters=adapters, limits=Limits(max_concurrent=args.max_concurrent))
    system_role = pretrained.template.system_role
    if args.system and not system_role:
        log.warning("%s has no system turn: --system is left out", pretrained.generation)
    title = f"glmtune · {name} ({pretrained.generation})"
    page = build_page(engine, title=title, system_prompt=system_role, max_total_tokens=engine.limits.max_total_tokens,
                      sampling=Sampling(args.temperature, args.top_p, args.max_new_tokens),
                      system=args.system if system_role else "")  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving the chat page on %s: anyone who can reach this port can use the model", args.host)
    log.info("chat page for %s on http://%s:%d (Ctrl-C stops)", args.model, args.host, args.port)
    try:
        engine.start()  # the KV cache is allocated now: a page that could not answer does not start
        launch_page(page, host=args.host, port=args.port)
    finally:
        engine.close()
    return 0
