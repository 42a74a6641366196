"""A deterministic stand-in tokenizer for data/template tests: one id per character (1000 + code point), special
tokens at small ids, so expected layouts can be written by hand. Implements glmtune.tokenizers.base.Tokenizer."""

from __future__ import annotations

from pathlib import Path

SPECIALS = {
    "chatglm": ["<pad>", "[gMASK]", "<sop>", "<eop>", "[MASK]"],
    "chatglm2": ["<unk>", "<s>", "</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"],
    "chatglm3": ["<unk>", "<s>", "</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
    "glm4": ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
             "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
}  # fmt: skip
EOS = {"chatglm": "<eop>", "chatglm2": "</s>", "chatglm3": "</s>", "glm4": "<|endoftext|>"}
PAD = {"chatglm": "<pad>", "chatglm2": "<unk>", "chatglm3": "<unk>", "glm4": "<|endoftext|>"}
OFFSET = 1000


class FakeTokenizer:
    def __init__(self, generation: str) -> None:
        self.generation = generation
        self._ids = {t: i for i, t in enumerate(SPECIALS[generation])}
        self._names = {i: t for t, i in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return OFFSET + 0x110000

    @property
    def eos_id(self) -> int:
        return self._ids[EOS[self.generation]]

    @property
    def pad_id(self) -> int:
        return self._ids[PAD[self.generation]]

    def encode(self, text: str) -> list[int]:
        return [OFFSET + ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i >= OFFSET:
                out.append(chr(i - OFFSET))
            elif not skip_special_tokens:
                out.append(self._names[i])
        return "".join(out)

    def special_id(self, token: str) -> int:
        return self._ids[token]

    def is_special(self, token_id: int) -> bool:
        return token_id < OFFSET

    def id_to_piece(self, token_id: int) -> str:
        return self._names[token_id] if token_id < OFFSET else chr(token_id - OFFSET)

    def prefix_ids(self) -> list[int]:
        if self.generation == "chatglm":
            return []
        return [self._ids["[gMASK]"], self._ids["sop" if "sop" in self._ids else "<sop>"]]

    @property
    def files(self) -> list[Path]:
        return []


def test_fake_tokenizer_round_trip():
    for gen in SPECIALS:
        tok = FakeTokenizer(gen)
        ids = tok.encode("问：ab\n")
        assert ids == [OFFSET + ord(c) for c in "问：ab\n"]
        assert tok.decode(ids + [tok.eos_id]) == "问：ab\n"
        assert not any(tok.is_special(i) for i in ids) and tok.is_special(tok.eos_id)
