"""``glmtune serve PATH``: the OpenAI-compatible API over a model, run, checkpoint, PEFT adapter or P-Tuning folder.

Building the parser imports neither torch nor FastAPI; ``run`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from glmtune.cli_options import add_model_options, check_device, load_model_from_args

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions) on 127.0.0.1")
    p.add_argument(
        "model",
        help="a model folder in the original layout, a run folder, a checkpoint, a PEFT adapter or P-Tuning folder",
    )
    p.add_argument("--base", help="base model folder for an adapter or P-Tuning folder that does not name one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("GLMTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLMTUNE_API_KEY)")  # fmt: skip
    p.add_argument("--model-name", help="the model's id in the API (default: the folder's name)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    import uvicorn

    from glmtune.serve.app import create_app

    pretrained = load_model_from_args(args)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(pretrained, model_name=name, api_key=args.api_key or None)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    log.info("serving %s as %r on http://%s:%d/v1", args.model, name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
