"""A user's data mistakes, each explained where it happened (issue 11: encodings, 1-based locations, null fields,
numbers in text fields, dropped records listed, length caps and truncation reported)."""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path

import pytest

from glmtune.data.dropped import DROPPED_FILE, Dropped, read_dropped, write_dropped
from glmtune.data.encode import encode_samples
from glmtune.data.messages import RecordError
from glmtune.data.readers import ReadOptions, read_samples
from glmtune.templates import IGNORE_INDEX, EncodeOptions, get_template
from glmtune.train.config import DataConfig
from glmtune.train.data import encode_options, load_datasets, make_batcher
from test_data_fake import FakeTokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
ROWS = [{"content": "类型#裤*颜色#黑色", "summary": "黑色针织裤"},
        {"content": "类型#裙*材质#棉", "summary": "纯棉连衣裙"}]  # fmt: skip


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def roles(samples):
    return [[(m.role, m.content) for m in s.messages] for s in samples]


# ---- item 5: encodings ----------------------------------------------------------------------------------------
def test_gbk_file_names_file_line_byte_and_the_setting(tmp_path):
    p = tmp_path / "excel.jsonl"
    p.write_bytes(b'{"content": "ok", "summary": "ok"}\n' + jsonl(ROWS).encode("gbk"))
    with pytest.raises(RecordError) as err:
        read_samples(p)
    msg = str(err.value)
    assert f"{p}:line 2" in msg and "(byte 0xc0 at byte offset 48" in msg and "data.encoding=gb18030" in msg
    assert "not valid utf-8" in msg
    samples, _ = read_samples(p, ReadOptions(encoding="gb18030"))
    assert roles(samples[1:]) == roles(read_samples(_write(tmp_path / "u.jsonl", jsonl(ROWS)))[0])


def _write(path: Path, text: str, encoding: str = "utf-8", bom: bytes = b"") -> Path:
    path.write_bytes(bom + text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
     ("utf-32-le", codecs.BOM_UTF32_LE)],
)  # fmt: skip
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_byte_order_marks_are_detected(tmp_path, encoding, bom, suffix):
    if suffix == ".csv":
        text = "content,summary\n" + "".join(f"{r['content']},{r['summary']}\n" for r in ROWS)
    else:
        text = json.dumps(ROWS, ensure_ascii=False) if suffix == ".json" else jsonl(ROWS)
    expect = roles(read_samples(_write(tmp_path / f"plain{suffix}", text))[0])
    # a BOM wins over the configured encoding (here a wrong one)
    got, _ = read_samples(_write(tmp_path / f"bom{suffix}", text, encoding, bom), ReadOptions(encoding="gb18030"))
    assert roles(got) == expect and len(expect) == 2


def test_utf16_without_bom_gets_a_hint(tmp_path):
    p = _write(tmp_path / "d.jsonl", jsonl(ROWS), "utf-16-le")
    with pytest.raises(RecordError, match="reads as utf-16"):
        read_samples(p)


# ---- item 9: locations, null, typo, numbers -------------------------------------------------------------------
def test_json_array_records_are_one_based(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"content": "a", "summary": "b"}, {"content": "a"}]), encoding="utf-8")
    with pytest.raises(RecordError, match=r"a\.json:record 2: field 'summary': missing"):
        read_samples(p)
    (s, *_), _ = read_samples(p, ReadOptions(skip_bad=True))
    assert s.origin.endswith("a.json:record 1")


def test_null_field_is_called_null_not_missing(tmp_path):
    p = _write(tmp_path / "d.jsonl", jsonl([{"content": "a", "summary": None}]))
    with pytest.raises(RecordError, match="line 1: field 'summary': null, expected text"):
        read_samples(p)


def test_bad_json_message_reads_well(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"content": "a", "summary": "b}\n')
    with pytest.raises(RecordError) as err:
        read_samples(p)
    assert str(err.value).endswith("d.jsonl:line 1: bad JSON (Unterminated string starting at column 29)")
    p.write_text('{"content": "a" "summary": "b"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"line 1: bad JSON \(Expecting ',' delimiter at column 17\)$"):
        read_samples(p)


def test_numbers_in_text_fields_warn_once_per_file(tmp_path, caplog):
    rows = [{"content": "a", "summary": 1.5}, {"content": 7, "summary": "b"}, {"content": "c", "summary": "d"}]
    p = _write(tmp_path / "n.jsonl", jsonl(rows))
    with caplog.at_level(logging.WARNING, logger="glmtune.data.readers"):
        samples, report = read_samples(p)
    assert [s.messages[-1].content for s in samples] == ["1.5", "b", "d"]
    warnings = [r.getMessage() for r in caplog.records if "number" in r.getMessage()]
    assert len(warnings) == 1 and f"{p}:line 1" in warnings[0] and "'summary'" in warnings[0]
    assert report.numbers_as_text == 2 and "2 numbers read as text" in report.summary()


# ---- item 8: dropped records listed -----------------------------------------------------------------------------
def test_dropped_records_listed_with_where_and_why(tmp_path, caplog):
    rows = [{"content": "a", "summary": "b"}, {"content": "a"}, {"content": "", "summary": "b"}, {"x": 1}] * 3
    p = _write(tmp_path / "d.jsonl", jsonl(rows))
    with caplog.at_level(logging.WARNING):
        samples, report = read_samples(p, ReadOptions(skip_bad=True))
    assert len(samples) == 3 and len(report.dropped) == 9
    assert report.dropped[0] == Dropped(f"{p}:line 2", "field 'summary': missing")
    assert report.dropped[1] == Dropped(f"{p}:line 3", "field 'content': empty text")
    assert report.dropped[2].where == f"{p}:line 4"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{p}:line 2: field 'summary': missing; {p}:line 3: field 'content': empty text;" in warning
    assert warning.endswith("… and 4 more")  # the first five named, all nine in the run folder's list
    run = tmp_path / "run"
    assert read_dropped(write_dropped(run, report.dropped)) == report.dropped
    write_dropped(run, [])  # a later start with nothing dropped leaves no stale list behind
    assert not (run / DROPPED_FILE).exists()


def test_tool_records_dropped_at_encoding_are_listed_in_the_run_folder(tmp_path, caplog):
    """ChatGLM3 tool-call records cannot be rendered by ChatGLM2's template: all of them are named, not counted."""
    data = EXAMPLES / "tools_chatglm3.jsonl"
    n_tools = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    chat = _write(tmp_path / "chat.jsonl", jsonl([{"conversations": turns}] * 6))
    cfg = DataConfig(train=[str(chat), str(data)], skip_bad=True)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        ds = load_datasets(cfg, FakeTokenizer("chatglm2"), get_template("chatglm2"), seed=0, cache_dir=tmp_path / "c",
                           run_dir=run)  # fmt: skip
    assert len(ds.train) == 6 and len(ds.dropped) == n_tools
    listed = read_dropped(run / DROPPED_FILE)
    assert [d.where for d in listed] == [f"{data}:line {1 + i}" for i in range(n_tools)]
    assert all("tool turns need chatglm3 or glm4" in d.reason for d in listed)
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left out")]
    assert len(shown) == 1 and shown[0].startswith(f"left out {n_tools} of {n_tools + 6} examples at encoding")
    assert f"{data}:line 1:" in shown[0] and f"{data}:line 5:" in shown[0] and f"{data}:line 6:" not in shown[0]
    # a second start reads the cache and still lists them
    (run / DROPPED_FILE).unlink()
    ds2 = load_datasets(cfg, FakeTokenizer("chatglm2"), get_template("chatglm2"), seed=0, cache_dir=tmp_path / "c",
                        run_dir=run)  # fmt: skip
    assert ds2.dropped == ds.dropped and read_dropped(run / DROPPED_FILE) == listed


# ---- item 6: length caps -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gen", "lengths"), [("chatglm", (1024, 128)), ("chatglm2", (1024, 128)),
                                              ("chatglm3", (256, 512)), ("glm4", (512, 512))])  # fmt: skip
def test_lengths_default_to_the_official_ones(gen, lengths):
    opts = encode_options(DataConfig(), get_template(gen))
    assert (opts.max_source_length, opts.max_target_length) == lengths
    opts = encode_options(DataConfig(max_source_length=64), get_template(gen))
    assert (opts.max_source_length, opts.max_target_length) == (64, lengths[1])


@pytest.mark.parametrize("gen", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_templates_flag_what_they_cut(gen):
    tok, t = FakeTokenizer(gen), get_template(gen)
    (short, long_), _ = encode_samples(tok, t, _samples([("问" * 5, "答" * 5), ("问" * 300, "答" * 900)]))
    assert not short.truncated and not long_.truncated
    (short, long_), report = encode_samples(tok, t, _samples([("问" * 5, "答" * 5), ("问" * 300, "答" * 900)]),
                                            EncodeOptions(*t.official_lengths))  # fmt: skip
    assert not short.truncated and long_.truncated and report.truncated == ["s:line 2"]


def _samples(pairs):
    from glmtune.data.messages import Sample
    from glmtune.templates import Message

    return [Sample([Message("user", q), Message("assistant", a)], f"s:line {i}") for i, (q, a) in enumerate(pairs, 1)]


def _outlier_file(tmp_path: Path, prompt: int = 60) -> Path:
    rows = [{"content": f"类型#裤*颜色#{c}", "summary": f"{c}色针织裤，百搭。"} for c in "红黄蓝绿黑白灰紫"]
    rows[3] = {"content": "类" * prompt, "summary": "长" * 3000}  # the one outlier
    return _write(tmp_path / "outlier.jsonl", jsonl(rows))


@pytest.mark.parametrize(("gen", "prompt", "lengths"), [("chatglm", 60, {}), ("chatglm", 3000, {}),
                                                        ("chatglm2", 3000, {"max_source_length": 5000}),
                                                        ("chatglm3", 60, {}), ("glm4", 60, {})])  # fmt: skip
def test_no_example_longer_than_seq_length_and_truncation_reported(tmp_path, caplog, gen, prompt, lengths):
    data = _outlier_file(tmp_path, prompt)
    cfg = DataConfig(train=[str(data)], **lengths)
    with caplog.at_level(logging.WARNING):
        ds = load_datasets(cfg, FakeTokenizer(gen), get_template(gen), seed=0, cache_dir=None, max_length=256)
    lengths = [len(e.input_ids) for e in ds.train]
    assert len(lengths) == 8 and max(lengths) == lengths[3] <= 256 and sorted(lengths)[-2] < 64
    assert all(len(e.labels) == len(e.input_ids) and e.prefix_length <= 256 for e in ds.train)
    assert any(y != IGNORE_INDEX for y in ds.train[3].labels)  # the cut example still trains
    cut = [r.getMessage() for r in caplog.records if "were cut" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("1 of 8 examples") and f"{data}:line 4" in cut[0]
    assert "seq_length 256" in cut[0]
    batcher = make_batcher(ds.train, cfg=cfg, batch_size=2, grad_accum=1, world_size=1, seed=0,
                           tokenizer=FakeTokenizer(gen), template=get_template(gen))  # fmt: skip
    assert max(u.length for u in batcher.units) <= 256  # packed rows fit the model too


def test_pack_length_beyond_seq_length_is_refused(tmp_path):
    cfg = DataConfig(train=[str(_outlier_file(tmp_path))], pack_length=4096)
    with pytest.raises(ValueError, match="data.pack_length=4096 is longer than the model's seq_length 256"):
        load_datasets(cfg, FakeTokenizer("chatglm3"), get_template("chatglm3"), seed=0, cache_dir=None, max_length=256)


def test_too_few_packed_rows_says_what_to_change(tmp_path):
    cfg = DataConfig(train=[str(_outlier_file(tmp_path))])
    tok, t = FakeTokenizer("chatglm3"), get_template("chatglm3")
    ds = load_datasets(cfg, tok, t, seed=0, cache_dir=None, max_length=256)
    with pytest.raises(ValueError) as err:
        make_batcher(ds.train, cfg=cfg, batch_size=4, grad_accum=2, world_size=1, seed=0, tokenizer=tok, template=t)
    msg = str(err.value)
    assert "packed rows (of up to 256 tokens, from 8 examples)" in msg, msg
    for setting in ("data.packing=false", "data.max_source_length", "longest example, 256 tokens", "train.batch_size"):
        assert setting in msg
    cfg.pack_length = 256
    with pytest.raises(ValueError, match=r"shorter rows: lower data.pack_length \(now 256\)"):
        make_batcher(ds.train, cfg=cfg, batch_size=4, grad_accum=2, world_size=1, seed=0, tokenizer=tok, template=t)


def test_fit_lengths_gives_each_side_up_to_half():
    from glmtune.data.encode import fit_lengths

    def fit(src, tgt, n=256):
        o = fit_lengths(EncodeOptions(src, tgt), n)
        return o.max_source_length, o.max_target_length

    assert fit(64, 128) == (64, 128)  # fits: unchanged
    assert fit(256, 512) == (127, 128) and fit(1024, 128) == (127, 128)
    assert fit(64, 512) == (64, 191) and fit(5000, 100) == (155, 100)
