"""Dev loss of a trained LoRA run over its base loaded full precision, int8, int4 and nf4 (issue 12's "on the demo's
tuned model, dev loss with an INT4 base within 5 % of bf16"), on the CPU, with the trainer's own pieces: the run's
config, ``Trainer.load_model`` (``quantize``), the trained adapter loaded into it, the trainer's dev batches and
``evaluate_loss``.

    .venv/bin/glmtune demo --out /tmp/qdemo
    PYTHONPATH=src .venv/bin/python bench/quant_demo_loss.py /tmp/qdemo/run-lora
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path


def dev_loss(run_dir: Path, quantize: str) -> float:
    from glmtune.runs import resolve
    from glmtune.train.config import load_config
    from glmtune.train.distributed import DistInfo
    from glmtune.train.evaluation import evaluate_loss
    from glmtune.train.loop import Trainer

    cfg = load_config(run_dir / "config.yaml", check_files=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, quantize=quantize, output_dir=tmp)
        cfg.data.cache_dir = str(Path(tmp) / "tokenized")
        trainer = Trainer(cfg, DistInfo())
        trainer.load_model()  # Trainer.setup's steps, up to the optimizer (no run folder written)
        trainer.method.load(trainer.model, resolve(run_dir).result_dir)
        trainer.distribute()
        trainer.compile()
        trainer.load_data()
        trainer.build_optimization()
        return evaluate_loss(trainer.net, trainer.dev, trainer.info, trainer.autocast)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a LoRA run folder with a dev set (glmtune demo's run-lora)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    losses = {q: dev_loss(args.run, q) for q in ("none", "int8", "int4", "nf4")}
    print("| base | dev loss | vs full precision |\n|---|---:|---:|")  # noqa: T201 - the report
    for q, loss in losses.items():
        print(f"| {q} | {loss:.4f} | {loss / losses['none'] - 1:+.2%} |")  # noqa: T201
    return losses


if __name__ == "__main__":
    main()
