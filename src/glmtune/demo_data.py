"""A generated ADGEN-style dataset (product tags -> advertising copy) for the demo and tests.

The copy is built from templates, so a tiny model can truly learn the mapping: every tag value shows up in
the text in a fixed way. Records have the official ADGEN shape: {"content": "类型#裙*颜色#红色*...", "summary": "..."}.
"""

from __future__ import annotations

import random

KINDS = ["裙", "上衣", "裤", "外套", "衬衫", "卫衣", "毛衣", "风衣"]
COLORS = ["红色", "白色", "黑色", "蓝色", "绿色", "粉色", "灰色", "黄色"]
STYLES = ["复古", "简约", "甜美", "休闲", "通勤", "街头", "文艺", "性感"]
MATERIALS = ["棉", "牛仔布", "雪纺", "针织", "羊毛", "丝绸"]
PATTERNS = ["条纹", "格子", "碎花", "纯色", "刺绣", "印花"]

STYLE_LINES = {
    "复古": "复古的设计带来满满的年代感",
    "简约": "简约的线条干净利落",
    "甜美": "甜美的气质十分减龄",
    "休闲": "休闲的版型穿着轻松自在",
    "通勤": "通勤的款式让你在职场更加干练",
    "街头": "街头的风格酷感十足",
    "文艺": "文艺的气息温柔又知性",
    "性感": "性感的剪裁凸显迷人曲线",
}
MATERIAL_LINES = {
    "棉": "采用棉质面料，柔软亲肤又透气",
    "牛仔布": "选用牛仔布面料，耐穿有型",
    "雪纺": "雪纺面料轻盈飘逸",
    "针织": "针织面料弹性十足，舒适贴身",
    "羊毛": "羊毛面料保暖又有质感",
    "丝绸": "丝绸面料顺滑有光泽",
}


def make_record(rng: random.Random) -> dict[str, str]:
    kind, color, style = rng.choice(KINDS), rng.choice(COLORS), rng.choice(STYLES)
    material, pattern = rng.choice(MATERIALS), rng.choice(PATTERNS)
    tags = [("类型", kind), ("颜色", color), ("风格", style), ("材质", material), ("图案", pattern)]
    content = "*".join(f"{k}#{v}" for k, v in tags)
    summary = (
        f"这款{color}{kind}，{STYLE_LINES[style]}。{MATERIAL_LINES[material]}，"
        f"{pattern}图案点缀其间，让你轻松穿出{style}范儿。"
    )
    return {"content": content, "summary": summary}


def make_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(n)]


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Text to train a demo tokenizer on: the records, plus everyday chat phrases in Chinese and English."""
    lines = []
    for r in make_dataset(n, seed):
        lines += [r["content"], r["summary"]]
    lines += [
        "你好，我是人工智能助手。",
        "请根据以下标签为商品编写一段广告文案。",
        "Hello! How can I help you today?",
        "The quick brown fox jumps over the lazy dog.",
        "问：答：[Round 1]",
    ]
    return lines


def make_continuation_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style "continue the text" records over generated advertising copy: the demo's stand-in for
    pre-training, so its tiny base model knows the language before LoRA teaches it the tags -> copy task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = make_record(rng)["summary"]
        cut = rng.randint(2, len(text) // 2)
        out.append({"instruction": "续写下面的广告文案", "input": text[:cut], "output": text[cut:]})
    return out
