"""``glmtune train CONFIG.yaml [key=value ...]`` and ``glmtune train --resume RUN_DIR [--force] [key=value ...]``.

Exit status: 0 done, 1 the run had to stop (a ``TrainError``: out of memory, non-finite losses, a full disk),
2 bad input, 130 stopped by Ctrl-C (after a checkpoint; the command to resume is printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  glmtune train examples/lora-chatglm3-adgen.yaml model=/models/chatglm3-6b
  glmtune train examples/ptuning-chatglm2-adgen.yaml model=/models/chatglm2-6b train.max_steps=500 output_dir=runs/pt
  glmtune train --resume runs/adgen-lora train.max_steps=6000
  torchrun --nproc-per-node 4 -m glmtune train examples/lora-chatglm3-adgen.yaml model=/models/chatglm3-6b
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m glmtune train examples/full-chatglm3-adgen-fsdp.yaml model=/models/chatglm3-6b   (on both machines)

Several processes: train.distributed auto|ddp|fsdp (auto: FSDP2 for full/freeze, DDP for adapters); train.batch_size
is per process. GLMTUNE_DIST_TIMEOUT (seconds, default 600): how long a collective waits for a silent peer.

Overrides are key=value with dotted keys (data.max_source_length=128, method.rank=16); values are read as YAML.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (LoRA, P-Tuning v2, freeze, full) from a YAML config",
        description="Fine-tune a ChatGLM model folder as a YAML config says; key=value arguments override it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="the training config (YAML); not with --resume")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.learning_rate=2e-2")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--check", action="store_true", help="check the config (keys, types, files) and exit")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even if the training data changed since the checkpoint")  # fmt: skip
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from glmtune.train.config import ConfigError, load_config, resume_config

    if args.force and not args.resume:
        raise ConfigError("--force only goes with --resume (to continue a run on changed training data)")
    overrides = list(args.overrides or [])
    if args.resume:
        if args.config is not None:
            if "=" not in args.config:
                raise ConfigError(f"--resume takes the run folder; do not pass a config file too ({args.config})")
            overrides.insert(0, args.config)  # the first override landed in the CONFIG slot
        cfg = resume_config(args.resume, overrides)
    else:
        if args.config is None:
            raise ConfigError("glmtune train needs a config file (CONFIG.yaml) or --resume RUN_DIR")
        cfg = load_config(args.config, overrides)
    if args.check:
        print(cfg.to_yaml(), end="")
        return 0
    from glmtune.cli_options import check_device

    check_device(cfg.train.device, "train.device")
    if os.environ.get("RANK", "0") != "0":  # rank 0 alone speaks
        logging.getLogger("glmtune").setLevel(logging.WARNING)

    from glmtune.train.interrupt import EXIT_CODE, TrainInterrupted
    from glmtune.train.loop import TrainError, train

    try:
        result = train(cfg, resume=bool(args.resume), force=args.force)
    except TrainError as e:
        log.error("%s", e)
        return 1
    except TrainInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:  # the second Ctrl-C
        if os.environ.get("RANK", "0") == "0":
            print("\nstopped by Ctrl-C; the last complete checkpoint is kept", file=sys.stderr)
        return EXIT_CODE
    if os.environ.get("RANK", "0") == "0":
        print(
            f"run folder: {result.run_dir}\nfinal model: {result.model_dir}\nloss curve: {result.run_dir / 'loss.png'}"
        )
    return 0
