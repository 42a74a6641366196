"""``glmtune serve PATH``: the OpenAI-compatible API over a model, run, checkpoint, PEFT adapter or P-Tuning folder.

Building the parser imports neither torch nor FastAPI; ``run`` does.
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions) on 127.0.0.1")
    add_model_path(p)
    add_listen_options(p, port=8000)
    p.add_argument("--api-key", default=os.environ.get("GLMTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLMTUNE_API_KEY)")  # fmt: skip
    p.add_argument("--model-name", help="the model's id in the API (default: the folder's name)")
    add_adapter_option(p)
    g = p.add_argument_group("limits")
    g.add_argument("--max-concurrent", type=int, help="requests generating at once, one batch row each (default 64 "
                   "on CUDA, 8 on the CPU)")  # fmt: skip
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a row; beyond, 429 (default 256)")  # fmt: skip
    g.add_argument("--max-total-tokens", type=int, help="prompt + reply tokens per request (default: the model's "
                   "context, at most 8192); sizes the KV cache")  # fmt: skip
    g.add_argument("--max-prompt-tokens", type=int, help="prompt tokens per request (default: max-total-tokens - 1)")
    g.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request may wait for a row before it gets 503 (default 300)")  # fmt: skip
    g.add_argument("--prefill-tokens", type=int,
                   help="prompt tokens prefilled between decode steps (default 2048 on CUDA, 256 on the CPU): lower "
                   "keeps running streams smoother, higher starts new ones sooner")  # fmt: skip
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body size (default 4 MiB)")
    p.add_argument("--decode", default="auto", choices=("auto", "eager", "graph", "compiled"),
                   help="decode step: auto (a CUDA graph on CUDA, else eager), eager, graph, compiled")  # fmt: skip
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    adapters = parse_adapters(args.adapter)  # a malformed --adapter fails before anything loads
    import uvicorn

    from glmtune.serve.app import create_app
    from glmtune.serve.engine import Limits

    name = args.model_name or Path(args.model).resolve().name
    pretrained, adapters, name = load_model_with_adapters(args, name, adapters)
    limits = Limits(max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                    max_total_tokens=args.max_total_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    queue_timeout=args.queue_timeout, prefill_tokens=args.prefill_tokens)  # fmt: skip
    app = create_app(pretrained, model_name=name, api_key=args.api_key or None, adapters=adapters, limits=limits,
                     max_body_bytes=args.max_body_bytes, decode=args.decode)  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    log.info("serving %s on http://%s:%d/v1", ", ".join(repr(n) for n in app.state.engine.names), args.host,
             args.port)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
