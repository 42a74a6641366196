"""The tokenizer surface every generation implements (no transformers dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read; the message names the file."""


@runtime_checkable
class Tokenizer(Protocol):
    generation: str  # "chatglm" | "chatglm2" | "chatglm3" | "glm4"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, with no special prefix ([gMASK] sop) and no eos added."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def special_id(self, token: str) -> int:
        """Id of a special token by its text, e.g. "[gMASK]", "sop", "<|user|>"; KeyError if absent."""

    def is_special(self, token_id: int) -> bool: ...

    @property
    def files(self) -> list[Path]:
        """The files that make up this tokenizer in a model folder (copied when a model is saved)."""
