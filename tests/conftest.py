"""Shared fixtures: tiny tokenizer files trained on the spot, written into temporary model folders."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from glmtune.tiny import train_byte_bpe, write_ranks

REPO_ROOT = Path(__file__).resolve().parents[1]
# The released GLM-4 ranks file, kept outside the repository; tests that need it skip when it is absent.
GLM4_REAL_TOKENIZER = REPO_ROOT.parent / "shared" / "assets" / "glm4-tokenizer" / "tokenizer.model"

_ZH = "我们今天天气很好你是谁人工智能模型训练数据中文英文测试分词器的语言大学习生成对话系统北京上海请问一下"
_EN = (
    "hello world the model token train data chat glm python code def return import class self print "
    "sop eop laptop people desktop stop isotope yes no it's we're they'll I'm 2023 42 3.14"
).split()


# Tests of more than ~2 s on 2 CPU cores (``pytest --durations=30``) that live in files without their own
# ``@pytest.mark.slow``: marked here, so ``pytest -m "not slow"`` is the fast subset. ``make test`` runs them all.
SLOW_TESTS = {
    "test_train_ddp.py::test_two_processes_match_one",  # two processes over gloo
    "test_demo.py::test_demo_trains_evaluates_chats_and_merges",  # the whole demo pipeline
    "test_train_resume.py::test_killed_run_resumes_with_the_same_losses",  # a training subprocess killed mid-run
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def _corpus(seed: int, n_lines: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 12)):
            if rng.random() < 0.5:
                parts.append("".join(rng.choice(_ZH) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(_EN))
        sep = rng.choice([" ", " ", "  ", "\n", "，", "。"])
        lines.append(sep.join(parts))
    lines.append("def f(x):\n    return x * 2\n\n\tindent")
    return lines


@pytest.fixture(scope="session")
def sp_model_bytes() -> bytes:
    """A ~400-piece BPE SentencePiece model with byte fallback, set up like the ChatGLM2/3 ones."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(0, 1500)),
        model_writer=out,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return out.getvalue()


@pytest.fixture(scope="session")
def chatglm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_bytes: bytes) -> Path:
    """A ChatGLM2-6B-like folder: tokenizer.model + the original tokenizer_config.json fields."""
    path = tmp_path_factory.mktemp("chatglm2")
    (path / "tokenizer.model").write_bytes(sp_model_bytes)
    config = {"name_or_path": "THUDM/chatglm2-6b", "remove_space": False, "tokenizer_class": "ChatGLMTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_bytes: bytes) -> Path:
    """A ChatGLM3-6B-like folder: same model file, a tokenizer_config.json whose chat_template uses <|user|>."""
    path = tmp_path_factory.mktemp("chatglm3")
    (path / "tokenizer.model").write_bytes(sp_model_bytes)
    template = (
        "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
        "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = {"chat_template": template, "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def glm4_tiny_ranks() -> dict[bytes, int]:
    return train_byte_bpe(_corpus(1, 120), n_merges=150)


@pytest.fixture(scope="session")
def glm4_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, glm4_tiny_ranks: dict[bytes, int]) -> Path:
    """A GLM-4-like folder with a tiny tiktoken ranks file as tokenizer.model."""
    path = tmp_path_factory.mktemp("glm4")
    write_ranks(path / "tokenizer.model", glm4_tiny_ranks)
    return path


@pytest.fixture(scope="session")
def glm4_real_tokenizer_file() -> Path:
    """The released GLM-4 ranks file (skip when this checkout has no shared assets beside it)."""
    if not GLM4_REAL_TOKENIZER.is_file():
        pytest.skip(f"GLM-4 tokenizer file not found at {GLM4_REAL_TOKENIZER}")
    return GLM4_REAL_TOKENIZER
