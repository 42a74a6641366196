"""The four ChatGLM generations by name, in a module without torch: the CLI, the tokenizers and the models name
them from here (what each generation does differently lives in :mod:`glmtune.models.spec`)."""

from __future__ import annotations

from typing import Literal

# The chat/tokenizer generation, which the architecture alone does not tell (v2 and v3 share it).
Generation = Literal["chatglm", "chatglm2", "chatglm3", "glm4"]
GENERATIONS: tuple[str, ...] = ("chatglm", "chatglm2", "chatglm3", "glm4")
