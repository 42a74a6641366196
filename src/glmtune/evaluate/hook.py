"""Generation metrics during training: a callable the training loop runs every N steps on a fixed dev subset."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from torch import nn

from glmtune.data.encode import EvalExample
from glmtune.evaluate.metrics import check_bleu_kinds, compute_metrics
from glmtune.evaluate.predict import generate_predictions
from glmtune.generate import GenerationConfig
from glmtune.templates import Template
from glmtune.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)


def make_generation_eval_hook(
    tokenizer: Tokenizer,
    template: Template,
    examples: Sequence[EvalExample],
    gen_config: GenerationConfig,
    *,
    max_examples: int | None = 50,
    batch_size: int = 8,
    bleu: Sequence[str] = ("char",),
) -> Callable[[nn.Module], dict[str, float]]:
    """A function ``hook(model) -> {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "empty_predictions", "count"}``.

    It generates for the first ``max_examples`` examples (None: all; the official v3/GLM-4 scripts use the first
    50 of the validation set) with ``gen_config`` -- give it a seed, or use greedy decoding, so that successive
    evaluations differ only by the model -- and scores them with :func:`compute_metrics`. The model is put in eval
    mode for the call and its training mode is restored afterwards.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    kinds = check_bleu_kinds(bleu)
    gen_config.validate()
    if gen_config.do_sample and gen_config.seed is None:
        log.warning("generation eval hook samples without a seed: its scores will vary between evaluations")
    subset = list(examples if max_examples is None else examples[:max_examples])
    if not subset:
        raise ValueError("no evaluation examples for the generation eval hook")
    references = [e.reference for e in subset]

    def hook(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            preds = generate_predictions(model, tokenizer, template, subset, gen_config, batch_size=batch_size)
        finally:
            model.train(was_training)
        report = compute_metrics([p.prediction for p in preds], references, kinds)
        log.debug("generation eval on %d examples took %.1fs", len(subset), time.perf_counter() - start)
        return report.flat()

    return hook
