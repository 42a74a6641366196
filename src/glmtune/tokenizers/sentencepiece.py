"""ChatGLM2-6B and ChatGLM3-6B tokenizer: a SentencePiece model plus special tokens appended after its vocabulary.

Reproduces what a user of THUDM's ``tokenization_chatglm.py`` gets from
``tokenizer.encode(text, add_special_tokens=False)`` and ``tokenizer.decode(ids)`` (transformers' slow-tokenizer path):

- ids: the SentencePiece vocabulary, then ``[MASK] [gMASK] [sMASK] sop eop`` (and for ChatGLM3
  ``<|system|> <|user|> <|assistant|> <|observation|>``) numbered from the SentencePiece vocabulary size;
  bos/eos are SentencePiece's, pad is its unk id.
- encode: the text is split into SentencePiece *pieces* and each piece is looked up by name, special names first.
  A bare piece spelled ``sop`` or ``eop`` therefore becomes the special id, exactly as in the original. The
  special strings are not registered as transformers added tokens, so literal ``<|user|>`` in text is plain text,
  unless ChatGLM3's ``encode_special_tokens`` is on: then every special string (all nine, as in the latest
  original, ``sop``/``eop`` included, even inside words) is cut out of the text and mapped to its id, and the pieces
  between are encoded separately.
- ``encode_ordinary``: SentencePiece's own ids with no special handling at all (the original's
  ``SPTokenizer.encode``, used by its ``build_chat_input``/``build_single_message``).
- decode: ids become pieces (eos/bos/pad and ids outside the vocabulary become empty pieces, ChatGLM2 specials
  too, ChatGLM3 specials their text) and SentencePiece joins them in one ``DecodePieces`` call, as the original.
  ``skip_special_tokens=True`` drops every id ``is_special`` names (appended specials, bos, eos, pad) before that.
  The original only drops eos and pad there (the others are not transformers special tokens), so it still shows
  ChatGLM3's role tokens; dropping them is the documented difference.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import sentencepiece as spm

from glmtune.tokenizers.base import TokenizerError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
# Files of an original model folder that belong to the tokenizer (copied along when a model is saved).
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenization_chatglm.py")

BASE_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
SPECIAL_TOKENS = {
    "chatglm2": BASE_SPECIAL_TOKENS,
    "chatglm3": BASE_SPECIAL_TOKENS + ROLE_SPECIAL_TOKENS,
}


class SentencePieceTokenizer:
    """Tokenizer of ChatGLM2-6B (``generation="chatglm2"``) and ChatGLM3-6B (``generation="chatglm3"``)."""

    def __init__(
        self,
        model_file: str | Path,
        generation: str = "chatglm2",
        *,
        encode_special_tokens: bool = False,
        extra_files: list[Path] | None = None,
    ) -> None:
        if generation not in SPECIAL_TOKENS:
            raise ValueError(f"generation must be one of {sorted(SPECIAL_TOKENS)}, got {generation!r}")
        if encode_special_tokens and generation != "chatglm3":
            raise ValueError("encode_special_tokens exists only for chatglm3")
        self.generation = generation
        self.encode_special_tokens = encode_special_tokens
        self._model_file = Path(model_file)
        self._extra_files = list(extra_files or [])
        self._sp = _load_sentencepiece(self._model_file)

        n_pieces = self._sp.vocab_size()
        self._n_pieces = n_pieces
        self._specials = {token: n_pieces + i for i, token in enumerate(SPECIAL_TOKENS[generation])}
        self._special_by_id = {i: token for token, i in self._specials.items()}
        self._bos_id = self._sp.bos_id()
        self._eos_id = self._sp.eos_id()
        self._unk_id = self._sp.unk_id()
        if self._eos_id < 0:
            raise TokenizerError(f"{self._model_file}: the SentencePiece model defines no eos piece")
        # Ids the original renders as an empty piece, whatever skip_special_tokens says.
        self._blank_ids = {i for i in (self._bos_id, self._eos_id, self._unk_id) if i >= 0}
        # Same alternation, in the same order, as the original's role_special_token_expression.
        self._special_re = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS[generation]))

    @classmethod
    def from_dir(
        cls, path: str | Path, generation: str = "chatglm2", *, encode_special_tokens: bool = False
    ) -> SentencePieceTokenizer:
        """Load ``tokenizer.model`` from an original model folder."""
        path = Path(path)
        extra = [path / name for name in COMPANION_FILES if (path / name).is_file()]
        return cls(path / TOKENIZER_FILE, generation, encode_special_tokens=encode_special_tokens, extra_files=extra)

    # ---- sizes and ids -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._n_pieces + len(self._specials)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def pad_id(self) -> int:
        return self._unk_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """The appended special tokens, text -> id, in id order."""
        return dict(self._specials)

    def special_id(self, token: str) -> int:
        """Id of an appended special token, or of the original's ``<bos>``/``<eos>``/``<pad>`` command names."""
        if token in self._specials:
            return self._specials[token]
        commands = {"<bos>": self._bos_id, "<eos>": self._eos_id, "<pad>": self._unk_id}
        if token in commands:
            return commands[token]
        raise KeyError(f"{token!r} is not a special token of {self.generation}")

    def is_special(self, token_id: int) -> bool:
        """True for the appended special tokens and for bos/eos/pad (the ids ``skip_special_tokens`` drops)."""
        return token_id in self._special_by_id or token_id in self._blank_ids

    def prefix_ids(self) -> list[int]:
        """``[gMASK] sop``, which the original puts before every input."""
        return [self._specials["[gMASK]"], self._specials["sop"]]

    @property
    def files(self) -> list[Path]:
        return [self._model_file, *self._extra_files]

    # ---- encode / decode -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids like the original's ``encode(text, add_special_tokens=False)``; no prefix, no eos."""
        if not self.encode_special_tokens:
            return self._pieces_to_ids(self._sp.encode(text, out_type=str))
        ids: list[int] = []
        last = 0
        for match in self._special_re.finditer(text):
            if match.start() > last:
                ids.extend(self._pieces_to_ids(self._sp.encode(text[last : match.start()], out_type=str)))
            ids.append(self._specials[match.group()])
            last = match.end()
        if last < len(text):
            ids.extend(self._pieces_to_ids(self._sp.encode(text[last:], out_type=str)))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """SentencePiece's own ids for ``text`` (the original ``SPTokenizer.encode``): no special lookups."""
        return self._sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        pieces = []
        for token_id in ids:
            token_id = int(token_id)
            if skip_special_tokens and self.is_special(token_id):
                continue
            if token_id in self._special_by_id:
                # ChatGLM3 renders its specials inline; ChatGLM2's original maps them to "" pieces.
                pieces.append(self._special_by_id[token_id] if self.generation == "chatglm3" else "")
            elif token_id in self._blank_ids or not 0 <= token_id < self._n_pieces:
                pieces.append("")  # as the original: an empty piece (it still splits a run of byte pieces)
            else:
                pieces.append(self._sp.id_to_piece(token_id))
        return self._sp.decode_pieces(pieces)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id (special tokens by their text)."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        if not 0 <= token_id < self._n_pieces:
            raise KeyError(f"id {token_id} is outside the vocabulary of {self._model_file} ({self.vocab_size} ids)")
        return self._sp.id_to_piece(token_id)

    def _pieces_to_ids(self, pieces: list[str]) -> list[int]:
        specials = self._specials
        piece_to_id = self._sp.piece_to_id
        return [specials[p] if p in specials else piece_to_id(p) for p in pieces]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self._model_file)!r}, generation={self.generation!r})"


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from e
    if not data:
        raise TokenizerError(f"{path}: tokenizer file is empty")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, TypeError) as e:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from e
    if sp.vocab_size() != sp.get_piece_size() or sp.vocab_size() <= 0:
        raise TokenizerError(f"{path}: SentencePiece model has an inconsistent vocabulary size")
    return sp
