"""Read the users' data files as they are and turn every record into a :class:`Sample` (a list of messages).

Files: JSON (a list of records, or one record per line as ADGEN's ``train.json``), JSONL, CSV and Parquet
(with pyarrow installed). Formats, detected from a record's fields unless given:

- ``columns``: one prompt/response column pair with an optional history column ([[q, a], …]), as the official
  ``ptuning/main.py`` (``prompt_column``/``response_column``/``history_column``, ``source_prefix``). ADGEN's
  ``content``/``summary``, ``prompt``/``response``/``history`` and ``context``/``target`` are detected.
- ``alpaca``: ``instruction`` / ``input`` / ``output`` with optional ``system`` and ``history`` (``system`` /
  ``input`` / ``output`` without an instruction too).
- ``conversations``: a ``conversations`` or ``messages`` list of ``{"role", "content"}`` items (ChatGLM3, GLM-4,
  OpenAI) or ShareGPT ``{"from", "value"}`` items; record-level ``tools`` (ChatGLM3) or system ``tools`` (GLM-4);
  ChatGLM3 ``{"role": "tool", "name", "parameters", "observation"}`` rounds; OpenAI ``tool_calls``.

Text files are read in ``encoding`` (UTF-8 by default; GBK/GB18030 files from Excel on Chinese Windows need
``gb18030``); a byte-order mark (UTF-8, UTF-16, UTF-32) wins over it. Locations are 1-based everywhere: "line N"
of a JSON/JSONL file, "record N" of a JSON array, "row N" of a CSV file (row 1 is the header) or a Parquet file.

Nothing is modified on disk. A bad record raises :class:`RecordError` naming the file, line/row and field, or,
with ``skip_bad=True``, is left out and listed in the report (``ReadReport.dropped``) with its reason.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from glmtune.data.dropped import Dropped, describe
from glmtune.data.messages import RecordError, Sample, validate_messages
from glmtune.templates import CHATGLM3_TOOL_PROMPT, Message, chatglm3_tool_call

log = logging.getLogger(__name__)

FORMATS = ("columns", "alpaca", "conversations")

# Known column pairs of the "columns" format, tried in this order.
KNOWN_COLUMNS = (
    {"prompt": "content", "response": "summary"},  # ADGEN
    {"prompt": "prompt", "response": "response", "history": "history"},
    {"prompt": "context", "response": "target"},
    {"prompt": "query", "response": "response", "history": "history"},
    {"prompt": "question", "response": "answer"},
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "observation", "function": "observation", "tool": "tool"}  # fmt: skip


@dataclass
class ReadOptions:
    """How records become messages. ``columns`` maps ``prompt``/``response``/``history``/``system`` to field names
    (the official ``prompt_column``…); ``role_tag``/``content_tag``/``role_map`` read other conversation styles."""

    format: str = "auto"
    columns: dict[str, str] | None = None
    source_prefix: str = ""
    role_tag: str | None = None
    content_tag: str | None = None
    role_map: dict[str, str] | None = None
    skip_bad: bool = False
    skip_empty: bool = True  # columns/alpaca: rows with an empty prompt or response are skipped (as ptuning/main.py)
    encoding: str = "utf-8"  # text files without a byte-order mark


@dataclass
class ReadReport:
    path: Path
    format: str = ""
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    first_errors: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)  # every record left out, with where and why
    numbers_as_text: int = 0  # numbers read where text was expected (JSON/Parquet)

    def summary(self) -> str:
        parts = [f"{self.path}: {self.records} records, format {self.format!r}"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} ({why})" for why, n in self.skipped.most_common()))
        if self.numbers_as_text:
            parts.append(f"{self.numbers_as_text} numbers read as text")
        return "; ".join(parts)


class _NumberWarner(Protocol):
    def __call__(self, where: str, key: str, value: Any) -> None: ...


# ---- files -> raw records -----------------------------------------------------------------------------------
def iter_records(path: str | Path, *, yield_errors: bool = False, encoding: str = "utf-8") -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a JSON, JSONL, CSV or Parquet file; location is "file:line N", "file:record N"
    or "file:row N" (1-based).

    A JSONL line that is not JSON raises :class:`RecordError`, or with ``yield_errors`` is yielded as the error
    in place of the record so that the caller can skip it and go on.
    """
    for where, record in _iter_file(Path(path), encoding):
        if isinstance(record, RecordError) and not yield_errors:
            raise record
        yield where, record


# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's content: in the encoding its byte-order mark names, else in ``encoding``. Bytes that are not
    valid in it raise :class:`RecordError` naming the line and the byte offset, with the encoding to set."""
    data = path.read_bytes()
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding = name
            break
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = " ".join(f"0x{b:02x}" for b in data[e.start : e.end])
        hint = "set data.encoding (data inspect: --encoding) to the file's encoding, or save the file as UTF-8"
        for guess in ("utf-16", "gb18030", "utf-8"):
            if guess != codecs.lookup(encoding).name and _decodes(data, guess):
                hint = (f"the file reads as {guess}: set data.encoding={guess} (data inspect: --encoding {guess}), or "
                        "save the file as UTF-8")  # fmt: skip
                break
        raise RecordError(f"{path}:line {line}", None, f"not valid {encoding} text (byte {bad} at byte offset "
                                                        f"{e.start} of the file); {hint}") from None  # fmt: skip


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return encoding != "utf-16" or len(data) % 2 == 0 and data.count(b"\x00") > len(data) // 4


def _iter_file(path: Path, encoding: str = "utf-8") -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, read_text(path, encoding))
    elif suffix == ".json":
        yield from _iter_json(path, read_text(path, encoding))
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, read_text(path, encoding), "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl, .csv or .parquet)")


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = RecordError(f"{path}:line {n}", None, _bad_json(e))
        yield f"{path}:line {n}", record


def _bad_json(e: json.JSONDecodeError) -> str:
    at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at" has its own "at"
    return f"bad JSON ({e.msg}{at} column {e.colno})"


def _iter_json(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one record per line in a .json file (ADGEN's train.json)
            yield from _iter_jsonl(path, text)
            return
        raise RecordError(f"{path}:line {e.lineno}", None, _bad_json(e)) from None
    if isinstance(data, dict):
        for key in ("data", "records", "examples", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]
    if not isinstance(data, list):
        raise RecordError(str(path), None, f"expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data, 1):
        yield f"{path}:record {i}", rec


def _iter_csv(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise RecordError(str(path), None, "no header row")
    for i, row in enumerate(reader, 2):  # row 1 is the header
        if None in row:
            raise RecordError(f"{path}:row {i}", None, "more cells than header columns")
        yield f"{path}:row {i}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    for i, rec in enumerate(table.to_pylist(), 1):
        yield f"{path}:row {i}", rec


# ---- format detection -----------------------------------------------------------------------------------
def detect_format(record: Any, where: str = "") -> tuple[str, dict[str, str] | None]:
    """(format, column map) from a record's fields."""
    if not isinstance(record, dict):
        raise RecordError(where, None, f"expected a JSON object per record, got {type(record).__name__}")
    keys = set(record)
    if "conversations" in keys or "messages" in keys:
        return "conversations", None
    if "output" in keys and ("instruction" in keys or "input" in keys):
        return "alpaca", None
    for cols in KNOWN_COLUMNS:
        if cols["prompt"] in keys and cols["response"] in keys:
            cols = {k: v for k, v in cols.items() if k != "history" or v in keys}
            if "system" in keys:
                cols["system"] = "system"
            return "columns", cols
    raise RecordError(where, None, f"cannot tell the data format from the fields {sorted(keys)}; set data.format"
                                   " and data.columns")  # fmt: skip


# ---- records -> messages ------------------------------------------------------------------------------------
def _text(record: dict, key: str, where: str, *, required: bool = True, on_number: _NumberWarner | None = None) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(where, key, "missing" if key not in record else "null, expected text")
        return ""
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if on_number is not None:
            on_number(where, key, value)
        return str(value)  # a number (JSON, Parquet) where text belongs: read as its text
    if not isinstance(value, str):
        raise RecordError(where, key, f"expected text, got {type(value).__name__}")
    return value


def _history(record: dict, key: str, where: str) -> list[Message]:
    value = record.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):  # CSV cells hold the history as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(where, key, "history must be a list of [question, answer] pairs") from None
    if not isinstance(value, list):
        raise RecordError(where, key, f"expected a list of [question, answer] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(t, str) for t in pair)):  # fmt: skip
            raise RecordError(where, f"{key}[{i}]", "expected a [question, answer] pair of texts")
        out += [Message("user", pair[0]), Message("assistant", pair[1])]
    return out


class EmptyText(RecordError):
    """An empty prompt or response in a columns/alpaca record (skipped by default, as the official script)."""


def _from_columns(
    rec: dict, cols: dict[str, str], opts: ReadOptions, where: str, on_number: _NumberWarner | None
) -> Sample:
    if "prompt" not in cols or "response" not in cols:
        raise ValueError(f"data.columns needs 'prompt' and 'response' entries, got {cols}")
    prompt = _text(rec, cols["prompt"], where, on_number=on_number)
    response = _text(rec, cols["response"], where, on_number=on_number)
    for key, value in ((cols["prompt"], prompt), (cols["response"], response)):
        if not value:
            raise EmptyText(where, key, "empty text")
    msgs = []
    system = opts.source_prefix + (
        _text(rec, cols["system"], where, required=False, on_number=on_number) if "system" in cols else ""
    )
    if system:
        msgs.append(Message("system", system))
    history_key = cols.get("history")
    if history_key:
        msgs += _history(rec, history_key, where)
    msgs += [Message("user", prompt), Message("assistant", response)]
    return Sample(msgs, where, history_rounds=bool(history_key))


def _from_alpaca(rec: dict, opts: ReadOptions, where: str, on_number: _NumberWarner | None) -> Sample:
    instruction = _text(rec, "instruction", where, required=False, on_number=on_number)
    inp = _text(rec, "input", where, required=False, on_number=on_number)
    output = _text(rec, "output", where, on_number=on_number)
    prompt = "\n".join(t for t in (instruction, inp) if t)
    if not prompt:
        raise EmptyText(where, "instruction", "empty instruction and input")
    if not output:
        raise EmptyText(where, "output", "empty text")
    msgs = []
    system = opts.source_prefix + _text(rec, "system", where, required=False, on_number=on_number)
    if system:
        msgs.append(Message("system", system))
    msgs += _history(rec, "history", where)
    msgs += [Message("user", prompt), Message("assistant", output)]
    return Sample(msgs, where, history_rounds="history" in rec)


def _from_conversations(rec: dict, opts: ReadOptions, where: str) -> Sample:
    key = "conversations" if "conversations" in rec else "messages"
    items = rec.get(key)
    if not isinstance(items, list):
        raise RecordError(where, key, f"expected a list of messages, got {type(items).__name__}")
    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError(where, "tools", "not valid JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise RecordError(where, "tools", f"expected a list of tool definitions, got {type(tools).__name__}")
    msgs: list[Message] = []
    if tools:  # ChatGLM3: tools at the record level become the tools system message
        msgs.append(Message("system", CHATGLM3_TOOL_PROMPT, tools=tools))
    role_map = {**SHAREGPT_ROLES, **(opts.role_map or {})}
    for i, item in enumerate(items):
        f = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise RecordError(where, f, f"expected an object, got {type(item).__name__}")
        role_tag = opts.role_tag or ("role" if "role" in item else "from")
        content_tag = opts.content_tag or ("content" if "content" in item or "role" in item else "value")
        raw_role = item.get(role_tag)
        if raw_role not in role_map:
            raise RecordError(where, f"{f}.{role_tag}", f"unknown role {raw_role!r}")
        role = role_map[raw_role]
        train = item.get("loss")
        if train is not None and not isinstance(train, bool):
            raise RecordError(where, f"{f}.loss", "expected true or false")
        if role == "tool" and "name" in item and "parameters" in item:  # ChatGLM3 tool round
            if not tools and not any(m.tools for m in msgs):
                raise RecordError(where, f, f"tool call {item['name']!r} but the record defines no tools")
            if not isinstance(item["parameters"], dict):
                raise RecordError(where, f"{f}.parameters", "expected an object of arguments")
            call = chatglm3_tool_call(item["parameters"])
            msgs.append(Message("assistant", call, metadata=str(item["name"]), train=train))
            obs = item.get("observation")
            msgs.append(Message("observation", obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False)))
            continue
        calls = item.get("tool_calls")
        if role == "assistant" and calls:  # OpenAI style: one assistant turn per call, name as metadata
            for j, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or "name" not in fn:
                    raise RecordError(where, f"{f}.tool_calls[{j}]", "expected {'function': {'name', 'arguments'}}")
                args = fn.get("arguments", {})
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                msgs.append(Message("assistant", args, metadata=fn["name"], train=train))
            continue
        content = item.get(content_tag, "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            if isinstance(content, (dict, list)) and role in ("observation", "tool"):
                content = json.dumps(content, ensure_ascii=False)
            else:
                raise RecordError(where, f"{f}.{content_tag}", f"expected text, got {type(content).__name__}")
        item_tools = item.get("tools")
        if item_tools is not None and not isinstance(item_tools, list):
            raise RecordError(where, f"{f}.tools", "expected a list of tool definitions")
        metadata = item.get("metadata") or ""
        if not isinstance(metadata, str):
            raise RecordError(where, f"{f}.metadata", "expected text")
        msgs.append(Message(role, content, metadata=metadata, tools=item_tools or None, train=train))
    return Sample(msgs, where)


def record_to_sample(
    record: Any,
    where: str,
    opts: ReadOptions,
    fmt: str,
    cols: dict[str, str] | None,
    *,
    on_number: _NumberWarner | None = None,
) -> Sample:
    """One record as a sample; ``on_number(where, key, value)`` is told of each number read as text."""
    if not isinstance(record, dict):
        raise RecordError(where, None, f"expected an object per record, got {type(record).__name__}")
    if fmt == "columns":
        sample = _from_columns(record, cols or {}, opts, where, on_number)
    elif fmt == "alpaca":
        sample = _from_alpaca(record, opts, where, on_number)
    elif fmt == "conversations":
        sample = _from_conversations(record, opts, where)
    else:
        raise ValueError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    validate_messages(sample.messages, where)
    return sample


def read_samples(path: str | Path, options: ReadOptions | None = None) -> tuple[list[Sample], ReadReport]:
    """All usable samples of a file and a report (format, counts, the records left out and why)."""
    opts = options or ReadOptions()
    report = ReadReport(Path(path))
    fmt, cols = opts.format, opts.columns
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    if fmt == "columns" and not cols:
        raise ValueError("data.format 'columns' needs data.columns (prompt/response[/history])")

    def on_number(where: str, key: str, value: Any) -> None:
        if not report.numbers_as_text:
            log.warning("%s: field %r holds the number %r where text belongs: read as the text %r (numbers in "
                        "other records of this file are read the same way, without a warning)", where, key, value,
                        str(value))  # fmt: skip
        report.numbers_as_text += 1

    samples = []
    for where, record in iter_records(path, yield_errors=True, encoding=opts.encoding):
        report.records += 1
        try:
            if isinstance(record, RecordError):
                raise record
            if fmt == "auto":
                fmt, detected = detect_format(record, where)
                cols = cols or detected
                report.format = fmt
            samples.append(record_to_sample(record, where, opts, fmt, cols, on_number=on_number))
        except EmptyText as e:
            if not (opts.skip_empty or opts.skip_bad):
                raise
            report.skipped[f"empty {e.field}"] += 1
            report.dropped.append(Dropped(where, f"field {e.field!r}: {e.problem}"))
        except RecordError as e:
            if not opts.skip_bad:
                raise
            report.skipped[e.problem if not e.field else f"{e.field}: {e.problem}"] += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(str(e))
            report.dropped.append(Dropped(e.where or where, str(e).removeprefix(f"{e.where}: ")))
    report.format = fmt
    if report.skipped:
        log.warning("%s: %s", report.summary(), describe([f"{d.where}: {d.reason}" for d in report.dropped]))
    if not samples:
        raise ValueError(f"{path}: no usable records ({report.summary()})")
    return samples, report
