"""``freeze``: train the last N transformer layers and/or the parameters matching named patterns; the rest stays
frozen in its (low) precision. The result is a complete checkpoint in the original format (see ``full``).

Layers are found by the original parameter names of every generation (``transformer.layers.N.`` for ChatGLM-6B,
``transformer.encoder.layers.N.`` for ChatGLM2+). ``trainable_layers`` counts from the top: 2 = the last two layers;
a negative number counts from the bottom (-2 = the first two); 0 = none (patterns only). ``patterns`` are regular
expressions searched in the parameter names, e.g. ``mlp`` or ``final_layernorm``; each must match something.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from glmtune.adapters.full import WholeWeightsMethod

if TYPE_CHECKING:
    from glmtune.adapters import FreezeOptions

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    m = _LAYER.search(param_name)
    return int(m.group(1)) if m else None


def select_trainable(model: nn.Module, trainable_layers: int, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters ``freeze`` trains (ValueError for a bad layer count or a pattern matching nothing)."""
    num_layers = model.config.num_layers
    if abs(trainable_layers) > num_layers:
        raise ValueError(f"trainable_layers is {trainable_layers} but the model has {num_layers} layers")
    if trainable_layers > 0:
        layers = set(range(num_layers - trainable_layers, num_layers))
    else:
        layers = set(range(-trainable_layers))
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"patterns: invalid regular expression {p!r} ({e})") from None
    # Every name a parameter goes by (ChatGLM-6B's lm_head.weight is the word embeddings), reported canonically.
    every = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()]
    for pattern, rx in zip(patterns, compiled, strict=True):
        if not any(rx.search(n) for n, _ in every):
            raise ValueError(f"patterns: {pattern!r} matches no parameter of the model")
    picked = {id(p) for n, p in every if layer_index(n) in layers or any(rx.search(n) for rx in compiled)}
    chosen = [n for n, p in model.named_parameters() if id(p) in picked]
    if not chosen:
        raise ValueError("freeze: nothing to train (trainable_layers is 0 and no patterns are given)")
    return chosen


class FreezeMethod(WholeWeightsMethod):
    name = "freeze"

    def __init__(self, options: FreezeOptions) -> None:
        self.options = options

    def setup(self, model: nn.Module) -> None:
        chosen = set(select_trainable(model, self.options.trainable_layers, self.options.patterns))
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        log.info("freeze: training %d parameter tensor(s) (trainable_layers=%d, patterns=%s)", len(chosen),
                 self.options.trainable_layers, list(self.options.patterns))  # fmt: skip
