"""Batched generation for every evaluation example, written to ``generated_predictions.jsonl`` as it goes.

Prompts are sorted by length (longest first: similar lengths share a batch, and a batch that does not fit in
memory fails at once) and generated in left-padded batches with the KV cache and the template's stop set
(:func:`glmtune.generate.generate`). A row's tokens do not depend on the other rows of its batch (sampling
included: every example draws from its own generator seeded from ``GenerationConfig.seed`` + its index), so an
interrupted run that continues with other batches gives the same predictions.

The file holds one JSON object per line: ``{"index", "prompt", "label", "prediction", "origin"}``, keyed by the
example's index. Each batch is appended with a single write and fsynced; on a rerun, indices already in the file are
skipped, and a last line cut short by a crash is dropped. When every example is done the file is rewritten in
index order, atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from glmtune.data.encode import EvalExample
from glmtune.generate import Decoder, GenerationConfig, generate
from glmtune.io import atomic_write_text
from glmtune.templates import Template
from glmtune.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"


@dataclass
class Prediction:
    index: int
    prompt: str
    label: str
    prediction: str
    origin: str = ""

    def to_line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False) + "\n"


def prediction_text(tokenizer: Tokenizer, template: Template, ids: Sequence[int]) -> str:
    """Generated ids -> the text that is scored: decoded, stripped, v3/GLM-4's metadata line dropped."""
    return template.postprocess(tokenizer.decode(list(ids)), original=False)


def length_order(examples: Sequence[EvalExample], indices: Sequence[int] | None = None) -> list[int]:
    """Example indices by prompt length, longest first (ties by index)."""
    idx = range(len(examples)) if indices is None else indices
    return sorted(idx, key=lambda i: (-len(examples[i].prompt_ids), i))


def generate_predictions(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: Template,
    examples: Sequence[EvalExample],
    gen: GenerationConfig,
    *,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[list[Prediction]], None] | None = None,
    decode: str = "auto",
) -> list[Prediction]:
    """Generate for ``examples`` (or those at ``indices``) in length-sorted batches; returns them in index order.

    ``on_batch`` receives each finished batch (e.g. to write it out, or to advance a progress bar). ``decode``: the
    :class:`~glmtune.generate.Decoder` mode ("compiled" pays a compilation per batch shape and then decodes faster).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen.validate()
    stop_ids = template.stop_ids(tokenizer)
    order = length_order(examples, indices)
    decoder = Decoder(model, decode=decode)  # buffers and the captured decode step, reused from batch to batch
    out: list[Prediction] = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i in batch:
            if not examples[i].prompt_ids:
                raise ValueError(f"example {i} ({examples[i].origin or 'no origin'}) has an empty prompt")
        # each example samples from its own seed (seed + its index): independent draws across a batch, and the same
        # text whatever the batch size or a resume
        seeds = [gen.seed + i for i in batch] if gen.seed is not None else None
        tokens = generate(model, [examples[i].prompt_ids for i in batch], gen, stop_ids=stop_ids,
                          pad_id=tokenizer.pad_id, row_seeds=seeds, decoder=decoder)  # fmt: skip
        done = [
            Prediction(
                index=i,
                prompt=tokenizer.decode(list(examples[i].prompt_ids), skip_special_tokens=False),
                label=examples[i].reference,
                prediction=prediction_text(tokenizer, template, ids),
                origin=examples[i].origin,
            )
            for i, ids in zip(batch, tokens, strict=True)
        ]
        if on_batch is not None:
            on_batch(done)
        out += done
    return sorted(out, key=lambda p: p.index)


# ---- the predictions file ---------------------------------------------------------------------------------
def read_predictions(path: str | Path) -> tuple[dict[int, Prediction], int]:
    """Complete lines of a predictions file -> ({index: prediction}, byte length of those lines).

    A last line without its newline (a write cut short) is left out of both; a complete line that is not a
    prediction is an error naming the file and line.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to the last complete line
    found: dict[int, Prediction] = {}
    for n, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            pred = Prediction(int(obj["index"]), str(obj["prompt"]), str(obj["label"]), str(obj["prediction"]),
                              str(obj.get("origin", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a prediction line ({e}); delete the file to start over") from None
        found.setdefault(pred.index, pred)
    if end < len(data):
        log.warning("%s: dropping an incomplete last line (an interrupted write)", path)
    return found, end


def _check_matches(
    path: Path, done: dict[int, Prediction], examples: Sequence[EvalExample], tokenizer: Tokenizer
) -> None:
    """Lines left by an earlier run must belong to these examples (same label, same prompt)."""
    hint = "delete it, or choose another output folder"
    for i, p in done.items():
        if not 0 <= i < len(examples):
            raise ValueError(f"{path}: index {i} is outside the {len(examples)} examples; the file was written for "
                             f"other data or a larger --limit ({hint})")  # fmt: skip
        if p.label != examples[i].reference:
            raise ValueError(f"{path}: the label of example {i} differs from the data ({hint})")
        if p.prompt != tokenizer.decode(list(examples[i].prompt_ids), skip_special_tokens=False):
            raise ValueError(f"{path}: the prompt of example {i} differs from this run's prompt ({hint})")


def predict_to_file(
    model: nn.Module,
    tokenizer: Tokenizer,
    template: Template,
    examples: Sequence[EvalExample],
    gen: GenerationConfig,
    out_path: str | Path,
    *,
    batch_size: int = 8,
    on_batch: Callable[[list[Prediction]], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    decode: str = "auto",
) -> list[Prediction]:
    """Predictions for every example, continuing the file at ``out_path`` if a previous run left one.

    Returns all predictions in index order; the file ends up holding exactly one line per example, in that order.
    ``on_resume`` is told how many examples the file already had.
    """
    out_path = Path(out_path)
    done: dict[int, Prediction] = {}
    if out_path.exists():
        done, good_bytes = read_predictions(out_path)
        _check_matches(out_path, done, examples, tokenizer)
        if good_bytes < out_path.stat().st_size:
            with open(out_path, "r+b") as f:
                f.truncate(good_bytes)
        if done:
            log.info("%s: %d of %d examples already predicted; continuing", out_path, len(done), len(examples))
    if on_resume is not None:
        on_resume(len(done))
    todo = [i for i in range(len(examples)) if i not in done]
    if todo:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "ab") as f:

            def write(batch: list[Prediction]) -> None:
                f.write("".join(p.to_line() for p in batch).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                if on_batch is not None:
                    on_batch(batch)

            new = generate_predictions(model, tokenizer, template, examples, gen, batch_size=batch_size,
                                       indices=todo, on_batch=write, decode=decode)  # fmt: skip
        done.update((p.index, p) for p in new)
    result = [done[i] for i in range(len(examples))]
    atomic_write_text(out_path, "".join(p.to_line() for p in result))
    return result
