"""A chat session over a loaded model: history in the generation's own prompt format, streamed replies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from glmtune.generate import GenerationConfig, generate_stream
from glmtune.pretrained import Pretrained
from glmtune.templates import Message


@dataclass
class ChatSession:
    pretrained: Pretrained
    gen: GenerationConfig
    system: str | None = None
    postprocess: bool = True  # the generation's original response clean-up (v1 punctuation, v3 metadata line)
    history: list[Message] = field(default_factory=list)

    def clear(self) -> None:
        self.history.clear()

    def messages_for(self, query: str) -> list[Message]:
        head = [Message("system", self.system)] if self.system else []
        return head + self.history + [Message("user", query)]

    def reply_stream(self, query: str) -> Iterator[str]:
        """Yield the reply's text as it grows (only new text each time); the finished turn joins the history.

        Closing the iterator early (Ctrl-C in the terminal) keeps what was said so far as the reply.
        """
        p = self.pretrained
        prompt = p.template.encode_prompt(p.tokenizer, self.messages_for(query))
        stream = generate_stream(
            p.model, [prompt], self.gen, stop_ids=p.template.stop_ids(p.tokenizer), pad_id=p.tokenizer.pad_id
        )
        tokens: list[int] = []
        shown = ""
        try:
            for step in stream:
                t = int(step[0])
                if t < 0:
                    break
                tokens.append(t)
                text = p.tokenizer.decode(tokens)
                if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
                    continue
                text = self._clean(text)
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
            final = self._clean(p.tokenizer.decode(tokens))
            if final.startswith(shown) and len(final) > len(shown):
                yield final[len(shown) :]
        finally:
            stream.close()
            self.history += [Message("user", query), Message("assistant", self._clean(p.tokenizer.decode(tokens)))]

    def reply(self, query: str) -> str:
        return "".join(self.reply_stream(query))

    def _clean(self, text: str) -> str:
        return self.pretrained.template.postprocess(text) if self.postprocess else text


HELP = "Type a message. 'clear' empties the history, 'stop' or 'exit' ends; Ctrl-C interrupts a reply."


def run_terminal_chat(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The interactive loop. ``read`` is input(); ``write`` prints without adding a newline."""
    write(HELP + "\n")
    while True:
        try:
            query = read("\nUser: ").strip()
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
        write("\nAssistant: ")
        stream = session.reply_stream(query)
        try:
            for piece in stream:
                write(piece)
        except KeyboardInterrupt:
            write(" [interrupted]")
        finally:
            stream.close()
        write("\n")
