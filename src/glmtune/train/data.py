"""Training data from the config: files -> samples -> encoded examples (cached) -> batches.

Order: the training units (examples, or packed rows of examples) are shuffled once per epoch by a permutation
that depends only on (seed, epoch). An optimizer step takes the next ``batch_size * grad_accum * world_size``
units of that permutation; micro-batch ``k`` of rank ``r`` is slice ``k * world_size + r`` of them. The batches of
step ``s`` are therefore a pure function of ``s`` (a resumed run sees exactly the batches it would have seen) and
one process with ``grad_accum * world_size`` micro-batches sees the same global batch as ``world_size`` processes.
A last incomplete global batch of an epoch is dropped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from glmtune.data.cache import cache_key, cached_encode
from glmtune.data.collate import PackedRow, collate, collate_packed, pack, position_kind
from glmtune.data.encode import encode_samples
from glmtune.data.messages import Sample
from glmtune.data.readers import ReadOptions, read_samples
from glmtune.templates import Encoded, EncodeOptions, Template
from glmtune.tokenizers.base import Tokenizer
from glmtune.train.config import DataConfig

log = logging.getLogger(__name__)

Unit = Encoded | PackedRow


def read_options(cfg: DataConfig) -> ReadOptions:
    return ReadOptions(format=cfg.format, columns=cfg.columns, source_prefix=cfg.source_prefix, role_tag=cfg.role_tag,
                       content_tag=cfg.content_tag, role_map=cfg.role_map, skip_bad=cfg.skip_bad)  # fmt: skip


def encode_options(cfg: DataConfig) -> EncodeOptions:
    return EncodeOptions(
        max_source_length=cfg.max_source_length,
        max_target_length=cfg.max_target_length,
        ignore_pad_token_for_loss=cfg.ignore_pad_token_for_loss,
        train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history,
        truncation=cfg.truncation,
    )


@dataclass
class Datasets:
    train: list[Encoded]
    dev: list[Encoded] = field(default_factory=list)
    dev_samples: list[Sample] = field(default_factory=list)  # for generation metrics


def _read_all(files: Sequence[str], opts: ReadOptions, limit: int | None) -> list[Sample]:
    samples: list[Sample] = []
    for f in files:
        got, report = read_samples(f, opts)
        log.info("%s", report.summary())
        samples += got
        if limit is not None and len(samples) >= limit:
            return samples[:limit]
    return samples


def load_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    template: Template,
    *,
    seed: int,
    cache_dir: str | Path | None,
) -> Datasets:
    """Read, split (``dev_split``) and encode the training and dev data; encoded examples are cached."""
    ropts, eopts = read_options(cfg), encode_options(cfg)
    train_samples = _read_all(cfg.train, ropts, cfg.max_samples)
    dev_samples: list[Sample] = []
    if cfg.dev:
        dev_samples = _read_all(cfg.dev, ropts, cfg.max_dev_samples)
    elif cfg.dev_split:
        order = list(range(len(train_samples)))
        random.Random(seed).shuffle(order)
        n_dev = max(1, round(cfg.dev_split * len(order)))
        if n_dev >= len(order):
            raise ValueError(f"data.dev_split={cfg.dev_split} leaves no training records of {len(order)}")
        held = set(order[:n_dev])
        dev_samples = [s for i, s in enumerate(train_samples) if i in held]
        train_samples = [s for i, s in enumerate(train_samples) if i not in held]
        if cfg.max_dev_samples is not None:
            dev_samples = dev_samples[: cfg.max_dev_samples]
    settings = {"read": asdict(ropts), "encode": asdict(eopts), "max_samples": cfg.max_samples,
                "max_dev_samples": cfg.max_dev_samples, "dev_split": cfg.dev_split, "seed": seed}  # fmt: skip

    def encoded(part: str, files: list[str], samples: list[Sample]) -> list[Encoded]:
        key = cache_key(files, tokenizer.files, template.name, {**settings, "part": part})
        examples, _hit = cached_encode(cache_dir, key, lambda: encode_samples(
            tokenizer, template, samples, eopts, skip_bad=cfg.skip_bad)[0])  # fmt: skip
        return examples

    train = encoded("train", cfg.train, train_samples)
    dev = encoded("dev", cfg.dev or cfg.train, dev_samples) if dev_samples else []
    log.info("training examples: %d, dev examples: %d", len(train), len(dev))
    return Datasets(train=train, dev=dev, dev_samples=dev_samples)


# ---- batches ------------------------------------------------------------------------------------------------
@dataclass
class Batcher:
    """Turns training units into the micro-batches of each optimizer step (see the module docstring)."""

    units: list[Unit]
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    pad_id: int
    positions: str  # "1d" | "2d"
    pad_side: str = "left"
    _perm: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.units) // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.units)))
        return self._perm[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step within the epoch) of 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def step_units(self, step: int, rank: int) -> list[list[Unit]]:
        """The ``grad_accum`` micro-batches (lists of units) of rank ``rank`` for 0-based optimizer step ``step``."""
        epoch, index = self.position(step)
        gb = self.global_batch
        idx = self.permutation(epoch)[index * gb : (index + 1) * gb]
        b, w = self.batch_size, self.world_size
        return [
            [self.units[i] for i in idx[(k * w + rank) * b : (k * w + rank + 1) * b]] for k in range(self.grad_accum)
        ]

    def collate(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        if units and isinstance(units[0], PackedRow):
            return collate_packed(units, pad_id=self.pad_id, positions=self.positions)
        return collate(units, pad_id=self.pad_id, pad_side=self.pad_side, positions=self.positions)


def make_units(examples: list[Encoded], *, packing: bool, pack_length: int | None) -> list[Unit]:
    """Packed rows of at most ``pack_length`` tokens (default: the longest example), or the examples themselves."""
    if not packing:
        return list(examples)
    longest = max(len(e.input_ids) for e in examples)
    budget = pack_length or longest
    if budget < longest:
        raise ValueError(
            f"data.pack_length={budget} is shorter than the longest training example ({longest} tokens); "
            "raise it, or lower data.max_source_length / data.max_target_length"
        )
    rows = pack(examples, budget)
    n_tokens = sum(len(e.input_ids) for e in examples)
    log.info("packed %d examples into %d rows of up to %d tokens (%.0f%% filled)", len(examples), len(rows),
             budget, 100.0 * n_tokens / (len(rows) * budget))  # fmt: skip
    return list(rows)


def make_batcher(
    examples: list[Encoded],
    *,
    cfg: DataConfig,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    seed: int,
    tokenizer: Tokenizer,
    template: Template,
) -> Batcher:
    units = make_units(examples, packing=cfg.packing, pack_length=cfg.pack_length)
    batcher = Batcher(units, batch_size, grad_accum, world_size, seed, pad_id=tokenizer.pad_id,
                      positions=position_kind(template.name), pad_side=template.pad_side)  # fmt: skip
    if batcher.steps_per_epoch < 1:
        what = "packed rows" if cfg.packing else "examples"
        raise ValueError(
            f"{len(units)} training {what} are fewer than one global batch of {batcher.global_batch} "
            f"(train.batch_size {batch_size} x train.grad_accum {grad_accum} x {world_size} processes); "
            "lower train.batch_size or train.grad_accum, or add data"
        )
    return batcher


def dev_batches(
    examples: list[Encoded], *, batch_size: int, rank: int, world_size: int, tokenizer: Tokenizer, template: Template
) -> list[dict[str, torch.Tensor]]:
    """This rank's dev batches: examples sorted by length (little padding), batch ``i`` on rank ``i % world``."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    kind = position_kind(template.name)
    return [
        collate([examples[i] for i in g], pad_id=tokenizer.pad_id, pad_side=template.pad_side, positions=kind)
        for j, g in enumerate(groups)
        if j % world_size == rank
    ]
