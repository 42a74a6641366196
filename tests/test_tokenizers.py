"""Tokenizers: ChatGLM2/3 (SentencePiece) and GLM-4 (tiktoken ranks) against independent references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import regex
import sentencepiece as spm

from glmtune.tokenizers import (
    GLM4Tokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

# The original lists, written out here so the tests also check the module constants.
V2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
V3_SPECIALS = V2_SPECIALS + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]  # fmt: skip
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

TEXTS = [
    "hello world",
    "我们今天天气很好，你是谁？",
    "def f(x):\n    return x * 2\n\n\tindent",
    "mixed 中文 and English 2023 3.14 it's we're",
    "emoji 😀🎉 and rare 龘 characters ñ é",
    "spaces   between\r\nlines\n\n\n",
]


# ---- independent references ---------------------------------------------------------------------------------


def split_specials(text: str, specials: list[str]) -> list[tuple[str, bool]]:
    """Scan left to right; at each position take the longest special string that starts there."""
    out: list[tuple[str, bool]] = []
    buf, i = "", 0
    while i < len(text):
        hits = [s for s in specials if text.startswith(s, i)]
        if hits:
            if buf:
                out.append((buf, False))
                buf = ""
            best = max(hits, key=len)
            out.append((best, True))
            i += len(best)
        else:
            buf += text[i]
            i += 1
    if buf:
        out.append((buf, False))
    return out


def naive_bpe(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rule: a chunk that is a token stays whole; else merge the lowest-ranked adjacent pair, leftmost."""
    if chunk in ranks:
        return [ranks[chunk]]
    parts = [bytes([b]) for b in chunk]
    while len(parts) > 1:
        candidates = [
            (ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks
        ]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def naive_glm4_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    n = len(ranks)
    ids: list[int] = []
    for piece, special in split_specials(text, GLM4_SPECIALS):
        if special:
            ids.append(n + GLM4_SPECIALS.index(piece))
            continue
        for chunk in regex.findall(GLM4_PATTERN, piece):
            ids.extend(naive_bpe(chunk.encode("utf-8"), ranks))
    return ids


def original_sp_encode(sp: spm.SentencePieceProcessor, text: str, specials: list[str]) -> list[int]:
    """The original's HF path: EncodeAsPieces, then each piece by name (its special table first), PieceToId."""
    table = {tok: sp.vocab_size() + i for i, tok in enumerate(specials)}
    return [table[p] if p in table else sp.PieceToId(p) for p in sp.EncodeAsPieces(text)]


@pytest.fixture(scope="module")
def sp(sp_model_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=sp_model_bytes)


@pytest.fixture(scope="module")
def v2(chatglm2_tokenizer_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_dir(chatglm2_tokenizer_dir, "chatglm2")


@pytest.fixture(scope="module")
def v3(chatglm3_tokenizer_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_dir(chatglm3_tokenizer_dir, "chatglm3")


@pytest.fixture(scope="module")
def glm4(glm4_tokenizer_dir: Path) -> GLM4Tokenizer:
    return GLM4Tokenizer.from_dir(glm4_tokenizer_dir)


@pytest.fixture(scope="module")
def glm4_real(glm4_real_tokenizer_file: Path) -> GLM4Tokenizer:
    return GLM4Tokenizer(glm4_real_tokenizer_file)


# ---- ChatGLM2 / ChatGLM3 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation, specials", [("chatglm2", V2_SPECIALS), ("chatglm3", V3_SPECIALS)])
def test_sp_special_token_ids(request, sp, generation, specials):
    tok = request.getfixturevalue("v2" if generation == "chatglm2" else "v3")
    assert isinstance(tok, Tokenizer)
    assert tok.generation == generation
    assert tok.vocab_size == sp.vocab_size() + len(specials)
    for i, name in enumerate(specials):
        assert tok.special_id(name) == sp.vocab_size() + i
        assert tok.is_special(sp.vocab_size() + i)
    assert tok.prefix_ids() == [sp.vocab_size() + 1, sp.vocab_size() + 3]
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (sp.eos_id(), sp.unk_id(), sp.bos_id())
    assert tok.special_id("<eos>") == sp.eos_id() and tok.special_id("<pad>") == sp.unk_id()
    assert not any(tok.is_special(i) for i in tok.encode("hello world"))
    with pytest.raises(KeyError):
        tok.special_id("<|endoftext|>")


def test_v2_has_no_role_tokens(v2):
    with pytest.raises(KeyError):
        v2.special_id("<|user|>")


@pytest.mark.parametrize("generation", ["chatglm2", "chatglm3"])
def test_sp_encode_equals_original_piece_path(request, sp, generation):
    tok = request.getfixturevalue("v2" if generation == "chatglm2" else "v3")
    specials = V2_SPECIALS if generation == "chatglm2" else V3_SPECIALS
    for text in [*TEXTS, "people eop isotope Aesop", ""]:
        assert tok.encode(text) == original_sp_encode(sp, text, specials), text
        assert tok.encode_ordinary(text) == sp.encode(text)


def test_sp_bare_eop_piece_becomes_the_special_id(v3, sp):
    # The tiny model splits "people" as ▁p|eop|le; the original looks pieces up by name, special table first.
    assert "eop" in sp.EncodeAsPieces("people")
    ids = v3.encode("people")
    assert v3.special_id("eop") in ids
    assert sp.PieceToId("eop") in v3.encode_ordinary("people")


def test_v3_literal_special_strings_are_plain_text(v3, sp):
    text = "<|user|>\nhello<|assistant|>"
    ids = v3.encode(text)
    assert not any(v3.is_special(i) for i in ids)
    assert ids == original_sp_encode(sp, text, V3_SPECIALS)


def test_v3_encode_special_tokens_option(chatglm3_tokenizer_dir, sp):
    tok = SentencePieceTokenizer.from_dir(chatglm3_tokenizer_dir, "chatglm3", encode_special_tokens=True)
    for text in ["<|user|>\nhello<|assistant|>", "[gMASK]sop<|system|>\n people[MASK]", "no specials here"]:
        expected: list[int] = []
        for piece, special in split_specials(text, V3_SPECIALS):
            expected += [tok.special_id(piece)] if special else original_sp_encode(sp, piece, V3_SPECIALS)
        assert tok.encode(text) == expected, text
    assert tok.encode("<|user|>")[0] == tok.special_id("<|user|>")
    with pytest.raises(ValueError):
        SentencePieceTokenizer(chatglm3_tokenizer_dir / "tokenizer.model", "chatglm2", encode_special_tokens=True)


@pytest.mark.parametrize("generation", ["chatglm2", "chatglm3"])
def test_sp_round_trip(request, generation):
    tok = request.getfixturevalue("v2" if generation == "chatglm2" else "v3")
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_sp_byte_fallback_for_unseen_characters(v3, sp):
    for char in ["龘", "😀", "ñ"]:
        pieces = sp.EncodeAsPieces(char)
        byte_pieces = [p for p in pieces if p.startswith("<0x")]
        assert len(byte_pieces) == len(char.encode("utf-8")), pieces
        assert bytes(int(p[3:5], 16) for p in byte_pieces) == char.encode("utf-8")
        assert v3.decode(v3.encode(char)) == char


def test_sp_decode_specials(v2, v3, sp):
    hello = sp.encode("hello world")
    user, eos, gmask = v3.special_id("<|user|>"), v3.eos_id, v3.special_id("[gMASK]")
    ids = [gmask, user, *hello, eos]
    # ChatGLM3 renders its specials inline and eos as an empty piece, all in one DecodePieces call.
    expected = sp.DecodePieces(["[gMASK]", "<|user|>", *sp.EncodeAsPieces("hello world"), ""])
    assert v3.decode(ids, skip_special_tokens=False) == expected
    assert "<|user|>" in expected
    assert v3.decode(ids, skip_special_tokens=True) == sp.decode(hello)
    # ChatGLM2's original turns its specials into empty pieces either way.
    assert v2.decode([gmask, *hello, eos], skip_special_tokens=False) == sp.decode(hello)
    assert v2.decode([gmask, *hello, eos]) == sp.decode(hello)
    assert v3.decode([*hello, 10**9, -1]) == sp.decode(hello)


def test_sp_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        SentencePieceTokenizer.from_dir(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\x05junk not a model proto")
    with pytest.raises(TokenizerError, match=str(bad)):
        SentencePieceTokenizer(bad)
    bad.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty"):
        SentencePieceTokenizer(bad)


# ---- GLM-4 --------------------------------------------------------------------------------------------------


def test_glm4_special_ids_start_after_ranks(glm4, glm4_tiny_ranks):
    n = len(glm4_tiny_ranks)
    assert isinstance(glm4, Tokenizer)
    assert glm4.vocab_size == n + 14
    assert [glm4.special_id(t) for t in GLM4_SPECIALS] == list(range(n, n + 14))
    assert glm4.eos_id == glm4.pad_id == n
    assert glm4.prefix_ids() == [n + 2, n + 4]
    assert glm4.is_special(n + 13) and not glm4.is_special(n - 1)


def test_glm4_encode_equals_naive_bpe(glm4, glm4_tiny_ranks):
    extra = ["<|user|>\nhi<|assistant|>", "a[gMASK]<sop>b <|endoftext|> c", "<|user|<|user|>>", "x" * 50]
    for text in [*TEXTS, *extra, ""]:
        assert glm4.encode(text) == naive_glm4_encode(text, glm4_tiny_ranks), text


def test_glm4_literal_specials_and_ordinary(glm4):
    user = glm4.special_id("<|user|>")
    assert glm4.encode("<|user|>") == [user]
    assert glm4.encode(" <|user|> ")[1] == user  # no stripping around added tokens
    assert user not in glm4.encode_ordinary("<|user|>")
    assert glm4.decode(glm4.encode_ordinary("<|user|>")) == "<|user|>"


def test_glm4_round_trip_and_decode(glm4):
    for text in TEXTS:
        assert glm4.decode(glm4.encode(text)) == text
    hi = glm4.encode("hi 你好")
    ids = [*glm4.prefix_ids(), glm4.special_id("<|user|>"), *hi, glm4.eos_id]
    assert glm4.decode(ids) == "hi 你好"
    assert glm4.decode(ids, skip_special_tokens=False) == "[gMASK]<sop><|user|>hi 你好<|endoftext|>"
    assert glm4.decode([10**9, -5]) == ""


def test_glm4_bytes_split_by_skipped_special(glm4, glm4_tiny_ranks):
    # a multi-byte character split across a skipped special still joins; a cut one becomes U+FFFD
    raw = "😀".encode()
    ids = [glm4_tiny_ranks[bytes([b])] for b in raw]
    eos = glm4.eos_id
    assert glm4.decode([ids[0], ids[1], eos, ids[2], ids[3]]) == "😀"
    assert glm4.decode(ids[:2]) == raw[:2].decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "content, message",
    [
        ("IQ== 0\nIg==\n", "line 2"),
        ("IQ== 0\n@@@ 1\n", "line 2"),
        ("IQ== 0\nIQ== 1\n", "line 2"),
        ("IQ== 0\nIg== x\n", "line 2"),
        ("IQ== 0\nIg== 5\n", "contiguous"),
        ("IQ== 0\nIg== 1\n", "single bytes"),
        ("", "no ranks"),
    ],
)
def test_glm4_bad_ranks_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=message) as info:
        GLM4Tokenizer(path)
    assert str(path) in str(info.value)


def test_glm4_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        GLM4Tokenizer.from_dir(tmp_path)


def test_glm4_real_file(glm4_real):
    assert glm4_real.vocab_size == 151343
    assert [glm4_real.special_id(t) for t in GLM4_SPECIALS] == list(range(151329, 151343))
    # ids published in GLM-4-9B-chat's generation_config.json / chat template
    assert glm4_real.eos_id == 151329
    assert glm4_real.prefix_ids() == [151331, 151333]
    assert glm4_real.encode("<|user|>") == [151336]
    assert glm4_real.encode("<|assistant|><|observation|>") == [151337, 151338]
    for text in [*TEXTS, "Σὲ γνωρίζω ἀπὸ τὴν κόψη", "   leading spaces", "a\u200bb", "🤖🧠 GLM-4 ✨\n"]:
        ids = glm4_real.encode(text)
        assert all(0 <= i < 151329 for i in ids)
        assert glm4_real.decode(ids) == text


def test_glm4_real_file_equals_naive_bpe(glm4_real, glm4_real_tokenizer_file):
    from glmtune.tokenizers.glm4 import read_ranks

    ranks = read_ranks(glm4_real_tokenizer_file)
    for text in [*TEXTS, "<|system|>\nYou are GLM-4.<|user|>\n写一首诗"]:
        assert glm4_real.encode(text) == naive_glm4_encode(text, ranks), text


# ---- load_tokenizer -----------------------------------------------------------------------------------------


def test_load_tokenizer_detects_generation(chatglm2_tokenizer_dir, chatglm3_tokenizer_dir, glm4_tokenizer_dir):
    assert load_tokenizer(chatglm2_tokenizer_dir).generation == "chatglm2"
    assert load_tokenizer(chatglm3_tokenizer_dir).generation == "chatglm3"
    glm4 = load_tokenizer(glm4_tokenizer_dir)
    assert isinstance(glm4, GLM4Tokenizer)
    assert glm4.files == [glm4_tokenizer_dir / "tokenizer.model"]
    v3 = load_tokenizer(chatglm3_tokenizer_dir, "chatglm3")
    assert v3.files == [chatglm3_tokenizer_dir / "tokenizer.model", chatglm3_tokenizer_dir / "tokenizer_config.json"]


def test_load_tokenizer_rules(tmp_path, chatglm2_tokenizer_dir, chatglm3_tokenizer_dir, glm4_tokenizer_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(chatglm2_tokenizer_dir / "tokenizer.model", bare)
    assert load_tokenizer(bare).generation == "chatglm2"
    assert load_tokenizer(bare, "chatglm3").generation == "chatglm3"
    (bare / "tokenization_chatglm.py").write_text('role_special_tokens = ["<|system|>", "<|user|>"]\n')
    assert load_tokenizer(bare).generation == "chatglm3"
    (bare / "tokenization_chatglm.py").unlink()
    (bare / "config.json").write_text(json.dumps({"_name_or_path": "/models/chatglm3-6b-base"}))
    assert load_tokenizer(bare).generation == "chatglm3"
    with pytest.raises(TokenizerError, match="config.json"):
        load_tokenizer(bare, "chatglm2")
    with pytest.raises(TokenizerError, match="not glm4|not a GLM-4"):
        load_tokenizer(chatglm2_tokenizer_dir, "glm4")
    with pytest.raises(TokenizerError, match="not chatglm3"):
        load_tokenizer(glm4_tokenizer_dir, "chatglm3")
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError):
        load_tokenizer(bare, "chatglm4")


# ---- streaming ----------------------------------------------------------------------------------------------


STREAM_TEXT = "你好 😀 世界 龘 🎉 ok 中文"


@pytest.mark.parametrize("name", ["v2", "v3", "glm4"])
def test_stream_decoder_never_emits_partial_characters(request, name):
    tok = request.getfixturevalue(name)
    ids = tok.encode(STREAM_TEXT)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == STREAM_TEXT
    assert "" in pieces  # some characters span several ids and were held back
    assert sum(1 for p in pieces if p) > 5  # but text did come out incrementally


def test_stream_decoder_specials_and_flush(v3):
    user = v3.special_id("<|user|>")
    ids = [user, *v3.encode("hi 😀"), v3.eos_id]
    for skip in (True, False):
        stream = StreamDecoder(v3, skip_special_tokens=skip)
        out = "".join(stream.push(i) for i in ids) + stream.flush()
        assert out == v3.decode(ids, skip_special_tokens=skip)
    # a stream cut inside a character: held back, then flushed as the full decode renders it
    partial = v3.encode("😀")[:-1]
    stream = StreamDecoder(v3)
    assert "".join(stream.push(i) for i in partial) == ""
    assert stream.flush() == v3.decode(partial)
    assert stream.flush() == ""
