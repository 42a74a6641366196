"""The internal shape every data format becomes: a conversation (messages) with where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.templates import Message


class RecordError(ValueError):
    """A record that cannot be used; the message names the file, the line (or row) and the field."""

    def __init__(self, where: str, field: str | None, problem: str) -> None:
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{problem}")


@dataclass
class Sample:
    """One conversation. ``origin`` is "file:line" (or "file:row N"); ``history_rounds`` marks v1 records read
    with a history column (the original ptuning then writes "[Round 0]" even for an empty history)."""

    messages: list[Message]
    origin: str = ""
    history_rounds: bool = False


def validate_messages(messages: list[Message], where: str) -> None:
    """Structural checks shared by all formats: an assistant turn with text, tool calls only with tools."""
    if not messages:
        raise RecordError(where, None, "no messages")
    if not any(m.role == "assistant" for m in messages):
        raise RecordError(where, None, "no assistant message to train on")
    has_tools = any(m.tools for m in messages)
    for i, m in enumerate(messages):
        if not isinstance(m.content, str):
            raise RecordError(where, f"messages[{i}].content", f"expected text, got {type(m.content).__name__}")
        if m.role == "assistant" and not m.content.strip():
            raise RecordError(where, f"messages[{i}].content", "empty assistant reply")
        if m.role in ("user", "observation", "tool") and not m.content.strip():
            raise RecordError(where, f"messages[{i}].content", f"empty {m.role} message")
        if m.role == "assistant" and m.metadata and not has_tools:
            raise RecordError(where, f"messages[{i}]", f"tool call {m.metadata!r} but the record defines no tools")
