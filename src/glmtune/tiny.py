"""Tiny model folders in the original layout, built locally: for the demo and for tests.

No weights or tokenizers can be downloaded, so a tiny ChatGLM is made from scratch: a SentencePiece model
trained on a small corpus, a random model of the generation's architecture, saved as the original files.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

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


def train_sentencepiece(lines: Sequence[str], vocab_size: int = 800) -> bytes:
    """A byte-fallback BPE SentencePiece model (like the ChatGLM2/3 tokenizer.model), as bytes."""
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
    )
    return out.getvalue()


def make_tiny_model_dir(
    out_dir: str | Path, lines: Sequence[str], *, generation: str = "chatglm3", vocab_size: int = 800, seed: int = 0
) -> Path:
    """Write a tiny ChatGLM2/3 model folder (config.json, safetensors, tokenizer.model, tokenizer_config.json)."""
    if generation not in _SP_SPECIALS:
        raise ValueError(f"tiny model folders are built for {sorted(_SP_SPECIALS)}, not {generation!r}")
    sp_bytes = train_sentencepiece(lines, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    n_ids = sp.get_piece_size() + len(_SP_SPECIALS[generation])
    config = preset(f"tiny-{generation}")
    config = config.replace(padded_vocab_size=(n_ids + 63) // 64 * 64, eos_token_id=sp.eos_id(), pad_token_id=0)
    torch.manual_seed(seed)
    model = build_model(config)
    model.init_weights(seed=seed)

    staging = Path(out_dir).parent / f".{Path(out_dir).name}.tokenizer"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(sp_bytes)
    (staging / "tokenizer_config.json").write_text(
        json.dumps({"name_or_path": f"tiny-{generation}", "tokenizer_class": "ChatGLMTokenizer",
                    "padding_side": "left", "remove_space": False, "do_lower_case": False}, indent=2)  # fmt: skip
    )
    try:
        save_pretrained(model, config, out_dir, tokenizer_files=[staging / "tokenizer.model",
                                                                   staging / "tokenizer_config.json"])  # fmt: skip
    finally:
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    log.info("wrote a tiny %s model folder to %s", generation, out_dir)
    return Path(out_dir)
