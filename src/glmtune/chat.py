"""A chat session over a loaded model: history in the generation's own prompt format, streamed replies."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from glmtune.generate import Decoder, GenerationConfig, generate_stream
from glmtune.pretrained import Pretrained
from glmtune.templates import Message
from glmtune.tokenizers.base import Tokenizer
from glmtune.tokenizers.stream import StreamDecoder

log = logging.getLogger(__name__)

# What the generations' clean-up (Template.postprocess) may still rewrite once more text arrives: ChatGLM-6B turns
# ASCII punctuation next to a CJK character into full-width (the character may be the next one), and every
# generation replaces the training-date placeholder. Streamed text stops short of such a tail until it is settled.
_PUNCTUATION = ",!:;?"
_PLACEHOLDER = "[[训练时间]]"


def _unsettled(text: str) -> int:
    """How many trailing characters of cleaned ``text`` the clean-up may still change."""
    for n in range(min(len(text), len(_PLACEHOLDER) - 1), 0, -1):
        if _PLACEHOLDER.startswith(text[-n:]):
            return n
    return 1 if text and text[-1] in _PUNCTUATION else 0


class ReplyText:
    """Generated ids -> the reply's text in pieces: decoded incrementally (``StreamDecoder``), cleaned up as the
    generation's original code does, and shown only where later tokens cannot change it.

    The pieces join to exactly ``text``, the cleaned-up decode of all ids."""

    def __init__(self, tokenizer: Tokenizer, clean: Callable[[str], str] | None) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._clean = clean
        self._raw: list[str] = []
        self._shown = ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now settled (possibly "")."""
        piece = self._decoder.push(token_id)
        if not piece:
            return ""
        self._raw.append(piece)
        if self._clean is None:
            self._shown += piece
            return piece
        cleaned = self._clean("".join(self._raw))
        settled = cleaned[: len(cleaned) - _unsettled(cleaned)]
        if len(settled) <= len(self._shown) or not settled.startswith(self._shown):
            return ""  # nothing new, or a rewrite of what is shown: wait for the end
        return self._show(settled)

    def finish(self) -> str:
        """The rest of the reply."""
        self._raw.append(self._decoder.flush())
        text = self.text
        if not text.startswith(self._shown):
            # Printed text cannot be taken back: go on from the same position (only an unforeseen rewrite gets here)
            log.debug("clean-up rewrote streamed text: %r -> %r", self._shown, text)
        return self._show(text)

    @property
    def text(self) -> str:
        raw = "".join(self._raw)
        return self._clean(raw) if self._clean is not None else raw

    def _show(self, text: str) -> str:
        new = text[len(self._shown) :]
        self._shown = text
        return new


@dataclass
class ChatSession:
    pretrained: Pretrained
    gen: GenerationConfig
    system: str | None = None
    postprocess: bool = True  # the generation's original response clean-up (v1 punctuation, v3 metadata line)
    history: list[Message] = field(default_factory=list)
    dropped_turns: int = 0  # oldest turns the last reply had to forget to fit the model's context
    _decoder: Decoder | None = field(default=None, repr=False)

    def clear(self) -> None:
        self.history.clear()

    def messages_for(self, query: str, skip_turns: int = 0) -> list[Message]:
        """The system prompt, the history without its ``skip_turns`` oldest turns, and ``query``."""
        head = [Message("system", self.system)] if self.system else []
        return head + self.history[2 * skip_turns :] + [Message("user", query)]

    @property
    def context_length(self) -> int:
        return int(self.pretrained.config.seq_length)

    def fit_prompt(self, query: str) -> list[int]:
        """The prompt ids for ``query``; the oldest turns leave the history (``dropped_turns``) while the prompt and
        room for the reply (``max_new_tokens``, at most half the context) exceed the model's context."""
        p = self.pretrained
        limit = self.context_length
        room = min(self.gen.max_new_tokens, limit // 2)
        dropped = 0
        while True:
            prompt = p.template.encode_prompt(p.tokenizer, self.messages_for(query, dropped))
            if len(prompt) + room <= limit or 2 * dropped >= len(self.history):
                break
            dropped += 1  # one turn: the user's message and the reply
        if len(prompt) >= limit:  # the history stays as it is: nothing was said
            raise ValueError(f"the message is too long: its prompt is {len(prompt)} tokens and the model's context "
                             f"is {limit}")  # fmt: skip
        del self.history[: 2 * dropped]
        self.dropped_turns = dropped
        if dropped:
            log.debug("dropped %d oldest turns to fit the context of %d tokens", dropped, limit)
        return prompt

    def reply_stream(self, query: str) -> Iterator[str]:
        """Yield the reply's text as it grows (only new text each time); the finished turn joins the history.

        The prompt is built (and the history trimmed to fit, or ValueError for a message too long) before this
        returns. Closing the iterator early (Ctrl-C in the terminal) keeps what was said so far as the reply.
        """
        prompt = self.fit_prompt(query)
        gen = replace(self.gen, max_new_tokens=min(self.gen.max_new_tokens, self.context_length - len(prompt)))
        return self._stream(query, prompt, gen)

    def _stream(self, query: str, prompt: list[int], gen: GenerationConfig) -> Iterator[str]:
        p = self.pretrained
        text = ReplyText(p.tokenizer, self._clean if self.postprocess else None)
        if self._decoder is None:  # kept from turn to turn: buffers and the captured decode step are reused
            self._decoder = Decoder(p.model)
        stream = generate_stream(p.model, [prompt], gen, stop_ids=p.template.stop_ids(p.tokenizer),
                                 pad_id=p.tokenizer.pad_id, decoder=self._decoder)  # fmt: skip
        try:
            for step in stream:
                t = int(step[0])
                if t < 0:
                    break
                piece = text.push(t)
                if piece:
                    yield piece
            rest = text.finish()
            if rest:
                yield rest
        finally:
            stream.close()
            self.history += [Message("user", query), Message("assistant", text.text)]

    def reply(self, query: str) -> str:
        """The whole reply (cleaned up unless ``postprocess`` is off)."""
        for _ in self.reply_stream(query):
            pass
        return self.history[-1].content

    def _clean(self, text: str) -> str:
        return self.pretrained.template.postprocess(text)


HELP = "Type a message. 'clear' empties the history, 'stop' or 'exit' ends; Ctrl-C interrupts a reply."


def line_reader() -> Callable[[str], str]:
    """``input`` with line editing and history recall (readline, where this Python has it), the prompt on stdout.

    Without readline, ``input`` on a terminal writes its prompt to stderr; it is written to stdout here instead."""
    try:
        import readline  # noqa: F401  (importing it is what gives input() line editing and history)
    except ImportError:

        def read(prompt: str) -> str:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            return input()

        return read
    return input


def run_terminal_chat(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The interactive loop. ``read`` is input(); ``write`` prints without adding a newline."""
    write(HELP + "\n")
    while True:
        write("\n")
        try:
            query = read("User: ").strip()
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n")
            continue
        if not query:
            continue
        if query in ("stop", "exit"):
            return
        if query == "clear":
            session.clear()
            write("(history cleared)\n")
            continue
        try:
            stream = session.reply_stream(query)
        except ValueError as e:
            write(f"({e}; nothing sent)\n")
            continue
        if session.dropped_turns:
            n = session.dropped_turns
            write(f"(forgot the oldest {n} turn{'s' if n > 1 else ''}: the conversation no longer fits the model's "
                  f"context of {session.context_length} tokens)\n")  # fmt: skip
        write("\nAssistant: ")
        try:
            for piece in stream:
                write(piece)
        except KeyboardInterrupt:
            write(" [interrupted]")
        finally:
            stream.close()
        write("\n")
