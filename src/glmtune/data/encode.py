"""Samples -> training examples (ids, labels) through the template, and evaluation prompts (one per assistant turn)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace

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


def encode_samples(
    tokenizer: Tokenizer,
    template: Template,
    samples: list[Sample],
    options: EncodeOptions | None = None,
    *,
    skip_bad: bool = False,
) -> tuple[list[Encoded], Counter]:
    """Encode every sample. Examples left with no trained token (all cut away) are dropped and counted."""
    options = options or EncodeOptions()
    out: list[Encoded] = []
    skipped: Counter = Counter()
    for s in samples:
        try:
            ex = encode_sample(tokenizer, template, s, options)
        except RecordError as e:
            if not skip_bad:
                raise
            skipped[e.problem] += 1
            continue
        if all(t == IGNORE_INDEX for t in ex.labels[1:]):
            skipped["no trained token left after truncation"] += 1
            continue
        out.append(ex)
    if skipped:
        log.warning("encoding skipped %s", dict(skipped))
    if not out:
        raise ValueError(f"no training examples left after encoding ({dict(skipped)})")
    return out, skipped


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
    per_turn = template.name in ("chatglm3", "glm4") if every_turn is None else every_turn
    out = []
    for s in samples:
        ends = [i for i, m in enumerate(s.messages) if m.role == "assistant"]
        for i in ends if per_turn else ends[-1:]:
            history: list[Message] = s.messages[:i]
            if not history or history[-1].role not in ("user", "observation", "tool"):
                continue
            out.append(EvalExample(_eval_prompt(tokenizer, template, history, o), s.messages[i].content, s.origin))
    return out


def _eval_prompt(tokenizer: Tokenizer, template: Template, history: list[Message], o: EncodeOptions) -> list[int]:
    limit = o.max_source_length
    if template.name == "chatglm":
        ids = template.encode_prompt(tokenizer, history)
        if limit is not None and len(ids) > limit:
            ids = ids[: max(limit - 2, 0)] + ids[-2:]  # text cut, [gMASK] <sop> kept at the end
        return ids
    if template.name == "chatglm2":
        ids = template.encode_prompt(tokenizer, history)
        return ids[:limit] if limit is not None else ids
    ids = template.encode_prompt(tokenizer, history, add_generation_prompt=False)
    if limit is not None:
        ids = ids[:limit]
    return ids + [tokenizer.special_id("<|assistant|>")]
