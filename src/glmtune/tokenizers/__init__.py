"""Tokenizers of the ChatGLM family, read from the original model folders without transformers.

``load_tokenizer(model_dir, generation=None)`` picks the implementation from the files:

1. ``ice_text.model`` present, or ``generation="chatglm"``: ChatGLM-6B v1 (``icetext.IceTextTokenizer``).
2. ``tokenizer.model`` in tiktoken text format (``<base64> <rank>`` lines): GLM-4 (``glm4.GLM4Tokenizer``).
3. ``tokenizer.model`` as a SentencePiece model: ChatGLM2 or ChatGLM3 (``sentencepiece.SentencePieceTokenizer``).
   The folder says ChatGLM3 when its ``tokenizer_config.json`` has a ``chat_template`` with a role token
   (``<|user|>``, ``<|assistant|>``, ...; the released one writes ``<|{{ role }}|>`` and ``<|assistant|>``),
   when ``tokenizer_config.json``/``config.json`` name ``chatglm3`` (``_name_or_path``, ``name_or_path``,
   ``auto_map``), or when a ``tokenization_chatglm.py`` beside it (read as text, never run) defines ``<|user|>``;
   it says ChatGLM2 when those name ``chatglm2`` or that file lacks ``<|user|>``. With no such evidence the
   ``generation`` argument decides, and without one ChatGLM2 is assumed (logged). A ``generation`` argument that
   contradicts the folder, or names a different tokenizer kind, is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glmtune.generations import GENERATIONS
from glmtune.tokenizers.base import Tokenizer, TokenizerError
from glmtune.tokenizers.glm4 import GLM4Tokenizer, looks_like_ranks_file
from glmtune.tokenizers.sentencepiece import SentencePieceTokenizer
from glmtune.tokenizers.stream import StreamDecoder

logger = logging.getLogger(__name__)

_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

__all__ = [
    "GENERATIONS",
    "GLM4Tokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "detect_sentencepiece_generation",
    "load_tokenizer",
]


def load_tokenizer(model_dir: str | Path, generation: str | None = None) -> Tokenizer:
    """The tokenizer of an original model folder; see the module docstring for how the generation is chosen."""
    model_dir = Path(model_dir)
    if generation is not None and generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: not a folder (expected a model folder with the tokenizer files)")

    if generation == "chatglm" or (model_dir / "ice_text.model").is_file():
        if generation not in (None, "chatglm"):
            raise TokenizerError(f"{model_dir / 'ice_text.model'}: a ChatGLM-6B (v1) tokenizer, not {generation}")
        from glmtune.tokenizers.icetext import IceTextTokenizer  # written separately; imported only when needed

        return IceTextTokenizer.from_dir(model_dir)

    model_file = model_dir / "tokenizer.model"
    if not model_file.is_file():
        raise TokenizerError(f"{model_file}: tokenizer file not found (nor ice_text.model)")

    if looks_like_ranks_file(model_file):
        if generation not in (None, "glm4"):
            raise TokenizerError(f"{model_file}: a tiktoken ranks file (GLM-4 tokenizer), not {generation}")
        return GLM4Tokenizer.from_dir(model_dir)

    if generation == "glm4":
        raise TokenizerError(f"{model_file}: a SentencePiece model (ChatGLM2/3 tokenizer), not a GLM-4 ranks file")
    detected, evidence = detect_sentencepiece_generation(model_dir)
    if detected is not None and generation is not None and detected != generation:
        raise TokenizerError(f"{evidence}: the folder is {detected}, but generation={generation!r} was asked for")
    chosen = detected or generation
    if chosen is None:
        chosen = "chatglm2"
        logger.info("%s: no file names the generation; assuming chatglm2 (pass generation= to choose)", model_dir)
    return SentencePieceTokenizer.from_dir(model_dir, chosen)


def detect_sentencepiece_generation(model_dir: str | Path) -> tuple[str | None, Path | None]:
    """(``"chatglm2"`` | ``"chatglm3"`` | None, the file that says so) from a ChatGLM2/3 folder's side files."""
    model_dir = Path(model_dir)
    for name in ("tokenizer_config.json", "config.json"):
        path = model_dir / name
        config = _read_json(path)
        if config is None:
            continue
        template = config.get("chat_template")
        if isinstance(template, str) and any(role in template for role in _ROLE_TOKENS):
            return "chatglm3", path
        names = [config.get("_name_or_path"), config.get("name_or_path")]
        auto_map = config.get("auto_map")
        if isinstance(auto_map, dict):
            names.extend(str(v) for v in auto_map.values())
        text = " ".join(str(n) for n in names if n).lower()
        if "chatglm3" in text:
            return "chatglm3", path
        if "chatglm2" in text:
            return "chatglm2", path
    code = model_dir / "tokenization_chatglm.py"
    if code.is_file():
        try:
            source = code.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None, None
        return ("chatglm3" if "<|user|>" in source else "chatglm2"), code
    return None, None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else None
