"""Readers: every supported format is detected and turned into messages; bad input names file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.data.messages import RecordError
from glmtune.data.readers import ReadOptions, iter_records, read_samples
from glmtune.templates import CHATGLM3_TOOL_PROMPT, Message

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def roles(sample):
    return [(m.role, m.content) for m in sample.messages]


def test_adgen_json_lines_in_a_json_file(tmp_path):
    p = write_jsonl(tmp_path / "train.json", [{"content": "类型#裙", "summary": "好看"}] * 3)
    samples, rep = read_samples(p)
    assert rep.format == "columns" and rep.records == 3 and len(samples) == 3
    assert roles(samples[0]) == [("user", "类型#裙"), ("assistant", "好看")]
    assert samples[0].origin.endswith("train.json:line 1")


def test_columns_with_history_prefix_and_mapping(tmp_path):
    rec = {"q": "3?", "a": "三", "h": [["1?", "一"], ["2?", "二"]]}
    p = write_jsonl(tmp_path / "d.jsonl", [rec])
    opts = ReadOptions(format="columns", columns={"prompt": "q", "response": "a", "history": "h"}, source_prefix="P:")
    (s,), _ = read_samples(p, opts)
    assert roles(s) == [("system", "P:"), ("user", "1?"), ("assistant", "一"), ("user", "2?"), ("assistant", "二"),
                        ("user", "3?"), ("assistant", "三")]  # fmt: skip
    assert s.history_rounds


def test_detected_shapes(tmp_path):
    rows = {
        "ctx.json": [{"context": "c", "target": "t"}],
        "alp.json": [{"instruction": "i", "input": "x", "output": "o", "system": "s"}],
        "sio.json": [{"system": "s", "input": "x", "output": "o"}],
        "prh.json": [{"prompt": "p", "response": "r", "history": [["a", "b"]]}],
    }
    expect = {
        "ctx.json": [("user", "c"), ("assistant", "t")],
        "alp.json": [("system", "s"), ("user", "i\nx"), ("assistant", "o")],
        "sio.json": [("system", "s"), ("user", "x"), ("assistant", "o")],
        "prh.json": [("user", "a"), ("assistant", "b"), ("user", "p"), ("assistant", "r")],
    }
    for name, recs in rows.items():
        p = tmp_path / name
        p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
        (s,), _ = read_samples(p)
        assert roles(s) == expect[name], name


def test_conversations_sharegpt_openai_and_custom_tags(tmp_path):
    recs = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a", "loss": False},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"},
            ]
        },  # fmt: skip
    ]
    s1, s2 = read_samples(write_jsonl(tmp_path / "c.jsonl", recs))[0]
    assert roles(s1) == [("user", "hi"), ("assistant", "yo")]
    assert s2.messages[2].train is False and s2.messages[4].train is None
    custom = write_jsonl(
        tmp_path / "t.jsonl", [{"conversations": [{"who": "Q", "text": "a"}, {"who": "R", "text": "b"}]}]
    )
    opts = ReadOptions(role_tag="who", content_tag="text", role_map={"Q": "user", "R": "assistant"})
    (s,), _ = read_samples(custom, opts)
    assert roles(s) == [("user", "a"), ("assistant", "b")]


def test_chatglm3_tool_rounds(tmp_path):
    tools = [{"name": "track", "parameters": {}}]
    rec = {"tools": tools, "conversations": [
        {"role": "user", "content": "price?"},
        {"role": "tool", "name": "track", "parameters": {"symbol": "AAPL", "n": 2}, "observation": {"price": 1}},
        {"role": "assistant", "content": "It is 1."}]}  # fmt: skip
    (s,), _ = read_samples(write_jsonl(tmp_path / "t.jsonl", [rec]))
    assert s.messages[0] == Message("system", CHATGLM3_TOOL_PROMPT, tools=tools)
    call = s.messages[2]
    assert (call.role, call.metadata) == ("assistant", "track")
    assert call.content == "```python\ntool_call(symbol='AAPL', n=2)\n```"
    assert s.messages[3] == Message("observation", '{"price": 1}')


def test_glm4_tools_and_openai_tool_calls(tmp_path):
    fn = {"name": "f", "parameters": {}}
    rec = {"messages": [
        {"role": "system", "content": "", "tools": [{"type": "function", "function": fn}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": {"ok": True}},
        {"role": "assistant", "content": "done"}]}  # fmt: skip
    (s,), _ = read_samples(write_jsonl(tmp_path / "g.jsonl", [rec]))
    assert s.messages[0].tools == [{"type": "function", "function": fn}]
    assert (s.messages[2].metadata, s.messages[2].content) == ("f", '{"x": 1}')
    assert (s.messages[3].role, s.messages[3].content) == ("tool", '{"ok": true}')


def test_csv_with_history_json(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,response,history\nq,a,"[[""h1"", ""h2""]]"\n', encoding="utf-8")
    (s,), rep = read_samples(p)
    assert rep.format == "columns"
    assert roles(s) == [("user", "h1"), ("assistant", "h2"), ("user", "q"), ("assistant", "a")]
    assert s.origin.endswith("d.csv:row 2")


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["c"], "summary": ["s"]}), p)
    (s,), _ = read_samples(p)
    assert roles(s) == [("user", "c"), ("assistant", "s")]


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"content": "a", "summary": ', "line 2: bad JSON"),
        ('{"content": "a"}', "line 2: field 'summary': missing"),
        ('{"content": "a", "summary": 5.5, "x": [1]}', None),  # numbers become text (CSV/Parquet friendliness)
        ('{"content": "a", "summary": ["x"]}', "line 2: field 'summary': expected text, got list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}', "empty assistant"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x", "metadata": "f"}]}',
            "tool call 'f' but the record defines no tools",
        ),
        (
            '{"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "name": "f", "parameters": {}}]}',
            "no tools",
        ),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, line, match):
    first = '{"content": "ok", "summary": "ok"}' if "messages" not in line and "conv" not in line else (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}')  # fmt: skip
    p = tmp_path / "bad.jsonl"
    p.write_text(first + "\n" + line + "\n", encoding="utf-8")
    if match is None:
        assert len(read_samples(p)[0]) == 2
        return
    with pytest.raises(RecordError, match=match) as err:
        read_samples(p)
    assert str(p) in str(err.value)
    samples, rep = read_samples(p, ReadOptions(skip_bad=True))
    assert len(samples) == 1 and sum(rep.skipped.values()) == 1 and rep.first_errors


def test_empty_rows_skipped_as_official_or_error(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"content": "a", "summary": "b"}, {"content": "", "summary": "b"}])
    samples, rep = read_samples(p)
    assert len(samples) == 1 and rep.skipped == {"empty content": 1}
    with pytest.raises(RecordError, match="line 2: field 'content': empty text"):
        read_samples(p, ReadOptions(skip_empty=False))


def test_empty_dataset_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"content": "", "summary": "b"}])
    with pytest.raises(ValueError, match="no usable records"):
        read_samples(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_samples(tmp_path / "nope.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported data file type"):
        read_samples(tmp_path / "x.txt")
    (tmp_path / "u.jsonl").write_text('{"foo": 1, "bar": 2}\n')
    with pytest.raises(RecordError, match="cannot tell the data format"):
        read_samples(tmp_path / "u.jsonl")


def test_bad_json_array_names_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"content": "a",\n  "summary": }\n]', encoding="utf-8")
    with pytest.raises(RecordError, match="a.json:line 3: bad JSON"):
        list(iter_records(p))


def test_user_files_are_not_modified(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"content": "a", "summary": "b"}])
    before = p.read_bytes()
    read_samples(p)
    assert p.read_bytes() == before


@pytest.mark.parametrize("name", ["adgen.json", "adgen.csv", "alpaca.json", "dialogue.jsonl", "extraction.json",
                                  "tools_chatglm3.jsonl", "tools_glm4.jsonl"])  # fmt: skip
def test_example_files_read_cleanly(name):
    samples, rep = read_samples(EXAMPLES / name)
    assert not rep.skipped and len(samples) >= 12


def test_parquet_reads_like_json(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    src = EXAMPLES / "adgen.json"
    records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = tmp_path / "adgen.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    from_parquet, report = read_samples(path)
    from_json, _ = read_samples(src)
    assert report.format == "columns" and len(from_parquet) == len(from_json) == len(records)
    assert [s.messages for s in from_parquet] == [s.messages for s in from_json]
    assert from_parquet[3].origin.endswith("adgen.parquet:row 4")  # 1-based, as lines and CSV rows
