"""GLM-4-9B-chat tokenizer: byte-level BPE over a tiktoken ranks file, plus 14 special tokens.

Reproduces what a user of THUDM's ``tokenization_chatglm.py`` (``ChatGLM4Tokenizer``) gets from
``tokenizer.encode(text, add_special_tokens=False)``:

- ``tokenizer.model`` holds one ``<base64 bytes> <rank>`` per line; ranks are the ids 0..n-1.
- The 14 special tokens are transformers added tokens with ids from n (151329 in the released file). Literal
  special strings in the text are cut out first (leftmost, longest match, no stripping of nearby spaces) and become
  their ids; every piece of text between them is pre-tokenized with the original regex and BPE-encoded by tiktoken.
- ``encode_ordinary`` skips the special-string step (the original's ``self.tokenizer.encode(text,
  disallowed_special=())``, used by its ``build_single_message``).
- decode joins the bytes of each run of ordinary ids and decodes them as UTF-8 with ``errors="replace"``.
  ``skip_special_tokens=True`` drops the specials (byte runs on both sides then join); otherwise they are written
  inline. (transformers' slow decode puts a space between a special token and its neighbours when rendering
  them; we do not.) Ids outside the vocabulary decode to nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from pathlib import Path

import tiktoken

from glmtune.tokenizers.base import TokenizerError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenization_chatglm.py")

# The original pre-tokenization pattern (tiktoken / `regex` syntax).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


class GLM4Tokenizer:
    """Tokenizer of GLM-4-9B(-chat)."""

    generation = "glm4"

    def __init__(self, ranks_file: str | Path, *, extra_files: list[Path] | None = None) -> None:
        self._ranks_file = Path(ranks_file)
        self._extra_files = list(extra_files or [])
        ranks = read_ranks(self._ranks_file)
        self._n_ranks = len(ranks)
        self._enc = tiktoken.Encoding(
            name=f"glm4:{self._ranks_file}", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        self._specials = {token: self._n_ranks + i for i, token in enumerate(GLM4_SPECIAL_TOKENS)}
        self._special_by_id = {i: token for token, i in self._specials.items()}
        # Alternatives longest first: leftmost match, then the longest, like transformers' added-token trie.
        by_length = sorted(GLM4_SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in by_length))

    @classmethod
    def from_dir(cls, path: str | Path) -> GLM4Tokenizer:
        """Load ``tokenizer.model`` from an original GLM-4 model folder."""
        path = Path(path)
        extra = [path / name for name in COMPANION_FILES if (path / name).is_file()]
        tokenizer = cls(path / TOKENIZER_FILE, extra_files=extra)
        tokenizer._check_config(path / "tokenizer_config.json")
        return tokenizer

    # ---- sizes and ids -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._n_ranks + len(self._specials)

    @property
    def eos_id(self) -> int:
        return self._specials["<|endoftext|>"]

    @property
    def pad_id(self) -> int:
        return self._specials["<|endoftext|>"]

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special tokens, text -> id, in id order."""
        return dict(self._specials)

    def special_id(self, token: str) -> int:
        try:
            return self._specials[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of glm4") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def prefix_ids(self) -> list[int]:
        """``[gMASK] <sop>``, which the original puts before every input."""
        return [self._specials["[gMASK]"], self._specials["<sop>"]]

    @property
    def files(self) -> list[Path]:
        return [self._ranks_file, *self._extra_files]

    # ---- encode / decode -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids like the original's ``encode(text, add_special_tokens=False)``; literal specials included."""
        ids: list[int] = []
        last = 0
        for match in self._special_re.finditer(text):
            if match.start() > last:
                ids.extend(self._enc.encode_ordinary(text[last : match.start()]))
            ids.append(self._specials[match.group()])
            last = match.end()
        if last < len(text):
            ids.extend(self._enc.encode_ordinary(text[last:]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """BPE ids for ``text`` with special strings treated as plain text."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in self._special_by_id:
                if skip_special_tokens:
                    continue
                if run:
                    parts.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
                    run = []
                parts.append(self._special_by_id[token_id])
            elif 0 <= token_id < self._n_ranks:
                run.append(token_id)
        if run:
            parts.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one ordinary id (special tokens: their UTF-8 text)."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode()
        if not 0 <= token_id < self._n_ranks:
            raise KeyError(f"id {token_id} is outside the vocabulary of {self._ranks_file} ({self.vocab_size} ids)")
        return self._enc.decode_single_token_bytes(token_id)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id: a special token's text; an ordinary id's bytes, a byte that is not UTF-8 on
        its own written as ``\\xNN``."""
        return self.id_to_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def _check_config(self, config_file: Path) -> None:
        """Warn when a tokenizer_config.json numbers the special tokens differently from the ranks file."""
        if not config_file.is_file():
            return
        try:
            decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            declared = {entry["content"]: int(i) for i, entry in decoder.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("%s: cannot read added_tokens_decoder (%s); using the built-in special ids", config_file, e)
            return
        for token, token_id in declared.items():
            if self._specials.get(token, token_id) != token_id:
                logger.warning(
                    "%s: added_tokens_decoder gives %s id %d, the ranks file implies %d; using %d",
                    config_file,
                    token,
                    token_id,
                    self._specials[token],
                    self._specials[token],
                )

    def __repr__(self) -> str:
        return f"GLM4Tokenizer({str(self._ranks_file)!r})"


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file (``<base64 token> <rank>`` per line); ranks must be exactly 0..n-1."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror or e})") from e
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerError(f"{path}: line {lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError) as e:
            raise TokenizerError(f"{path}: line {lineno}: bad token or rank {line[:60]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}: line {lineno}: token {token!r} appears twice")
        if rank in seen_ranks or rank < 0:
            raise TokenizerError(f"{path}: line {lineno}: rank {rank} is negative or repeated")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise TokenizerError(f"{path}: no ranks (empty or not a tiktoken ranks file)")
    if max(seen_ranks) != len(ranks) - 1:
        raise TokenizerError(f"{path}: ranks are not contiguous 0..{len(ranks) - 1} (max is {max(seen_ranks)})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes have no rank (first: {missing[0]:#04x})")
    return ranks


def looks_like_ranks_file(path: str | Path) -> bool:
    """True when the file starts like a tiktoken ranks file (text ``<base64> <int>``), not a SentencePiece proto."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2} \d+", first) is not None
