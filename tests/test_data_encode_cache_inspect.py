"""Encoding samples, eval prompts, the tokenized-data cache and `inspect_data` on the example files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.data.cache import cache_key, cached_encode, load_encoded, save_encoded
from glmtune.data.encode import encode_samples, eval_examples
from glmtune.data.inspect import inspect_data
from glmtune.data.readers import ReadOptions, read_samples
from glmtune.templates import IGNORE_INDEX, Encoded, EncodeOptions, get_template
from test_data_fake import FakeTokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
GENS = ("chatglm", "chatglm2", "chatglm3", "glm4")


def test_v1_history_column_adds_round_zero(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "q", "response": "a", "history": []}) + "\n", encoding="utf-8")
    tok, t = FakeTokenizer("chatglm"), get_template("chatglm")
    samples, _ = read_samples(p)
    (ex,), _ = encode_samples(tok, t, samples)
    assert tok.decode(ex.input_ids).startswith("[Round 0]\n问：q\n答：")  # as ptuning/main.py with history_column
    p.write_text(json.dumps({"content": "q", "summary": "a"}) + "\n", encoding="utf-8")
    (ex,), _ = encode_samples(tok, t, read_samples(p)[0])
    assert tok.decode(ex.input_ids).startswith("qa")


@pytest.mark.parametrize("gen", GENS)
def test_properties_lengths_and_trained_tokens(gen):
    tok, t = FakeTokenizer(gen), get_template(gen)
    samples, _ = read_samples(EXAMPLES / ("tools_glm4.jsonl" if gen == "glm4" else "dialogue.jsonl"))
    src = 700 if gen == "glm4" else 40  # the GLM-4 tools preamble alone is ~500 fake tokens
    opts = EncodeOptions(max_source_length=src, max_target_length=16)
    exs, _ = encode_samples(tok, t, samples, opts)
    limit = src + 16 + (0 if gen == "chatglm" else 1)
    for e in exs:
        assert len(e.input_ids) == len(e.labels) <= limit
        trained = [y for y in e.labels if y != IGNORE_INDEX]
        assert trained and all(y == i for y, i in zip(e.labels, e.input_ids, strict=True) if y != IGNORE_INDEX)
        assert e.labels[0] == IGNORE_INDEX
        assert not any(tok.is_special(y) and y not in t.stop_ids(tok) + [tok.special_id("<|user|>")
                       if gen in ("chatglm3", "glm4") else -1, tok.special_id("<sop>") if gen == "chatglm" else -1]
                       for y in trained)  # fmt: skip


def test_eval_examples_per_turn_and_truncated():
    tok = FakeTokenizer("chatglm3")
    t = get_template("chatglm3")
    samples, _ = read_samples(EXAMPLES / "dialogue.jsonl")
    evs = eval_examples(tok, t, samples[:3], EncodeOptions(max_source_length=10))
    assert len(evs) == 1 + 2 + 3  # one per assistant turn (process_batch_eval)
    assert all(len(e.prompt_ids) <= 11 and e.prompt_ids[-1] == tok.special_id("<|assistant|>") for e in evs)
    v2 = eval_examples(FakeTokenizer("chatglm2"), get_template("chatglm2"), samples[:3])
    assert [e.reference for e in v2] == [s.messages[-1].content for s in samples[:3]]


def test_cache_hit_and_invalidation(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "q", "summary": "a"}) + "\n", encoding="utf-8")
    tokfile = tmp_path / "tokenizer.model"
    tokfile.write_bytes(b"tok-v1")
    calls = []

    def build():
        calls.append(1)
        return [Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3], 1), Encoded([4], [IGNORE_INDEX])], {"truncated": ["d:line 1"]}

    opts = EncodeOptions(max_source_length=8)
    key = cache_key([data], [tokfile], "chatglm3", {"encode": opts, "read": ReadOptions()})
    first, notes1, hit1 = cached_encode(tmp_path / "cache", key, build)
    second, notes2, hit2 = cached_encode(tmp_path / "cache", key, build)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert notes1 == notes2 == {"truncated": ["d:line 1"]}  # the encoding's notes come back with a cache hit
    assert [(e.input_ids, e.labels, e.prefix_length) for e in second] == [
        (e.input_ids, e.labels, e.prefix_length) for e in first
    ]
    keys = {key}
    keys.add(cache_key([data], [tokfile], "glm4", {"encode": opts, "read": ReadOptions()}))
    keys.add(cache_key([data], [tokfile], "chatglm3", {"encode": EncodeOptions(9), "read": ReadOptions()}))
    tokfile.write_bytes(b"tok-v2")
    keys.add(cache_key([data], [tokfile], "chatglm3", {"encode": opts, "read": ReadOptions()}))
    data.write_text(json.dumps({"content": "q", "summary": "b"}) + "\n", encoding="utf-8")
    keys.add(cache_key([data], [tokfile], "chatglm3", {"encode": opts, "read": ReadOptions()}))
    assert len(keys) == 5


def test_cache_round_trip_and_corrupt_file(tmp_path):
    exs = [Encoded([5, 6], [IGNORE_INDEX, 6], 0), Encoded([7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 9], 2)]
    save_encoded(tmp_path / "x.npz", exs)
    back = load_encoded(tmp_path / "x.npz")
    expect = [([5, 6], [IGNORE_INDEX, 6], 0), ([7, 8, 9], [IGNORE_INDEX] * 2 + [9], 2)]
    assert [(e.input_ids, e.labels, e.prefix_length) for e in back] == expect
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenized-k.npz").write_bytes(b"garbage")
    got, _, hit = cached_encode(tmp_path / "c", "k", lambda: (exs, {}))
    assert not hit and len(got) == 2 and len(load_encoded(tmp_path / "c" / "tokenized-k.npz")) == 2


FILES_BY_GEN = {
    "chatglm": ["adgen.json", "adgen.csv", "alpaca.json", "dialogue.jsonl", "extraction.json"],
    "chatglm2": ["adgen.json", "alpaca.json", "dialogue.jsonl", "extraction.json"],
    "chatglm3": ["adgen.json", "dialogue.jsonl", "extraction.json", "tools_chatglm3.jsonl", "tools_glm4.jsonl"],
    "glm4": ["adgen.json", "alpaca.json", "dialogue.jsonl", "tools_chatglm3.jsonl", "tools_glm4.jsonl"],
}


@pytest.mark.parametrize(("gen", "name"), [(g, n) for g, names in FILES_BY_GEN.items() for n in names])
def test_inspect_every_example_file(gen, name):
    tok = FakeTokenizer(gen)
    report = inspect_data(EXAMPLES / name, tok, get_template(gen), options=EncodeOptions(1024, 128), n_samples=2)
    assert "records" in report and "[[" in report and "p95" in report
    assert "truncated at max_source_length=1024" in report
    assert "cannot be encoded" not in report


def test_inspect_reports_tool_data_unusable_for_v2():
    report = inspect_data(EXAMPLES / "tools_glm4.jsonl", FakeTokenizer("chatglm2"), get_template("chatglm2"))
    assert "cannot be encoded" in report
