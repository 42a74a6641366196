"""`glmtune demo`: the pipeline on a tiny built-in model, on the CPU.

Today: build a tiny ChatGLM3-architecture model and tokenizer, save them in the original format, load the
folder back as any real model folder is loaded, and stream one chat reply.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from glmtune.chat import ChatSession
from glmtune.demo_data import corpus_lines, make_dataset
from glmtune.generate import GenerationConfig
from glmtune.pretrained import load_pretrained
from glmtune.tiny import make_tiny_model_dir


def run_demo(out: str | Path, *, seed: int = 0) -> None:
    out = Path(out)
    say = print
    t0 = time.perf_counter()
    model_dir = out / "base-model"
    say(f"[1/3] building a tiny ChatGLM3 model and tokenizer in {model_dir}")
    make_tiny_model_dir(model_dir, corpus_lines(seed=seed), generation="chatglm3", seed=seed)
    files = sorted(p.name for p in model_dir.iterdir())
    say(f"      files: {', '.join(files)}")

    say("[2/3] loading it back like any original model folder")
    pretrained = load_pretrained(model_dir, dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in pretrained.model.parameters())
    say(f"      generation={pretrained.generation} parameters={n_params:,} vocab={pretrained.tokenizer.vocab_size}")

    query = "请根据以下标签为商品编写一段广告文案：" + make_dataset(1, seed=seed + 1)[0]["content"]
    say("[3/3] one streamed chat turn (random weights: the words are noise until the model is fine-tuned)")
    say(f"User: {query}")
    sys.stdout.write("Assistant: ")
    session = ChatSession(pretrained, GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.7,
                                                       temperature=0.95, seed=seed))  # fmt: skip
    for piece in session.reply_stream(query):
        sys.stdout.write(piece)
        sys.stdout.flush()
    say(f"\n\ndone in {time.perf_counter() - t0:.1f}s; model folder: {model_dir}")
    say(f"try: .venv/bin/glmtune chat {model_dir}")
