"""Shared pieces of the training tests: tiny model folders and small configs."""

from __future__ import annotations

from pathlib import Path

from glmtune.data.readers import read_samples
from glmtune.demo_data import corpus_lines
from glmtune.tiny import make_tiny_model_dir
from glmtune.train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
ADGEN = REPO / "examples" / "data" / "adgen.json"
ADGEN_DEV = REPO / "examples" / "data" / "adgen.csv"


def sample_lines() -> list[str]:
    """Text of the example data files, to train tiny tokenizers that cut them into few tokens."""
    lines = corpus_lines(100)
    for f in ("adgen.json", "alpaca.json"):
        for rec in read_samples(REPO / "examples" / "data" / f)[0]:
            lines += [m.content for m in rec.messages]
    return lines


def tiny_model(root: Path, generation: str = "chatglm3") -> Path:
    """A tiny model folder of ``generation`` under ``root`` (built once per root)."""
    path = root / f"tiny-{generation}"
    if not (path / "config.json").is_file():
        vocab = 500 if generation == "glm4" else 1200  # (GLM-4's byte BPE is trained in Python: keep it small)
        make_tiny_model_dir(path, sample_lines(), generation=generation, vocab_size=vocab, seed=0)
    return path


def small_config(model: Path, out: Path, *overrides: str) -> TrainConfig:
    """A fast config: ADGEN sample data, short lengths, no progress bar; ``overrides`` as on the command line."""
    base = [
        f"model={model}",
        f"output_dir={out}",
        f"data.train={ADGEN}",
        "data.max_source_length=32",
        "data.max_target_length=32",
        "data.max_samples=24",
        "train.batch_size=2",
        "train.learning_rate=1e-2",
        "train.max_steps=6",
        "log.every_steps=1",
        "log.progress=false",
        "log.tensorboard=false",
        "log.plot=false",
        "method.name=lora",
        "train.precision=fp32",  # exact comparisons; also on a GPU machine, where auto would pick bf16
    ]
    return load_config(None, [*base, *overrides])


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    from glmtune.train.metrics import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def run(cfg: TrainConfig, **kw):
    from glmtune.train.loop import train

    return train(cfg, **kw)
