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

    ``generation`` matters only where two generations share an architecture but not every detail: ChatGLM2's
    rotary table (built in the compute precision, positions interpolated by ``rope_ratio``) differs from
    ChatGLM3/GLM-4's (base scaled by ``rope_ratio``).
    """
    if config.arch == "glm":
        from glmtune.models.glm import GLMForCausalLM

        return GLMForCausalLM(config, device=device, dtype=dtype)
    from glmtune.models.chatglm import ChatGLMForCausalLM

    style = "chatglm2" if generation == "chatglm2" else "chatglm3"
    return ChatGLMForCausalLM(config, device=device, dtype=dtype, rope_style=style)
