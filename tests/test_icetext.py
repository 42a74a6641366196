"""ChatGLM-6B (v1) ice_text tokenizer against an independent re-implementation of the original algorithm."""

from __future__ import annotations

import io
import json
import random
import re

import pytest

from glmtune.tokenizers.base import Tokenizer, TokenizerError
from glmtune.tokenizers.icetext import IceTextTokenizer

spm = pytest.importorskip("sentencepiece")

# Laid out like ice_text.model: <unk> <s> </s> <pad>, then <n> (id 4), the whitespace pieces and the specials.
SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER_SYMBOLS = ["<n>", "<|tab|>", *[f"<|blank_{n}|>" for n in range(2, 81)], *SPECIALS]
_ZH = "我们今天天气很好你是谁人工智能模型训练数据中文英文测试分词器的语言大学习生成对话系统"
_EN = "hello world the model token train data chat glm python code def return import class self print".split()


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = [
            "".join(rng.choice(_ZH) for _ in range(rng.randint(1, 4))) if rng.random() < 0.5 else rng.choice(_EN)
            for _ in range(rng.randint(3, 10))
        ]
        lines.append(rng.choice([" ", " . ", " , "]).join(parts))
    return lines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(0, 800)),
        model_writer=out,
        vocab_size=300,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
        user_defined_symbols=USER_SYMBOLS,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        minloglevel=2,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("chatglm-6b")
    (d / "ice_text.model").write_bytes(out.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0, "bos_token": "<sop>"}))
    return d


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "ice_text.model"))


def _naive_preprocess(text: str) -> str:
    """The original's rules, re-derived: newline, tab, then each maximal run of spaces greedily in 80s."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")

    def run(m: re.Match) -> str:
        q, r = divmod(len(m.group()), 80)
        tail = "" if r == 0 else (" " if r == 1 else f"<|blank_{r}|>")
        return "<|blank_80|>" * q + tail

    return re.sub(r" {2,}", run, text)


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    seps = [" ", "  ", "   ", "\n", "\t", "\n\n", " \t ", " " * 79, " " * 80, " " * 81, " " * 170, "\t\t  "]
    out = []
    for _ in range(n):
        parts = [rng.choice(_EN) if rng.random() < 0.5 else rng.choice(_ZH) * rng.randint(1, 3) for _ in range(6)]
        text = parts[0]
        for p in parts[1:]:
            text += rng.choice(seps) + p
        if rng.random() < 0.3:
            text = rng.choice(seps) + text
        out.append(text)
    return out


def test_protocol_and_special_ids(model_dir, sp):
    tok = IceTextTokenizer.from_dir(model_dir)
    assert isinstance(tok, Tokenizer) and tok.generation == "chatglm"
    assert tok.vocab_size == sp.vocab_size()
    assert tok.eos_id == sp.piece_to_id("<eop>") and tok.bos_id == sp.piece_to_id("<sop>")
    assert tok.pad_id == 3 and sp.id_to_piece(3) == "<pad>"
    assert sp.piece_to_id("<n>") == 4
    for name in SPECIALS:
        assert tok.special_id(name) == sp.piece_to_id(name)
        assert tok.is_special(tok.special_id(name))
    assert tok.special_id("sop") == tok.bos_id
    assert not tok.is_special(tok.encode("hello")[-1])
    with pytest.raises(KeyError):
        tok.special_id("<|user|>")
    assert tok.files[0] == model_dir / "ice_text.model" and model_dir / "tokenizer_config.json" in tok.files


def test_encode_matches_naive_algorithm(model_dir, sp):
    tok = IceTextTokenizer.from_dir(model_dir)
    for text in _texts(1, 60):
        assert tok.preprocess(text) == _naive_preprocess(text)
        assert tok.encode(text) == sp.encode(_naive_preprocess(text)), repr(text)
    assert tok.preprocess("a" + " " * 163 + "b") == "a<|blank_80|><|blank_80|><|blank_3|>b"
    assert tok.preprocess("x\ty\nz  w") == "x<|tab|>y<n>z<|blank_2|>w"
    assert tok.encode("") == []
    # linebreak/whitespaces off: the characters go to SentencePiece as they are
    assert tok.encode("a\nb  c", linebreak=False, whitespaces=False) == sp.encode("a\nb  c")


def test_dummy_prefix_trick(model_dir, sp):
    tok = IceTextTokenizer.from_dir(model_dir)
    dummy = sp.piece_to_id("▁")
    for text in ("hello world", "我们 today", "model  data"):
        with_prefix = tok.encode(text)
        without = tok.encode(text, add_dummy_prefix=False)
        assert sp.id_to_piece(with_prefix[0]).startswith("▁")
        assert not sp.id_to_piece(without[0]).startswith("▁") and dummy not in without[:1]
        assert tok.decode(without) == text
        assert with_prefix != without


def test_decode_restores_whitespace(model_dir):
    tok = IceTextTokenizer.from_dir(model_dir)
    for text in _texts(2, 60):
        if text.startswith(" ") and not text.startswith("  "):
            continue  # SentencePiece drops the one leading space its dummy prefix stands for
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_prompt_layout_and_skipping_specials(model_dir):
    tok = IceTextTokenizer.from_dir(model_dir)
    gmask, sop, eop = tok.special_id("[gMASK]"), tok.special_id("<sop>"), tok.eos_id
    a, b = tok.encode("hello"), tok.encode("world")
    assert tok.prompt_ids("hello") == a + [gmask, sop]
    assert tok.build_inputs(a, b) == a + [gmask, sop] + b + [eop]
    ids = tok.build_inputs(a, b)
    assert tok.decode(ids) == tok.decode(a + b) == "hello world"
    assert tok.decode([tok.pad_id, tok.pad_id] + a, skip_special_tokens=False) == "hello"  # pad always removed
    kept = tok.decode(ids, skip_special_tokens=False)
    assert "[gMASK]" in kept and "<eop>" in kept  # user-defined pieces in this fixture
    assert tok.decode(a + [tok.vocab_size + 5]) == "hello"  # ids past the vocabulary (padded rows) have no text


def test_image_token_offset(model_dir, sp):
    (model_dir / "old").mkdir(exist_ok=True)
    old = model_dir / "old"
    (old / "ice_text.model").write_bytes((model_dir / "ice_text.model").read_bytes())
    tok = IceTextTokenizer.from_dir(old)  # no tokenizer_config.json: the original's default of 20,000
    assert tok.num_image_tokens == 20000
    assert tok.vocab_size == 20000 + sp.vocab_size()
    assert tok.encode("hello world") == [20000 + i for i in sp.encode("hello world")]
    assert tok.eos_id == 20000 + sp.piece_to_id("<eop>")
    assert tok.decode([5, 17] + tok.encode("hello")) == "hello"  # image ids have no text
    assert IceTextTokenizer.from_dir(old, num_image_tokens=0).encode("hello") == sp.encode("hello")


def test_clean_up_option(model_dir):
    tok = IceTextTokenizer.from_dir(model_dir, clean_up_tokenization_spaces=True)
    assert tok.decode(tok.encode("hello . world ,")) == "hello. world,"
    assert IceTextTokenizer.from_dir(model_dir).decode(tok.encode("hello . world")) == "hello . world"


def test_bad_files_are_named(tmp_path, model_dir):
    with pytest.raises(TokenizerError, match="ice_text.model"):
        IceTextTokenizer.from_dir(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="ice_text.model"):
        IceTextTokenizer.from_dir(tmp_path)
    (tmp_path / "ice_text.model").write_bytes((model_dir / "ice_text.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"num_image_tokens": "x"}')
    with pytest.raises(TokenizerError, match="num_image_tokens"):
        IceTextTokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no piece"):
        IceTextTokenizer(model_dir / "ice_text.model", gmask_token="[NOPE]")


def test_special_strings_in_text_are_cut_out_first(model_dir):
    """As the original (a transformers tokenizer): bos/eos/mask/pad/unk strings become their ids, and each piece
    of text around them is encoded on its own, with its own dummy prefix."""
    tok = IceTextTokenizer.from_dir(model_dir)
    sop, pad = tok.special_id("<sop>"), tok.pad_id
    assert tok.encode("hello<sop>world") == tok.encode("hello") + [sop] + tok.encode("world")
    assert tok.encode("<pad>你好 [MASK]") == [pad] + tok.encode("你好 ") + [tok.mask_id]
    assert tok.encode("<sop><eop>") == [sop, tok.eos_id]
    # [gMASK] is not one of the registered special tokens: it goes through SentencePiece with its neighbours
    assert tok.encode("a[gMASK]b") != tok.encode("a") + [tok.gmask_id] + tok.encode("b")
    assert tok.gmask_id in tok.encode("a[gMASK]b")
