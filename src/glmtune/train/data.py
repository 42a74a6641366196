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
from glmtune.data.dropped import Dropped, write_dropped
from glmtune.data.encode import EncodeReport, encode_samples, fit_lengths, log_encode_report
from glmtune.data.messages import Sample
from glmtune.data.readers import ReadOptions, read_samples
from glmtune.templates import Encoded, EncodeOptions, Template
from glmtune.tokenizers.base import Tokenizer
from glmtune.train.config import DataConfig

log = logging.getLogger(__name__)

Unit = Encoded | PackedRow


def read_options(cfg: DataConfig) -> ReadOptions:
    return ReadOptions(format=cfg.format, columns=cfg.columns, source_prefix=cfg.source_prefix, role_tag=cfg.role_tag,
                       content_tag=cfg.content_tag, role_map=cfg.role_map, skip_bad=cfg.skip_bad,
                       encoding=cfg.encoding)  # fmt: skip


def encode_options(cfg: DataConfig, template: Template | None = None) -> EncodeOptions:
    """The encoding options of ``cfg``; unset lengths are ``template``'s official ones (no template: no limit)."""
    src, tgt = template.official_lengths if template is not None else (None, None)
    return EncodeOptions(
        max_source_length=cfg.max_source_length if cfg.max_source_length is not None else src,
        max_target_length=cfg.max_target_length if cfg.max_target_length is not None else tgt,
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
    dropped: list[Dropped] = field(default_factory=list)  # records left out when reading or encoding


def _read_all(files: Sequence[str], opts: ReadOptions, limit: int | None, dropped: list[Dropped]) -> list[Sample]:
    samples: list[Sample] = []
    for f in files:
        got, report = read_samples(f, opts)
        if not report.dropped:  # else read_samples warned, naming the first records left out
            log.info("%s", report.summary())
        dropped += report.dropped
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
    max_length: int | None = None,
    run_dir: str | Path | None = None,
) -> Datasets:
    """Read, split (``dev_split``) and encode the training and dev data; encoded examples are cached.

    Unset lengths are the template's official ones; ``max_length`` (the model's ``seq_length``) caps every
    example and ``data.pack_length``. The records left out are logged and, with ``run_dir``, all listed in
    ``run_dir/dropped_samples.jsonl``.
    """
    if max_length is not None and cfg.pack_length is not None and cfg.pack_length > max_length:
        raise ValueError(f"data.pack_length={cfg.pack_length} is longer than the model's seq_length {max_length} "
                         f"(config.json): set data.pack_length to at most {max_length}, or leave it unset")  # fmt: skip
    ropts, eopts = read_options(cfg), encode_options(cfg, template)
    if max_length is not None:
        eopts = fit_lengths(eopts, max_length)
    dropped: list[Dropped] = []
    train_samples = _read_all(cfg.train, ropts, cfg.max_samples, dropped)
    dev_samples: list[Sample] = []
    if cfg.dev:
        dev_samples = _read_all(cfg.dev, ropts, cfg.max_dev_samples, dropped)
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
                "max_dev_samples": cfg.max_dev_samples, "dev_split": cfg.dev_split, "seed": seed,
                "max_length": max_length}  # fmt: skip

    def build(samples: list[Sample]) -> tuple[list[Encoded], dict]:
        examples, report = encode_samples(tokenizer, template, samples, eopts, skip_bad=cfg.skip_bad,
                                          max_length=max_length)  # fmt: skip
        notes = {"total": report.total, "dropped": [[d.where, d.reason] for d in report.dropped],
                 "truncated": report.truncated}  # fmt: skip
        return examples, notes

    def encoded(part: str, files: list[str], samples: list[Sample]) -> list[Encoded]:
        key = cache_key(files, tokenizer.files, template.name, {**settings, "part": part})
        examples, notes, hit = cached_encode(cache_dir, key, lambda: build(samples))
        report = EncodeReport(total=notes.get("total", len(samples)), truncated=notes.get("truncated", []),
                              dropped=[Dropped(w, r) for w, r in notes.get("dropped", [])])  # fmt: skip
        if hit:  # the run that encoded them logged this already; say it again for this run's log
            log_encode_report(report, eopts, max_length)
        dropped.extend(report.dropped)
        return examples

    train = encoded("train", cfg.train, train_samples)
    dev = encoded("dev", cfg.dev or cfg.train, dev_samples) if dev_samples else []
    log.info("training examples: %d, dev examples: %d", len(train), len(dev))
    if run_dir is not None:
        write_dropped(run_dir, dropped)
    return Datasets(train=train, dev=dev, dev_samples=dev_samples, dropped=dropped)


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
    pad_side: str = "right"  # right-padded rows of one sample need no mask (the causal fast path)
    pad_to: int | None = None  # packed rows: every row padded to this width (fixed shapes, for train.compile)
    bucketed: bool = False  # padded batches: width rounded up to bucket_width() (few shapes, for train.compile)
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
            return collate_packed(units, pad_id=self.pad_id, positions=self.positions, pad_to=self.pad_to)
        # bucket_width(n) < 2n, so padding to a multiple of it pads to exactly it
        multiple = bucket_width(max(len(u.input_ids) for u in units)) if self.bucketed and units else None
        return collate(units, pad_id=self.pad_id, pad_side=self.pad_side, positions=self.positions,
                       pad_to_multiple_of=multiple)  # fmt: skip


def bucket_width(n: int, smallest: int = 64) -> int:
    """The padded width of a batch whose longest example has ``n`` tokens: the first of 64, 96, 128, 192, 256,
    384, … (powers of two and 1.5 times them) that holds ``n``. At most a third is padding, and a run compiles
    at most two shapes per doubling of its lengths."""
    width = smallest
    while width < n:
        width = width * 3 // 2 if (width & (width - 1)) == 0 else width * 4 // 3
    return width


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
    fixed_shapes: bool = False,
) -> Batcher:
    """``fixed_shapes`` (for a compiled step): every packed row as wide as the longest, or padded batches in
    :func:`bucket_width` widths."""
    units = make_units(examples, packing=cfg.packing, pack_length=cfg.pack_length)
    batcher = Batcher(units, batch_size, grad_accum, world_size, seed, pad_id=tokenizer.pad_id,
                      positions=position_kind(template.name))  # fmt: skip
    if fixed_shapes and cfg.packing:
        batcher.pad_to = max(u.length for u in units)
    batcher.bucketed = fixed_shapes and not cfg.packing
    if batcher.steps_per_epoch < 1:
        what = "examples"
        fix = "lower train.batch_size or train.grad_accum, or add data"
        if cfg.packing:
            row = max(u.length for u in units)
            what = f"packed rows (of up to {row} tokens, from {len(examples)} examples)"
            shorter = (f"lower data.pack_length (now {cfg.pack_length})" if cfg.pack_length else
                       f"lower data.max_source_length / data.max_target_length (rows are as long as the longest "
                       f"example, {row} tokens)")  # fmt: skip
            fix = f"set data.packing=false, or get more, shorter rows: {shorter}, or {fix}"
        raise ValueError(
            f"{len(units)} training {what} are fewer than one global batch of {batcher.global_batch} "
            f"(train.batch_size {batch_size} x train.grad_accum {grad_accum} x {world_size} processes): {fix}"
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
        collate([examples[i] for i in g], pad_id=tokenizer.pad_id, positions=kind)
        for j, g in enumerate(groups)
        if j % world_size == rank
    ]
