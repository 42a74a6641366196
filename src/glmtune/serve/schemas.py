"""Requests of the OpenAI chat API checked by hand: every mistake becomes an :class:`APIError` (a 4xx in OpenAI's
error shape) that names the field, and out-of-range values are refused, never clamped.

Pure Python (no torch, no FastAPI): the parsed request is a plain dataclass the app turns into a generation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from glmtune.serve.tools import ToolError, message_text

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body. ``max_tokens`` None: up to the model's context."""

    messages: list[tuple[str, str]]  # (role, content)
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's defaults
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts
    # tool calling (ChatGLM3, GLM-4): the request as sent, checked by serve/tools.py against the generation
    raw_messages: list[dict] = field(default_factory=list)
    tools: Any = None
    tool_choice: Any = None

    @property
    def uses_tools(self) -> bool:
        """True when the request has tools, a tool result or an assistant tool call (serve/tools.py renders it)."""
        return (
            bool(self.tools)
            or self.tool_choice is not None
            or any(m.get("role") == "tool" or m.get("tool_calls") for m in self.raw_messages)
        )


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(f"'{name}' must be a number, got {_type_name(v)}", name, "invalid_type")
    if (v <= low if low_open else v < low) or v > high:
        lo = f"({low}" if low_open else f"[{low}"
        raise _bad(f"'{name}' must be in {lo}, {high}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise _bad(f"'{name}' must be an integer, got {_type_name(v)}", name, "invalid_type")
    return v


def _content(v: Any, param: str) -> str:
    """A message's content as text (``tools.message_text``: a string or a list of text parts)."""
    try:
        return message_text(v, param)
    except ToolError as e:
        raise _bad(e.message, e.param, "invalid_type") from None


def _messages(v: Any) -> list[tuple[str, str]]:
    if v is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(v, list):
        raise _bad(f"'messages' must be an array, got {_type_name(v)}", "messages", "invalid_type")
    if not v:
        raise _bad("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(v):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{param}' must be an object, got {_type_name(m)}", param, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"'{param}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
        if role == "tool" or m.get("tool_calls"):  # checked with the tools (serve/tools.py)
            out.append((role, ""))
            continue
        out.append((role, _content(m.get("content"), f"{param}.content")))
    if out[-1][0] not in ("user", "tool"):
        raise _bad(
            "the last message must be a user message or a tool result (the server answers it)",
            f"messages[{len(out) - 1}]",
        )
    return out


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or APIError 400 (invalid UTF-8 or JSON)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded JSON body; raise APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_type_name(model)}", "model", "invalid_type")
    messages = _messages(body.get("messages"))
    max_tokens = _integer(body, "max_tokens")
    if body.get("max_completion_tokens") is not None:  # the newer name of the same limit
        max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is not None and max_tokens <= 0:
        raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad(f"'seed' must be in [0, 2**63), got {seed}", "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), got {n}", "n", "unsupported_value")
    if body.get("functions") or body.get("function_call"):
        raise _bad("'functions' is OpenAI's deprecated form; send 'tools'", "functions", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise _bad(f"'{name}' is not supported by this server (only 0)", name, "unsupported_value")
    return ChatRequest(
        messages=messages,
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=[s for s in stops if s],
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        raw_messages=body["messages"],
        tools=body.get("tools"),
        tool_choice=body.get("tool_choice"),
    )


class StopText:
    """Text pieces -> the same text cut before the first stop string. Text that may be the start of a stop string is
    held back until the next piece tells (``flush`` releases it at the end)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """Add text; return what is now certain to come before any stop string (``hit`` turns True at one)."""
        if self.hit:
            return ""
        self._held += piece
        cuts = [i for s in self.stops if (i := self._held.find(s)) >= 0]
        if cuts:
            self.hit = True
            out, self._held = self._held[: min(cuts)], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._held)), hold, -1):
                if self._held.endswith(s[:k]):
                    hold = k
                    break
        out = self._held[: len(self._held) - hold]
        self._held = self._held[len(out) :]
        return out

    def flush(self) -> str:
        out, self._held = ("" if self.hit else self._held), ""
        return out
