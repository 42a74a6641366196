"""Samples -> training examples (ids, labels) through the template, and evaluation prompts (one per assistant turn)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

from glmtune.data.dropped import Dropped, describe, log_dropped
from glmtune.data.messages import RecordError, Sample
from glmtune.templates import IGNORE_INDEX, Encoded, EncodeOptions, Message, Template
from glmtune.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)


def encode_sample(tokenizer: Tokenizer, template: Template, sample: Sample, options: EncodeOptions) -> Encoded:
    """One sample through its template; a conversation the template cannot render names the record."""
    opts = replace(options, history_rounds=True) if sample.history_rounds and not options.history_rounds else options
    try:
        return template.encode_example(tokenizer, sample.messages, opts)
    except ValueError as e:
        raise RecordError(sample.origin, None, f"{e} (template {template.name})") from None


@dataclass
class EncodeReport:
    """What encoding left out (``dropped``, with where and why) and which examples it cut (``truncated``)."""

    total: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    dropped: list[Dropped] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # origins of the examples cut by the length limits


def fit_lengths(options: EncodeOptions, max_length: int) -> EncodeOptions:
    """``options`` with max_source_length + max_target_length lowered to fit ``max_length`` (the model's
    seq_length) with the template's special tokens: each side gets up to half, a side that needs less leaves the
    rest to the other. Unchanged when they fit."""
    src, tgt = options.max_source_length, options.max_target_length
    if src is None or tgt is None or src + tgt + 1 <= max_length:
        return options
    budget = max_length - 1  # v1: src + tgt tokens at most, v2/v3/GLM-4: src + tgt + 1
    half = budget // 2
    if src <= half:
        src, tgt = src, budget - src
    elif tgt <= budget - half:
        src, tgt = budget - tgt, tgt
    else:
        src, tgt = half, budget - half
    log.info("data.max_source_length %d + data.max_target_length %d exceed the model's seq_length %d: using %d + %d",
             options.max_source_length, options.max_target_length, max_length, src, tgt)  # fmt: skip
    return replace(options, max_source_length=src, max_target_length=tgt)


def cut_to(example: Encoded, max_length: int) -> Encoded:
    """The first ``max_length`` tokens of an example (the model's seq_length: no position beyond it is trained)."""
    if len(example.input_ids) <= max_length:
        return example
    prefix = min(example.prefix_length, max_length)
    return Encoded(example.input_ids[:max_length], example.labels[:max_length], prefix, truncated=True)


def encode_samples(
    tokenizer: Tokenizer,
    template: Template,
    samples: list[Sample],
    options: EncodeOptions | None = None,
    *,
    skip_bad: bool = False,
    max_length: int | None = None,
) -> tuple[list[Encoded], EncodeReport]:
    """Encode every sample, each cut to at most ``max_length`` tokens (the model's seq_length). Examples left with
    no trained token (all cut away) are dropped; the report lists them, and the examples that were cut."""
    options = options or EncodeOptions()
    out: list[Encoded] = []
    report = EncodeReport(total=len(samples))
    for s in samples:
        try:
            ex = encode_sample(tokenizer, template, s, options)
        except RecordError as e:
            if not skip_bad:
                raise
            report.skipped[e.problem] += 1
            report.dropped.append(Dropped(s.origin, e.problem))
            continue
        if max_length is not None:
            ex = cut_to(ex, max_length)
        if all(t == IGNORE_INDEX for t in ex.labels[1:]):
            why = "no trained token left after truncation"
            report.skipped[why] += 1
            report.dropped.append(Dropped(s.origin, f"{why} ({len(ex.input_ids)} tokens)"))
            continue
        if ex.truncated:
            report.truncated.append(s.origin)
        out.append(ex)
    log_encode_report(report, options, max_length)
    if not out:
        raise ValueError(f"no training examples left after encoding ({dict(report.skipped)})")
    return out, report


def log_encode_report(report: EncodeReport, options: EncodeOptions, max_length: int | None) -> None:
    """Warnings: the examples dropped, and how many were cut, with the first few locations."""
    log_dropped(report.dropped, report.total, "examples at encoding")
    if report.truncated:
        limits = f"data.max_source_length {options.max_source_length}, data.max_target_length "
        limits += f"{options.max_target_length}" + (f", the model's seq_length {max_length}" if max_length else "")
        log.warning("%d of %d examples were cut to the length limits (%s): %s; raise the limits to keep more",
                    len(report.truncated), report.total, limits, describe(report.truncated))  # fmt: skip


@dataclass
class EvalExample:
    prompt_ids: list[int]
    reference: str  # the assistant reply to compare the generated text with
    origin: str = ""


def eval_examples(
    tokenizer: Tokenizer,
    template: Template,
    samples: list[Sample],
    options: EncodeOptions | None = None,
    *,
    every_turn: bool | None = None,
) -> list[EvalExample]:
    """Prompts for generation-based evaluation.

    Default as the official scripts: v1/v2 one example per record (its last reply), v3/GLM-4 one per assistant
    turn (``process_batch_eval``). The prompt is cut to ``max_source_length`` as the originals cut it: v1/v2 keep
    its head with the special tokens counted; v3/GLM-4 keep the first max_input_length tokens, then
    ``<|assistant|>``.
    """
    o = options or EncodeOptions()
    per_turn = template.eval_every_turn if every_turn is None else every_turn
    out = []
    for s in samples:
        ends = [i for i, m in enumerate(s.messages) if m.role == "assistant"]
        for i in ends if per_turn else ends[-1:]:
            history: list[Message] = s.messages[:i]
            if not history or history[-1].role not in ("user", "observation", "tool"):
                continue
            prompt = template.eval_prompt(tokenizer, history, o.max_source_length)
            out.append(EvalExample(prompt, s.messages[i].content, s.origin))
    return out
