"""Incremental detokenization for streaming generation: emit only text that is complete."""

from __future__ import annotations

from glmtune.tokenizers.base import Tokenizer

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces whose concatenation equals ``decode(all ids)``.

    Each ``push`` decodes a short window: the ids since the last emitted piece plus the piece before it as context
    (so SentencePiece's leading-space rule and byte-level merges see what the full decode sees). Text is held back
    while it ends in U+FFFD, i.e. while the last bytes of a multi-byte character have not arrived yet; ``flush``
    releases whatever is left at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character comes out as U+FFFD) and reset."""
        text = self._emit(final=True)
        self._ids.clear()
        self._prefix_offset = self._read_offset = 0
        return text

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        before = decode(window[: self._read_offset - self._prefix_offset], skip_special_tokens=self._skip)
        text = decode(window, skip_special_tokens=self._skip)
        if len(text) <= len(before):
            return ""
        if not final and (text.endswith(_REPLACEMENT) or not text.startswith(before)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(before) :]
