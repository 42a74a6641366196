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
# the attributes the demo scores: tag key -> every value the generator uses
SCORED = {"颜色": COLORS, "风格": STYLES, "材质": MATERIALS, "图案": PATTERNS}

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


def make_item(rng: random.Random) -> dict[str, str]:
    """A random product: its kind and the four scored attributes."""
    return {"kind": rng.choice(KINDS), "color": rng.choice(COLORS), "style": rng.choice(STYLES),
            "material": rng.choice(MATERIALS), "pattern": rng.choice(PATTERNS)}  # fmt: skip


def ad_copy(item: dict[str, str]) -> str:
    """The advertising copy of ``item``: every attribute appears in it in a fixed way."""
    color, kind, style = item["color"], item["kind"], item["style"]
    return (
        f"这款{color}{kind}，{STYLE_LINES[style]}。{MATERIAL_LINES[item['material']]}，"
        f"{item['pattern']}图案点缀其间，让你轻松穿出{style}范儿。"
    )


def product_page(item: dict[str, str]) -> str:
    """The copy of ``item`` followed by a recap of its details (the pre-training text)."""
    recap = f"{item['color']}{item['kind']}，{item['material']}面料，{item['pattern']}图案，{item['style']}风格。"
    return ad_copy(item) + "商品详情：" + recap


def make_record(rng: random.Random) -> dict[str, str]:
    item = make_item(rng)
    tags = [("类型", item["kind"]), ("颜色", item["color"]), ("风格", item["style"]), ("材质", item["material"]),
            ("图案", item["pattern"])]  # fmt: skip
    return {"content": "*".join(f"{k}#{v}" for k, v in tags), "summary": ad_copy(item)}


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
    """Alpaca-style "continue the text" records over generated product pages: the demo's stand-in for
    pre-training, so its tiny base model knows the language before LoRA teaches it the tags -> copy task.

    A page is an advertising copy followed by a recap that repeats the product's details, as shop pages do: to
    continue it the model must look back at what was said, the in-context copying any pre-trained model has.
    The tags format of the task never appears here."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = product_page(make_item(rng))
        cut = rng.randint(2, len(text) // 2)
        out.append({"instruction": "续写下面的广告文案", "input": text[:cut], "output": text[cut:]})
    return out


def parse_tags(content: str) -> dict[str, str]:
    """ADGEN tags ``"类型#裤*颜色#黑色"`` as ``{"类型": "裤", "颜色": "黑色"}`` (pieces without ``#`` are skipped)."""
    pairs = (part.split("#", 1) for part in content.split("*") if "#" in part)
    return {key: value for key, value in pairs}


def attribute_hits(content: str, answer: str) -> tuple[int, int]:
    """(attributes the answer states correctly, attributes scored) for one prompt: an attribute of ``SCORED`` in
    the tags is correct when the answer names its value and no other value of the same attribute (a coat that is
    "黑色" and "红色" is not stated correctly as black)."""
    tags = parse_tags(content)
    correct = total = 0
    for key, values in SCORED.items():
        if key not in tags:
            continue
        total += 1
        named = {v for v in values if v in answer}
        correct += named == {tags[key]}
    return correct, total


def attribute_score(pairs: list[tuple[str, str]]) -> float:
    """The share of scored attributes stated correctly over (tags, answer) pairs, 0..1 (0 when none is scored)."""
    hits = [attribute_hits(content, answer) for content, answer in pairs]
    total = sum(t for _, t in hits)
    return sum(c for c, _ in hits) / total if total else 0.0
