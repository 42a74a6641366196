"""ROUGE/BLEU against hand computations and an independent re-implementation written here.

The reference re-implements what the official scripts get from rouge_chinese and nltk: ROUGE-N on the *sets* of
n-grams of the jieba words (F = 2PR / (P + R + 1e-8)), ROUGE-L on the LCS of the words; BLEU-4 with clipped n-gram
counts, the NIST geometric smoothing (method3: the k-th zero precision becomes 1 / (2^k * number of hypothesis
n-grams)), the brevity penalty against the reference length, and 0 when no unigram matches.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

jieba = pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

from glmtune.evaluate.metrics import (  # noqa: E402
    DEFINITIONS,
    bleu4,
    check_bleu_kinds,
    compute_metrics,
    rouge_f,
    score_pair,
    segment,
)

PAIRS = [  # (prediction, reference)
    ("这件连衣裙采用了蓝色的面料，显得清新又优雅，穿上很显瘦。", "这款连衣裙选用蓝色面料，清新优雅，上身显瘦又时髦。"),
    ("简约的圆领设计，修饰脸型。", "圆领的设计简约大方，可以很好地修饰脸型，凸显气质。"),
    ("the cat sat on the mat", "the cat is on the mat"),
    ("A quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over a lazy dog!"),
    ("好", "这件衣服很好看"),
    ("宽松的版型 loose fit，舒适透气", "宽松版型，舒适又透气，loose fit"),
    ("完全不相关", "the cat"),
]


# ---- independent reference --------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """jieba words without the whitespace tokens (what rouge_chinese sees after joining with spaces)."""
    return [w for w in jieba.lcut(text.strip()) if w.strip()]


def ngram_set(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def f_score(p: float, r: float) -> float:
    return 2 * p * r / (p + r + 1e-8)


def ref_rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    h, r = ngram_set(hyp, n), ngram_set(ref, n)
    overlap = len(h & r)
    p = overlap / len(h) if h else 0.0
    rec = overlap / len(r) if r else 0.0
    return f_score(p, rec)


def lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def ref_rouge(pred: str, ref: str) -> dict[str, float]:
    h, r = words(pred), words(ref)
    if not h or not r:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    m = lcs(h, r)
    out = {"rouge-1": ref_rouge_n(h, r, 1), "rouge-2": ref_rouge_n(h, r, 2), "rouge-l": f_score(m / len(h), m / len(r))}
    return {k: round(v * 100, 4) for k, v in out.items()}


def ref_bleu(hyp: list[str], ref: list[str]) -> float:
    """Sentence BLEU-4 (0-1), uniform weights, method3 smoothing."""
    if not hyp:
        return 0.0
    fractions = []
    for n in range(1, 5):
        h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        fractions.append((sum(min(c, r[g]) for g, c in h.items()), max(1, sum(h.values()))))
    if fractions[0][0] == 0:
        return 0.0
    k, logs = 1, []
    for num, den in fractions:
        if num == 0:
            logs.append(math.log(1 / (2**k * den)))
            k += 1
        else:
            logs.append(math.log(num / den))
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(logs) / 4)


# ---- hand-computed values --------------------------------------------------------------------------------
def test_hand_computed_chinese_pair():
    assert segment("我爱北京") == ["我", "爱", "北京"]
    assert segment("我爱上海") == ["我", "爱", "上海"]
    scores = score_pair("我爱北京", "我爱上海", ("char", "word"))
    # words: 2 of 3 unigrams shared, 1 of 2 bigrams, LCS 2
    assert scores["rouge-1"] == round(f_score(2 / 3, 2 / 3) * 100, 4)
    assert scores["rouge-2"] == round(f_score(1 / 2, 1 / 2) * 100, 4)
    assert scores["rouge-l"] == round(f_score(2 / 3, 2 / 3) * 100, 4)
    # characters 我爱北京 / 我爱上海: p1 = 2/4, p2 = 1/3, p3 = 0/2 -> 1/(2*2), p4 = 0/1 -> 1/(4*1); equal lengths, BP 1
    assert scores["bleu-4"] == round((2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25 * 100, 4)
    # words 我/爱/北京: p1 = 2/3, p2 = 1/2, p3 = 0/1 -> 1/2, p4 = 0 of none (denominator 1) -> 1/4
    assert scores["bleu-4-word"] == pytest.approx((2 / 3 * 1 / 2 * 1 / 2 * 1 / 4) ** 0.25 * 100, abs=1e-9)


def test_hand_computed_english_pair():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    s = score_pair(pred, ref, ("char",))
    # unique words: {the, cat, sat, on, mat} vs {the, cat, is, on, mat}: 4 shared of 5 each
    assert s["rouge-1"] == round(f_score(4 / 5, 4 / 5) * 100, 4)
    # unique bigrams: {the cat, cat sat, sat on, on the, the mat} vs {the cat, cat is, is on, on the, the mat}: 3 of 5
    assert s["rouge-2"] == round(f_score(3 / 5, 3 / 5) * 100, 4)
    # LCS the cat on the mat = 5 of 6 words each
    assert s["rouge-l"] == round(f_score(5 / 6, 5 / 6) * 100, 4)


def test_unique_ngrams_and_short_hypothesis():
    # repeated words count once (rouge_chinese's sets); one word has no bigram: ROUGE-2 precision 0
    s = rouge_f("the the the", "the cat")
    assert s["rouge-1"] == round(f_score(1, 1 / 2) * 100, 4)
    assert s["rouge-2"] == 0.0
    assert s["rouge-l"] == round(f_score(1 / 3, 1 / 2) * 100, 4)
    # two characters: 1-gram 1/2 matched, 2-gram 0/1 -> 1/2, 3- and 4-gram of none -> 1/4, 1/8; BP exp(1 - 3/2)
    expected = math.exp(1 - 3 / 2) * (1 / 2 * 1 / 2 * 1 / 4 * 1 / 8) ** 0.25
    assert bleu4("我的", "我们好", "char") == round(expected * 100, 4)


def test_no_unigram_match_is_zero():
    assert bleu4("abc", "xyz", "char") == 0.0
    assert bleu4("完全不相关", "the cat", "word") == 0.0


# ---- against the reference -------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,ref", PAIRS)
def test_rouge_matches_reference(pred, ref):
    assert rouge_f(pred, ref) == pytest.approx(ref_rouge(pred, ref), abs=1e-4)


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_char_bleu_matches_reference(pred, ref):
    expected = round(ref_bleu(list(pred.strip()), list(ref.strip())) * 100, 4)
    assert bleu4(pred, ref, "char") == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_word_bleu_matches_reference(pred, ref):
    # the v3/GLM-4 definition: list(jieba.cut(text)), whitespace tokens included
    expected = ref_bleu(jieba.lcut(pred.strip()), jieba.lcut(ref.strip())) * 100
    assert bleu4(pred, ref, "word") == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_char_and_word_definitions_differ():
    pred, ref = PAIRS[0]
    assert bleu4(pred, ref, "char") != pytest.approx(bleu4(pred, ref, "word"), abs=1e-3)


# ---- empty predictions and the corpus report --------------------------------------------------------------
@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_prediction_scores_zero(empty):
    scores = score_pair(empty, "参考答案", ("char", "word"))
    assert scores == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0, "bleu-4-word": 0.0}


def test_compute_metrics_means_counts_and_definitions():
    preds = [p for p, _ in PAIRS] + ["", " "]
    refs = [r for _, r in PAIRS] + ["有参考", "也有参考"]
    report = compute_metrics(preds, refs, ["word", "char"])
    assert report.count == len(PAIRS) + 2
    assert report.empty_predictions == 2
    expected_rouge = [ref_rouge(p, r) for p, r in zip(preds, refs, strict=True)]
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        assert report.scores[name] == pytest.approx(sum(e[name] for e in expected_rouge) / len(preds), abs=1e-4)
    word = [ref_bleu(jieba.lcut(p.strip()), jieba.lcut(r.strip())) * 100 if p.strip() else 0.0
            for p, r in zip(preds, refs, strict=True)]  # fmt: skip
    char = [round(ref_bleu(list(p.strip()), list(r.strip())) * 100, 4) for p, r in zip(preds, refs, strict=True)]
    assert report.scores["bleu-4"] == pytest.approx(sum(word) / len(preds), abs=1e-9)  # first definition named
    assert report.scores["bleu-4-char"] == pytest.approx(sum(char) / len(preds), abs=1e-4)
    assert report.definitions == {"rouge": DEFINITIONS["rouge"], "bleu-4": DEFINITIONS["word"],
                                  "bleu-4-char": DEFINITIONS["char"]}  # fmt: skip
    table = report.table()
    assert "2 empty predictions" in table and "ChatGLM3" in table and "ptuning/main.py" in table
    assert report.flat()["empty_predictions"] == 2.0


def test_bad_definitions_and_lengths():
    with pytest.raises(ValueError, match="unknown BLEU definition 'sacre'"):
        check_bleu_kinds(["sacre"])
    with pytest.raises(ValueError, match="repeat"):
        check_bleu_kinds(["char", "char"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown BLEU"):
        bleu4("a", "a", "sentencepiece")
