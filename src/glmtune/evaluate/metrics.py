"""ROUGE-1/2/L and BLEU-4 of generated text against references, as the official THUDM scripts compute them.

ROUGE (every generation): both texts are segmented into words with jieba (``jieba.cut``, HMM on), joined with
spaces and scored with ``rouge_chinese.Rouge().get_scores`` (unique n-grams, F = 2PR / (P + R + 1e-8); ROUGE-L is
the LCS over all words); the F-score × 100, rounded to 4 decimals per example.

BLEU-4, ``nltk.translate.bleu_score.sentence_bleu`` with ``SmoothingFunction().method3`` and uniform weights:

- ``char`` (default): on the characters of the texts, × 100, rounded to 4 decimals per example -- ChatGLM-6B's and
  ChatGLM2-6B's ``ptuning/main.py`` (``sentence_bleu([list(label)], list(pred), ...)``).
- ``word``: on the jieba words (whitespace words included, as ``list(jieba.cut(text))`` yields them) -- ChatGLM3's
  ``finetune_demo/finetune_hf.py`` and GLM-4's ``finetune_demo/finetune.py``. Those scripts report the raw 0-1 value;
  here it is × 100 (not rounded), on the same scale as the others.

Deviations from the originals, on purpose: an empty prediction scores 0 on every metric and is counted (the
originals crash in ``rouge_chinese``); both texts are stripped of surrounding whitespace first (as the v3/GLM-4
scripts do; the v1/v2 scripts score the decoded text unstripped). Corpus scores are the mean of the per-example
scores, as ``np.mean`` in the originals.

jieba loads its dictionary on first use (about a second) and caches it as ``jieba.cache`` in the system temporary
folder (``tempfile.gettempdir()``); its log lines are silenced.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BLEU_KINDS = ("char", "word")
METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l")

DEFINITIONS = {
    "rouge": "ROUGE-1/2/L F x 100 on jieba words (rouge_chinese), per example rounded to 4 decimals, averaged; "
    "as every THUDM script",
    "char": "BLEU-4 x 100 on characters, nltk sentence_bleu + SmoothingFunction().method3; "
    "ChatGLM-6B / ChatGLM2-6B ptuning/main.py",
    "word": "BLEU-4 x 100 on jieba words, nltk sentence_bleu + SmoothingFunction().method3; "
    "ChatGLM3 finetune_hf.py / GLM-4 finetune.py (they report it unscaled, 0-1)",
}


@functools.lru_cache(maxsize=1)
def _jieba() -> Any:
    """jieba's default tokenizer (the one ``jieba.cut`` uses), initialised once with its log lines silenced."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def segment(text: str) -> list[str]:
    """``list(jieba.cut(text))``: words, punctuation and whitespace runs as jieba yields them."""
    return list(_jieba().cut(text))


def rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-scores × 100 (rounded to 4 decimals) of one pair; 0 when either text is empty."""
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    from rouge_chinese import Rouge

    scores = Rouge().get_scores(" ".join(segment(prediction)), " ".join(segment(reference)))[0]
    return {name: round(scores[name]["f"] * 100, 4) for name in METRIC_NAMES}


def bleu4(prediction: str, reference: str, kind: str = "char") -> float:
    """Sentence BLEU-4 × 100 of one pair by the ``char`` or ``word`` definition (see the module docstring)."""
    if kind not in BLEU_KINDS:
        raise ValueError(f"unknown BLEU definition {kind!r}; choose one of {', '.join(BLEU_KINDS)}")
    prediction, reference = prediction.strip(), reference.strip()
    if not prediction or not reference:
        return 0.0
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method3
    if kind == "char":
        return round(sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing) * 100, 4)
    return sentence_bleu([segment(reference)], segment(prediction), smoothing_function=smoothing) * 100


def bleu_key(kind: str, bleu: Sequence[str]) -> str:
    """Metric name of a BLEU definition: ``bleu-4`` for the first one asked for, ``bleu-4-<kind>`` for the others."""
    return "bleu-4" if kind == bleu[0] else f"bleu-4-{kind}"


def score_pair(prediction: str, reference: str, bleu: Sequence[str] = ("char",)) -> dict[str, float]:
    """All metrics of one pair: rouge-1, rouge-2, rouge-l and one BLEU-4 per definition in ``bleu``."""
    scores = rouge_f(prediction, reference)
    for kind in bleu:
        scores[bleu_key(kind, bleu)] = bleu4(prediction, reference, kind)
    return scores


@dataclass
class MetricsReport:
    """Corpus scores (means of the per-example scores), counts, and the definitions used."""

    scores: dict[str, float]
    count: int
    empty_predictions: int
    empty_references: int = 0
    definitions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "count": self.count,
            "empty_predictions": self.empty_predictions,
            "empty_references": self.empty_references,
            "definitions": self.definitions,
        }

    def flat(self) -> dict[str, float]:
        """Scores plus counts in one flat dict (for the training log)."""
        return {**self.scores, "empty_predictions": float(self.empty_predictions), "count": float(self.count)}

    def table(self) -> str:
        """A small text table: one row per metric, then the counts and the definitions."""
        width = max(len(k) for k in self.scores) if self.scores else 8
        lines = [f"{'metric':<{width}}  {'score':>8}", f"{'-' * width}  {'-' * 8}"]
        lines += [f"{name:<{width}}  {value:8.4f}" for name, value in self.scores.items()]
        lines.append(f"{self.count} examples, {self.empty_predictions} empty predictions (scored 0)")
        if self.empty_references:
            lines.append(f"{self.empty_references} empty references (scored 0)")
        lines += [f"{name}: {text}" for name, text in self.definitions.items()]
        return "\n".join(lines)


def check_bleu_kinds(bleu: Sequence[str]) -> tuple[str, ...]:
    """Validate a list of BLEU definitions (non-empty, known, no repeats)."""
    kinds = tuple(bleu)
    if not kinds:
        raise ValueError("at least one BLEU definition is needed (char or word)")
    for kind in kinds:
        if kind not in BLEU_KINDS:
            raise ValueError(f"unknown BLEU definition {kind!r}; choose one of {', '.join(BLEU_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"BLEU definitions repeat: {', '.join(kinds)}")
    return kinds


def compute_metrics(
    predictions: Sequence[str], references: Sequence[str], bleu: Sequence[str] = ("char",)
) -> MetricsReport:
    """Score every (prediction, reference) pair and average. Empty predictions count, with 0 on every metric."""
    kinds = check_bleu_kinds(bleu)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    names = [*METRIC_NAMES, *(bleu_key(k, kinds) for k in kinds)]
    per_example: dict[str, list[float]] = {name: [] for name in names}
    for pred, ref in zip(predictions, references, strict=True):
        for name, value in score_pair(pred, ref, kinds).items():
            per_example[name].append(value)
    n = len(predictions)
    scores = {name: (math.fsum(values) / n if n else 0.0) for name, values in per_example.items()}
    definitions = {"rouge": DEFINITIONS["rouge"], **{bleu_key(k, kinds): DEFINITIONS[k] for k in kinds}}
    return MetricsReport(
        scores=scores,
        count=n,
        empty_predictions=sum(1 for p in predictions if not p.strip()),
        empty_references=sum(1 for r in references if not r.strip()),
        definitions=definitions,
    )
