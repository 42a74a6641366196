"""What differs between the four ChatGLM generations, written once.

Two generations can share an architecture and a config.json (ChatGLM2 and ChatGLM3 do) and still differ in
details the weights were trained with. Every place that would branch on a generation's name reads its
:class:`GenerationSpec` instead:

- ``arch``: the model family (``glm`` = ChatGLM-6B, ``chatglm`` = ChatGLM2/3, GLM-4);
- ``rope``: the rotary variant — ``"glm2d"`` (v1: two rotary halves, position and block position, table built from
  float16 ``inv_freq``), ``"chatglm2"`` (table built in the compute precision, positions interpolated by
  ``rope_ratio``), ``"chatglm3"`` (base scaled by ``rope_ratio``, table in float32 rounded to the compute dtype);
  the model reads it from ``GLMConfig.rope_style``, which ``configure`` sets;
- ``positions``: ``"1d"`` (0, 1, … per sample) or ``"2d"`` (v1: position + block position);
- ``prefix_lm``: v1 attends bidirectionally over the prompt up to ``<sop>``, causally after it; the others are causal;
- ``template``: the chat template (stop ids, clean-up and the training encoding live there);
- ``prompt_cut``: how an eval/chat prompt that is too long is cut — ``"left"`` keeps its end (the question), as the
  official scripts truncate ``max_source_length`` from the left for chat prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from glmtune.models.config import GENERATIONS, GLMConfig

RopeStyle = Literal["glm2d", "chatglm2", "chatglm3"]
PositionKind = Literal["1d", "2d"]


@dataclass(frozen=True)
class GenerationSpec:
    name: str
    arch: str
    rope: RopeStyle
    positions: PositionKind
    prefix_lm: bool
    template: str
    prompt_cut: Literal["left", "right"] = "left"


SPECS: dict[str, GenerationSpec] = {
    "chatglm": GenerationSpec("chatglm", "glm", "glm2d", "2d", prefix_lm=True, template="chatglm"),
    "chatglm2": GenerationSpec("chatglm2", "chatglm", "chatglm2", "1d", prefix_lm=False, template="chatglm2"),
    "chatglm3": GenerationSpec("chatglm3", "chatglm", "chatglm3", "1d", prefix_lm=False, template="chatglm3"),
    "glm4": GenerationSpec("glm4", "chatglm", "chatglm3", "1d", prefix_lm=False, template="glm4"),
}
assert tuple(SPECS) == GENERATIONS


def get_spec(generation: str) -> GenerationSpec:
    """The spec of a generation name (chatglm, chatglm2, chatglm3, glm4)."""
    try:
        return SPECS[generation]
    except KeyError:
        raise ValueError(f"unknown generation {generation!r}; choose one of {', '.join(SPECS)}") from None


def default_generation(config: GLMConfig) -> str:
    """The generation to assume when nothing tells (a bare config): v1 for ``glm``, ChatGLM3 for ``chatglm``."""
    return "chatglm" if config.arch == "glm" else "chatglm3"


def configure(config: GLMConfig, generation: str | None) -> GLMConfig:
    """``config`` with the generation's model-side details set (``rope_style``); checks arch and generation agree."""
    spec = get_spec(generation or default_generation(config))
    if spec.arch != config.arch:
        raise ValueError(
            f"generation {spec.name!r} is a {spec.arch!r} model but the config describes a {config.arch!r} model"
        )
    return dataclasses.replace(config, rope_style=spec.rope)
