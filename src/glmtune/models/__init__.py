"""Model families: ``glm`` (ChatGLM-6B v1) and ``chatglm`` (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat)."""

from __future__ import annotations

import torch
from torch import nn

from glmtune.models.config import GLMConfig


def build_model(
    config: GLMConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generation: str | None = None,
) -> nn.Module:
    """The model class for ``config.arch``, uninitialised on ``device`` (use "meta" before loading weights).

    ``generation`` sets what two generations sharing an architecture do differently (``spec.configure``: ChatGLM2's
    rotary table differs from ChatGLM3/GLM-4's); without it the config's own ``rope_style`` (else the
    architecture's default) holds.
    """
    if generation is not None:
        from glmtune.models.spec import configure

        config = configure(config, generation)
    if config.arch == "glm":
        from glmtune.models.glm import GLMForCausalLM

        return GLMForCausalLM(config, device=device, dtype=dtype)
    from glmtune.models.chatglm import ChatGLMForCausalLM

    return ChatGLMForCausalLM(config, device=device, dtype=dtype)
