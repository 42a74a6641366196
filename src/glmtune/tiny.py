"""Tiny model folders in the original layout, built locally: for the demo and for tests.

No weights or tokenizers can be downloaded, so a tiny ChatGLM is made from scratch: a SentencePiece model
trained on a small corpus, a random model of the generation's architecture, saved as the original files.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import logging
import random
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from glmtune.models import build_model
from glmtune.models.checkpoint import save_pretrained
from glmtune.models.config import preset

log = logging.getLogger(__name__)

# Special tokens the original tokenizers append after the SentencePiece vocabulary.
_SP_SPECIALS = {
    "chatglm2": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"],
    "chatglm3": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|observation|>"],
}  # fmt: skip
_V1_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def train_sentencepiece(lines: Sequence[str], vocab_size: int = 800, max_piece_length: int = 16) -> bytes:
    """A byte-fallback BPE SentencePiece model (like the ChatGLM2/3 tokenizer.model), as bytes; pieces have at most
    ``max_piece_length`` characters."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        max_sentencepiece_length=max_piece_length,
    )
    return out.getvalue()


def train_byte_bpe(texts: list[str], n_merges: int, seed: int = 0) -> dict[bytes, int]:
    """A tiny byte-level BPE: all 256 bytes (ranks in a shuffled order) then ``n_merges`` learned merges."""
    byte_order = list(range(256))
    random.Random(seed).shuffle(byte_order)
    ranks = {bytes([b]): r for r, b in enumerate(byte_order)}
    words = collections.Counter()
    for text in texts:
        for chunk in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text):
            words[tuple(bytes([b]) for b in chunk.encode("utf-8"))] += 1
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


def ranks_text(ranks: dict[bytes, int]) -> str:
    """A tiktoken ranks file's text (``<base64 bytes> <rank>`` per line), the GLM-4 ``tokenizer.model`` layout."""
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    return "\n".join(lines) + "\n"


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text(ranks_text(ranks))


def train_ice_text(lines: Sequence[str], vocab_size: int = 400) -> bytes:
    """A unigram SentencePiece model laid out like ChatGLM-6B's ice_text.model: <unk> <s> </s> <pad>, then <n>,
    <|tab|>, <|blank_2..80|> and the special tokens as user-defined pieces."""
    out = io.BytesIO()
    symbols = ["<n>", "<|tab|>", *[f"<|blank_{n}|>" for n in range(2, 81)], *_V1_SPECIALS]
    text = [line.replace("\n", "<n>").replace("\t", "<|tab|>") for line in lines]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, vocab_size=vocab_size + len(symbols), model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
        user_defined_symbols=symbols, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return out.getvalue()


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _tokenizer_files(
    generation: str, lines: Sequence[str], vocab_size: int, max_piece_length: int = 16
) -> tuple[dict[str, bytes], dict]:
    """(file name -> contents, config changes) for a tiny tokenizer of ``generation``."""
    if generation == "chatglm":
        model = train_ice_text(lines, vocab_size // 2)
        sp = spm.SentencePieceProcessor(model_proto=model)
        ids = {t: sp.piece_to_id(t) for t in _V1_SPECIALS}
        tok_config = {"name_or_path": "tiny-chatglm", "tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 0,
                      "bos_token": "<sop>", "eos_token": "<eop>", "mask_token": "[MASK]", "gmask_token": "[gMASK]",
                      "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left"}  # fmt: skip
        changes = dict(padded_vocab_size=_round_up(sp.get_piece_size()), bos_token_id=ids["<sop>"],
                       eos_token_id=ids["<eop>"], mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"],
                       pad_token_id=3)  # fmt: skip
        return {"ice_text.model": model, "tokenizer_config.json": _json(tok_config)}, changes
    if generation == "glm4":
        from glmtune.tokenizers.glm4 import GLM4_SPECIAL_TOKENS

        ranks = train_byte_bpe(list(lines), n_merges=max(vocab_size - 256, 0))
        n = len(ranks)
        special = {t: n + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
        # as the released file: the 14 specials as added tokens right after the ranks, so the original
        # tokenizer (a transformers class) treats them as single tokens too
        added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True} for t, i in special.items()}  # fmt: skip
        tok_config = {"name_or_path": "tiny-glm4", "tokenizer_class": "ChatGLM4Tokenizer", "padding_side": "left",
                      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "added_tokens_decoder": added,
                      "additional_special_tokens": [t for t in special if t != "<|endoftext|>"]}  # fmt: skip
        eos = [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
        changes = dict(padded_vocab_size=_round_up(n + len(special)), eos_token_id=eos,
                       pad_token_id=special["<|endoftext|>"])  # fmt: skip
        return {"tokenizer.model": ranks_text(ranks).encode(), "tokenizer_config.json": _json(tok_config)}, changes
    if generation not in _SP_SPECIALS:
        raise ValueError(f"tiny model folders are built for chatglm, chatglm2, chatglm3, glm4, not {generation!r}")
    model = train_sentencepiece(lines, vocab_size, max_piece_length)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n_ids = sp.get_piece_size() + len(_SP_SPECIALS[generation])
    tok_config = {"name_or_path": f"tiny-{generation}", "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left",
                  "remove_space": False, "do_lower_case": False}  # fmt: skip
    changes = dict(padded_vocab_size=_round_up(n_ids), eos_token_id=sp.eos_id(), pad_token_id=0)
    return {"tokenizer.model": model, "tokenizer_config.json": _json(tok_config)}, changes


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def make_tiny_model_dir(
    out_dir: str | Path,
    lines: Sequence[str],
    *,
    generation: str = "chatglm3",
    vocab_size: int = 800,
    seed: int = 0,
    max_piece_length: int = 16,
    sizes: dict | None = None,
) -> Path:
    """Write a tiny model folder of ``generation`` (chatglm, chatglm2, chatglm3, glm4) in the original layout:
    config.json, model.safetensors, and the tokenizer files (trained on ``lines``). ``max_piece_length`` caps the
    SentencePiece pieces (ChatGLM2/3); ``sizes`` changes the tiny preset's fields (``{"num_layers": 4}``)."""
    files, changes = _tokenizer_files(generation, lines, vocab_size, max_piece_length)
    config = preset(f"tiny-{generation}").replace(**{**(sizes or {}), **changes})
    model = build_model(config, generation=generation)
    model.init_weights(seed=seed, std=0.3 if config.arch == "glm" else 0.02)  # see tests/test_generate.py

    with tempfile.TemporaryDirectory(prefix=".tiny-tokenizer-") as staging:
        paths = []
        for name, data in files.items():
            (Path(staging) / name).write_bytes(data)
            paths.append(Path(staging) / name)
        save_pretrained(model, config, out_dir, tokenizer_files=paths)
    log.info("wrote a tiny %s model folder to %s", generation, out_dir)
    return Path(out_dir)
