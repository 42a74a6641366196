"""ChatGLM-6B (v1) tokenizer: the ``ice_text.model`` SentencePiece model with the original's text preprocessing.

Reproduces THUDM's ``tokenization_chatglm.py`` for ChatGLM-6B (``SPTokenizer`` inside ``ChatGLMTokenizer``):

- Preprocessing before SentencePiece: ``\\n`` -> ``<n>`` (``linebreak``), tab -> ``<|tab|>`` and every run of 2..80
  spaces -> ``<|blank_N|>``, longest first (``whitespaces``); decoding maps them back.
- Ids are SentencePiece ids plus ``num_image_tokens``. The first release (vocab 150,528) reserved 20,000 image ids
  below the text; the current one (vocab 130,528) has none. As in the original, the number comes from
  ``tokenizer_config.json`` (``"num_image_tokens": 0`` in the current release) and defaults to 20,000 without it.
- The special tokens ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` (130000..130007 in the
  current release), ``<pad>`` and ``<unk>`` are pieces of the SentencePiece model itself, looked up by name.
  ``<sop>`` is bos, ``<eop>`` eos.
- ``encode(text)`` is the original's ``encode(text, add_special_tokens=False)``: SentencePiece adds its dummy prefix
  ``▁``. With ``add_dummy_prefix=False`` the original's trick is used: encode ``"<n>" + text`` and drop the first
  two ids (the ``▁`` and the ``<n>``).
- ``prompt_ids(text)`` is the original ``build_inputs_with_special_tokens``: ``text [gMASK] <sop>``; with an answer,
  ``build_inputs(a, b)`` gives ``a [gMASK] <sop> b <eop>``.
- ``decode``: padding ids are always removed (as the original), then SentencePiece decodes and ``<n>``, ``<|tab|>``
  and ``<|blank_N|>`` are turned back into text.

Documented differences: ``skip_special_tokens=True`` drops all the special tokens above plus ``<pad>``/``<unk>``;
the original (through transformers) drops only ``<sop> <eop> [MASK] <pad> <unk>`` and would leave e.g. ``[gMASK]``
to SentencePiece. Ids past the SentencePiece vocabulary (the model's padded rows) decode to nothing. transformers'
``clean_up_tokenization_spaces`` (on by default in the transformers 4.27 the original pinned) is available as an
option, off by default. Special-token strings typed in the text are left to SentencePiece (they are pieces of
``ice_text.model``, so they still come out as their ids).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import sentencepiece as spm

from glmtune.tokenizers.base import TokenizerError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "ice_text.model"
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenization_chatglm.py")
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK_LENGTH = 80
DEFAULT_NUM_IMAGE_TOKENS = 20000  # the original's default when tokenizer_config.json does not say
TAB_TOKEN = "<|tab|>"
LINEBREAK_TOKEN = "<n>"
_ALIASES = {"sop": "<sop>", "eop": "<eop>", "bos": "<sop>", "eos": "<eop>", "<bos>": "<sop>", "<eos>": "<eop>"}


def blank_token(n: int) -> str:
    return f"<|blank_{n}|>"


class IceTextTokenizer:
    """ChatGLM-6B's tokenizer (``generation="chatglm"``)."""

    generation = "chatglm"

    def __init__(
        self,
        model_file: str | Path,
        *,
        num_image_tokens: int = 0,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        remove_space: bool = False,
        do_lower_case: bool = False,
        clean_up_tokenization_spaces: bool = False,
        extra_files: list[Path] | None = None,
    ) -> None:
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        self._model_file = Path(model_file)
        self._extra_files = list(extra_files or [])
        self._sp = _load_sentencepiece(self._model_file)
        self.num_image_tokens = num_image_tokens
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._n_pieces = self._sp.vocab_size()

        names = dict.fromkeys([*SPECIAL_TOKENS, bos_token, eos_token, mask_token, gmask_token, pad_token, unk_token])
        self._special = {name: self._piece_id(name) for name in names}
        self._bos, self._eos = self._special[bos_token], self._special[eos_token]
        self._mask, self._gmask = self._special[mask_token], self._special[gmask_token]
        self._pad, self._unk = self._special[pad_token], self._special[unk_token]
        self._special_ids = frozenset(self._special.values())
        # the strings the original's transformers base class cuts out of text (its registered special tokens)
        cut = sorted({bos_token, eos_token, mask_token, pad_token, unk_token}, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in cut) + ")")

    def _piece_id(self, piece: str) -> int:
        pid = self._sp.piece_to_id(piece)
        if pid == self._sp.unk_id() and piece != self._sp.id_to_piece(pid):
            raise TokenizerError(f"{self._model_file}: the SentencePiece model has no piece {piece!r}")
        return pid + self.num_image_tokens

    @classmethod
    def from_dir(cls, path: str | Path, *, num_image_tokens: int | None = None, **kwargs: Any) -> IceTextTokenizer:
        """Load ``ice_text.model`` and the settings of ``tokenizer_config.json`` from an original model folder."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file}: expected a JSON object")
        if num_image_tokens is None:
            num_image_tokens = config.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS)
            if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 0:
                raise TokenizerError(f"{config_file}: field 'num_image_tokens' must be an integer >= 0")
            if "num_image_tokens" not in config:
                log.info("%s: no num_image_tokens in tokenizer_config.json; using the original's default %d",
                         path, num_image_tokens)  # fmt: skip
        for key in ("bos_token", "eos_token", "mask_token", "gmask_token", "pad_token", "unk_token"):
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken written as {"content": ...}
                value = value.get("content")
            if value is not None and key not in kwargs:
                if not isinstance(value, str):
                    raise TokenizerError(f"{config_file}: field '{key}' must be a string")
                kwargs[key] = value
        for key in ("remove_space", "do_lower_case"):
            if key in config and key not in kwargs:
                kwargs[key] = bool(config[key])
        extra = [path / name for name in COMPANION_FILES if (path / name).is_file()]
        return cls(path / TOKENIZER_FILE, num_image_tokens=num_image_tokens, extra_files=extra, **kwargs)

    # ---- sizes and ids -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self._n_pieces

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def gmask_id(self) -> int:
        return self._gmask

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def special_id(self, token: str) -> int:
        """Id of ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> <pad> <unk>`` (``sop``/``eop`` too)."""
        name = _ALIASES.get(token, token)
        if name in self._special:
            return self._special[name]
        raise KeyError(f"{token!r} is not a special token of ChatGLM-6B ({', '.join(self._special)})")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def files(self) -> list[Path]:
        return [self._model_file, *self._extra_files]

    def id_to_piece(self, token_id: int) -> str:
        if token_id < self.num_image_tokens:
            return f"<image_{token_id}>"
        if token_id >= self.vocab_size:
            raise KeyError(f"id {token_id} is outside the vocabulary of {self._model_file} ({self.vocab_size} ids)")
        return self._sp.id_to_piece(token_id - self.num_image_tokens)

    # ---- encode ---------------------------------------------------------------------------------------------------
    def preprocess(self, text: str, linebreak: bool = True, whitespaces: bool = True) -> str:
        """The text SentencePiece sees: ``<n>``, ``<|tab|>``, ``<|blank_N|>`` (and the config's space/case options)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        if linebreak:
            text = text.replace("\n", LINEBREAK_TOKEN)
        if whitespaces:
            text = text.replace("\t", TAB_TOKEN)
            for n in range(MAX_BLANK_LENGTH, 1, -1):
                text = text.replace(" " * n, blank_token(n))
        return text

    def encode(
        self, text: str, *, linebreak: bool = True, whitespaces: bool = True, add_dummy_prefix: bool = True
    ) -> list[int]:
        """Text -> ids (no ``[gMASK] <sop>``, no eos), as the original ``encode(text, add_special_tokens=False)``.

        As the original (a transformers tokenizer), the registered special tokens' strings (bos, eos, mask, pad, unk:
        ``<sop>``, ``<eop>``, ``[MASK]``, ``<pad>``, ``<unk>``) are cut out of the text first, leftmost-longest, and
        become their ids; each piece of text between them is encoded on its own (with its own dummy prefix).
        """
        ids: list[int] = []
        for k, part in enumerate(self._special_split.split(text)):
            if k % 2:  # a special token's string
                ids.append(self._special[part])
            elif part:
                ids += self._encode_piece(part, linebreak, whitespaces, add_dummy_prefix or k > 0)
        return ids

    def _encode_piece(self, text: str, linebreak: bool, whitespaces: bool, add_dummy_prefix: bool) -> list[int]:
        text = self.preprocess(text, linebreak, whitespaces)
        if not add_dummy_prefix:
            text = LINEBREAK_TOKEN + text
        ids = [i + self.num_image_tokens for i in self._sp.encode(text)]
        return ids if add_dummy_prefix else ids[2:]

    def prompt_ids(self, text: str) -> list[int]:
        """``text [gMASK] <sop>``: the original's model input for a prompt."""
        return self.build_inputs(self.encode(text))

    def build_inputs(self, prompt: list[int], answer: list[int] | None = None) -> list[int]:
        """``prompt [gMASK] <sop>`` and, with an answer, ``... answer <eop>`` (``build_inputs_with_special_tokens``)."""
        ids = [*prompt, self._gmask, self._bos]
        if answer is not None:
            ids += [*answer, self._eos]
        return ids

    # ---- decode ---------------------------------------------------------------------------------------------------
    def postprocess(self, text: str) -> str:
        text = text.replace(LINEBREAK_TOKEN, "\n").replace(TAB_TOKEN, "\t")
        for n in range(2, MAX_BLANK_LENGTH + 1):
            text = text.replace(blank_token(n), " " * n)
        return text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        pieces: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self._pad or (skip_special_tokens and token_id in self._special_ids):
                continue
            sp_id = token_id - self.num_image_tokens
            if 0 <= sp_id < self._n_pieces:  # image ids and the model's padded rows have no text
                pieces.append(sp_id)
        text = self.postprocess(self._sp.decode(pieces))
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def __repr__(self) -> str:
        return f"IceTextTokenizer({str(self._model_file)!r}, num_image_tokens={self.num_image_tokens})"


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (what ``decode`` applied by default in transformers 4.27)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


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
        return spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, TypeError) as e:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from e
