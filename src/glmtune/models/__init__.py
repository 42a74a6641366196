"""Model families: ``glm`` (ChatGLM-6B v1) and ``chatglm`` (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat)."""

from __future__ import annotations

import torch
from torch import nn

from glmtune.models.config import GLMConfig


def build_model(
    config: GLMConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """The model class for ``config.arch``, uninitialised on ``device`` (use "meta" before loading weights)."""
    if config.arch == "glm":
        from glmtune.models.glm import GLMForCausalLM

        return GLMForCausalLM(config, device=device, dtype=dtype)
    from glmtune.models.chatglm import ChatGLMForCausalLM

    return ChatGLMForCausalLM(config, device=device, dtype=dtype)
