"""OpenAI tool calling mapped onto ChatGLM3's and GLM-4's own tool-call formats, both ways. Pure Python.

- :func:`parse_tools` checks a request's ``tools`` and ``tool_choice`` and returns the tools to show the model;
- :func:`request_messages` turns the request's messages (system / user / assistant with ``content`` and/or
  ``tool_calls`` / tool results) into :class:`~glmtune.templates.Message` turns in the model's format;
- :func:`reply_message` turns a generated reply back into OpenAI's ``(content, tool_calls)``.

The formats (as THUDM's ``openai_api_demo``/``basic_demo`` servers, ``PROMPT.md`` and GLM-4's chat template):

- **ChatGLM3**: the tools are a system turn ``CHATGLM3_TOOL_PROMPT`` + the function definitions as indented JSON
  (bare ``{"name", "description", "parameters"}`` objects, the form its tool data uses); a call is an assistant
  turn whose metadata is the tool's name and whose text is ```` ```python\\ntool_call(k=v, …)\\n``` ```` (Python
  literals; read back with ``ast.literal_eval``, never ``eval``); a result is an ``<|observation|>`` turn.
- **GLM-4**: the tools are a system block written by its chat template (OpenAI-shaped ``{"type": "function",
  "function": …}`` definitions); a call is an assistant turn ``<|assistant|>{name}\\n{JSON arguments}``; a result
  is an ``<|observation|>`` turn.

Choices where the official demos differ or say nothing:

- the caller's own system message is kept as its own system turn after the tools (the demos drop it);
- a named ``tool_choice`` shows only that tool (as GLM-4's demo) and forces its call: the reply is started with the
  tool's name as its metadata line (:func:`forced_tool`), so the model can only go on with the arguments;
  ``"required"`` forces the call the same way when there is one tool; with several it shows them as ``"auto"``
  does (the formats have no way to make the model pick one), so a client that needs a call checks
  ``finish_reason == "tool_calls"``; ``"none"`` shows none;
- function definitions reach the prompt as ``name``, ``description``, ``parameters`` in that order (other keys
  such as ``strict`` are not shown to the model);
- an assistant message with text *and* tool calls becomes a plain assistant turn followed by one turn per call,
  which is how a reply that talks first and then calls a tool reads (:func:`reply_message` returns both);
- a GLM-4 call's ``arguments`` are the model's JSON text as generated (stripped), so sending a reply back in the
  next request's history reproduces the model's own tokens; ChatGLM3's are re-encoded as JSON.
"""

from __future__ import annotations

import ast
import hashlib
import json
import keyword
import re
from typing import Any

from glmtune.templates import CHATGLM3_TOOL_PROMPT, Message, chatglm3_tool_call, get_template

TOOL_GENERATIONS = ("chatglm3", "glm4")
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name of system
TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"[\w.-]{1,64}")  # no whitespace: the name is the metadata line of the model's format
_ROLE_TOKEN = "<|assistant|>"


class ToolError(ValueError):
    """A malformed ``tools``/``tool_choice``/message, or tools for a generation without them: an HTTP 400 whose
    ``param`` names the field (``messages[2].tool_calls[0].function.arguments``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _function_part(item: Any, param: str, default_type: str | None) -> dict[str, Any]:
    """The ``function`` object of a tool definition or a tool call, its ``type`` and ``name`` checked."""
    if not isinstance(item, dict):
        raise ToolError(f"'{param}' must be an object, got {_kind(item)}", param)
    if item.get("type", default_type) != "function":
        raise ToolError(f"'{param}.type' must be 'function', got {item.get('type')!r}", f"{param}.type")
    fn = item.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"'{param}.function' must be an object, got {_kind(fn)}", f"{param}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"'{param}.function.name' must be 1 to 64 letters, digits, '_', '-' or '.', got {name!r}",
                        f"{param}.function.name")  # fmt: skip
    return fn


def _function(tool: Any, param: str) -> dict[str, Any]:
    """One checked tool definition as ``{"name", "description"?, "parameters"?}``."""
    fn = _function_part(tool, param, None)
    out: dict[str, Any] = {"name": fn["name"]}
    for key, kind, what in (("description", str, "a string"), ("parameters", dict, "a JSON Schema object")):
        value = fn.get(key)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise ToolError(f"'{param}.function.{key}' must be {what}, got {_kind(value)}", f"{param}.function.{key}")
        out[key] = value
    return out


def parse_tools(tools: Any, tool_choice: Any, generation: str) -> list[dict[str, Any]] | None:
    """The checked ``tools`` to show the model as ``[{"type": "function", "function": {...}}]``, or None (no tools,
    an empty list, or ``tool_choice`` ``"none"``). A named ``tool_choice`` keeps only that tool (whose call
    :func:`forced_tool` then forces). Raises :class:`ToolError` naming the field."""
    if tools is not None and not isinstance(tools, list):
        raise ToolError(f"'tools' must be an array of tool definitions, got {_kind(tools)}", "tools")
    functions = [_function(t, f"tools[{i}]") for i, t in enumerate(tools or [])]
    seen: set[str] = set()
    for i, fn in enumerate(functions):
        if fn["name"] in seen:
            raise ToolError(f"'tools[{i}].function.name': {fn['name']!r} is defined twice", f"tools[{i}].function.name")
        seen.add(fn["name"])
    if functions and generation not in TOOL_GENERATIONS:
        raise ToolError(f"'tools' need a generation with tool calls (chatglm3 or glm4); this model is {generation}",
                        "tools")  # fmt: skip
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ToolError(f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or "
                            f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {tool_choice!r}",
                            "tool_choice")  # fmt: skip
        if tool_choice == "none":
            return None
        if not functions:
            raise ToolError(f"'tool_choice' {tool_choice!r} needs 'tools'", "tool_choice")
        return [{"type": "function", "function": fn} for fn in functions]
    if not isinstance(tool_choice, dict):
        raise ToolError(f"'tool_choice' must be a string or an object, got {_kind(tool_choice)}", "tool_choice")
    if tool_choice.get("type") != "function":
        raise ToolError(f"'tool_choice.type' must be 'function', got {tool_choice.get('type')!r}", "tool_choice.type")
    chosen = tool_choice.get("function")
    if not isinstance(chosen, dict):
        raise ToolError(f"'tool_choice.function' must be an object, got {_kind(chosen)}", "tool_choice.function")
    name = chosen.get("name")
    if not isinstance(name, str):
        raise ToolError(f"'tool_choice.function.name' must be a string, got {_kind(name)}", "tool_choice.function.name")
    picked = [fn for fn in functions if fn["name"] == name]
    if not picked:
        known = ", ".join(repr(fn["name"]) for fn in functions) or "none"
        raise ToolError(f"'tool_choice.function.name' {name!r} is not among 'tools' ({known})",
                        "tool_choice.function.name")  # fmt: skip
    return [{"type": "function", "function": picked[0]}]


def forced_tool(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """The name of the tool whose call the reply must be (its metadata line is put in the prompt), or None: a named
    ``tool_choice``, or ``"required"`` with one tool. ``tools`` and ``tool_choice`` as :func:`parse_tools` checked
    and returned them."""
    if not tools:
        return None
    if isinstance(tool_choice, dict) or (tool_choice == "required" and len(tools) == 1):
        return tools[0]["function"]["name"]
    return None


def message_text(v: Any, param: str, *, optional: bool = False) -> str:
    """A message's ``content`` as text: a string, a list of text parts (what the openai client sends for
    multi-part content), or (``optional``) null as ""; else :class:`ToolError` naming ``param``."""
    if isinstance(v, str):
        return v
    if v is None and optional:
        return ""
    if isinstance(v, list):
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ToolError(f"'{param}[{i}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; only text "
                                "content is supported", f"{param}[{i}]")  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise ToolError(f"'{param}' must be a string or a list of text parts, got {_kind(v)}", param)


def _json_object(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise ToolError(f"'{param}' must be a JSON object as a string: {e}", param) from None
    if not isinstance(value, dict):
        raise ToolError(f"'{param}' must be a JSON object as a string, got JSON {_kind(value)}", param)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _tool_call_turns(calls: Any, param: str, generation: str) -> tuple[list[Message], list[str]]:
    """An assistant message's ``tool_calls`` as one assistant turn per call (the name as metadata) and their ids."""
    if not isinstance(calls, list):
        raise ToolError(f"'{param}' must be an array, got {_kind(calls)}", param)
    turns, ids = [], []
    for j, call in enumerate(calls):
        p = f"{param}[{j}]"
        fn = _function_part(call, p, "function")
        ident = call.get("id")
        if not isinstance(ident, str) or not ident:
            raise ToolError(f"'{p}.id' must be a non-empty string, got {_kind(ident)}", f"{p}.id")
        raw = fn.get("arguments")
        if not isinstance(raw, str):
            raise ToolError(f"'{p}.function.arguments' must be a JSON object as a string, got {_kind(raw)}",
                            f"{p}.function.arguments")  # fmt: skip
        arguments = _json_object(raw, f"{p}.function.arguments")
        if generation == "chatglm3":  # Python keyword arguments: the names must be identifiers
            bad = [k for k in arguments if not k.isidentifier() or keyword.iskeyword(k)]
            if bad:
                where = f"{p}.function.arguments"
                raise ToolError(f"'{where}': ChatGLM3 writes a call's arguments as Python keyword arguments, and "
                                f"{bad[0]!r} is not a Python name", where)  # fmt: skip
        text = chatglm3_tool_call(arguments) if generation == "chatglm3" else raw.strip()
        turns.append(Message("assistant", text, metadata=fn["name"]))
        ids.append(ident)
    return turns, ids


def _tools_turn(tools: list[dict[str, Any]], generation: str) -> Message:
    if generation == "chatglm3":  # build_chat_input dumps the definitions it is given; its tool data are bare
        return Message("system", CHATGLM3_TOOL_PROMPT, tools=[t["function"] for t in tools])
    return Message("system", "", tools=tools)  # GLM-4's chat template: the tools block, no content


def request_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     generation: str) -> list[Message]:  # fmt: skip
    """A request's messages (already a list) as the model's turns, the tools (from :func:`parse_tools`) first.

    v1/v2 take system, user and assistant text only (tool calls and results raise :class:`ToolError`); the last
    message must be a user message, or a tool result on ChatGLM3/GLM-4 (the model answers it)."""
    if not isinstance(messages, list) or not messages:
        raise ToolError("'messages' must be a non-empty array", "messages")
    with_tools = generation in TOOL_GENERATIONS
    if tools and not with_tools:
        raise ToolError(f"'tools' need a generation with tool calls (chatglm3 or glm4); this model is {generation}",
                        "tools")  # fmt: skip
    out = [_tools_turn(tools, generation)] if tools else []
    pending: list[str] = []  # ids of the last assistant message's calls that have no result yet
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ToolError(f"'{param}' must be an object, got {_kind(m)}", param)
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise ToolError(f"'{param}.role' must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", f"{param}.role")
        if role == "tool":
            if not with_tools:
                raise ToolError(f"'{param}': tool results need a generation with tool calls (chatglm3 or glm4); "
                                f"this model is {generation}", f"{param}.role")  # fmt: skip
            ident = m.get("tool_call_id")
            if not isinstance(ident, str) or ident not in pending:
                want = ", ".join(repr(x) for x in pending) or "none: no assistant tool call precedes it"
                raise ToolError(f"'{param}.tool_call_id' must answer a tool call of the assistant message before it "
                                f"({want}), got {ident!r}", f"{param}.tool_call_id")  # fmt: skip
            pending.remove(ident)
            out.append(Message("observation", message_text(m.get("content"), f"{param}.content")))
            continue
        pending = []
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            if not with_tools:
                raise ToolError(f"'{param}.tool_calls': tool calls need a generation with tool calls (chatglm3 or "
                                f"glm4); this model is {generation}", f"{param}.tool_calls")  # fmt: skip
            content = message_text(m.get("content"), f"{param}.content", optional=True)
            turns, pending = _tool_call_turns(calls, f"{param}.tool_calls", generation)
            out += ([Message("assistant", content)] if content.strip() else []) + turns
            continue
        content = message_text(m.get("content"), f"{param}.content", optional=role == "assistant")
        out.append(Message("system" if role == "developer" else role, content))
    last = messages[-1].get("role")
    if last != "user" and not (last == "tool" and with_tools):
        answers = "a user message or a tool result" if with_tools else "a user message"
        raise ToolError(f"the last message must be {answers} (the model answers it), got {last!r}",
                        f"messages[{len(messages) - 1}].role")  # fmt: skip
    return out


def tool_call_possible(raw: str, generation: str, tools: list[dict[str, Any]] | None) -> bool:
    """Whether a reply that begins with ``raw`` (as :func:`reply_message` takes it) may still turn out to be a tool
    call: its first line is, or may yet become, one of ``tools``' names. A streaming server holds the text back
    while this is True and streams it as content once it is False (a plain reply's first line is empty)."""
    if generation not in TOOL_GENERATIONS or not tools:
        return False
    names = [t["function"]["name"] for t in tools]
    first, newline, _ = raw.partition("\n")
    head = first.strip()
    if newline:
        return head in names
    return any(name.startswith(head) for name in names)


def _call_id(raw: str, index: int) -> str:
    """Deterministic for a reply, distinct between the calls of one reply."""
    return "call_" + hashlib.sha256(f"{index}\0{raw}".encode()).hexdigest()[:24]


def _chatglm3_arguments(body: str) -> dict[str, Any] | None:
    """The keyword arguments of ```` ```python\\ntool_call(k=v, …)\\n``` ```` as literals, or None."""
    block = re.fullmatch(r"```(?:python)?[ \t]*\n(.*)\n[ \t]*```", body.strip(), flags=re.DOTALL)
    if block is None:
        return None
    try:
        tree = ast.parse(block.group(1).strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if (not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call"
            or call.args or any(k.arg is None for k in call.keywords)):  # fmt: skip
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None


def _tool_call(name: str, body: str, generation: str) -> str | None:
    """The call's arguments as a JSON string, or None when ``body`` is not this generation's call format."""
    if generation == "chatglm3":
        arguments = _chatglm3_arguments(body)
        if arguments is None:
            return None
        try:
            return json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):  # a set, bytes, a float infinity: not JSON
            return None
    text = body.strip()
    try:
        _json_object(text, "arguments")
    except ToolError:
        return None
    return text


def reply_message(raw: str, generation: str, tools: list[dict[str, Any]] | None) -> tuple[str | None, list | None]:
    """A generated reply as OpenAI's ``(content, tool_calls)``.

    ``raw`` is the decoded text after the prompt's ``<|assistant|>``, metadata line included (a ChatGLM3 reply
    decoded with its specials may hold further ``<|assistant|>`` turns: each is read). A turn whose metadata names
    one of ``tools`` and whose text is that generation's call format becomes a tool call; the plain turns around it
    become ``content`` (None when empty). A reply without tool calls, or with a turn that is not a valid call (an
    unknown name, arguments that do not parse), is plain content: ``(Template.postprocess(raw), None)``."""
    template = get_template(generation)
    plain = (template.postprocess(raw), None)
    names = {t["function"]["name"] for t in tools or []}
    if generation not in TOOL_GENERATIONS or not names:
        return plain
    texts, calls = [], []
    for turn in raw.split(_ROLE_TOKEN):
        metadata, body = turn.split("\n", 1) if "\n" in turn else ("", turn)
        name = metadata.strip()
        if not name:
            text = template.postprocess(turn)
            if text:
                texts.append(text)
            continue
        arguments = _tool_call(name, body, generation) if name in names else None
        if arguments is None:
            return plain
        call = {"id": _call_id(raw, len(calls)), "type": "function", "function": {"name": name, "arguments": arguments}}
        calls.append(call)
    if not calls:
        return plain
    return ("\n".join(texts) or None), calls
