"""Writes the sample datasets in this folder (written for glmtune; every record is generated here, deterministic).

Run: python examples/data/make_samples.py   (re-creates the files next to this script)
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent

KINDS = ["连衣裙", "衬衫", "牛仔裤", "卫衣", "风衣", "针织衫", "半身裙", "西装外套"]
COLORS = ["米白色", "雾霾蓝", "墨绿色", "焦糖色", "藏青色", "浅粉色", "燕麦色", "酒红色"]
STYLES = {
    "简约": "线条干净利落，日常搭配毫不费力",
    "复古": "带着一点旧时光的味道，越看越耐看",
    "通勤": "挺括有型，上班穿也足够得体",
    "休闲": "宽松自在，周末出门轻松随意",
    "甜美": "温柔减龄，约会穿刚刚好",
    "文艺": "安静又有质感，适合去美术馆逛一逛",
}
MATERIALS = {
    "棉": "棉质面料亲肤透气",
    "亚麻": "亚麻面料清爽有肌理",
    "羊毛": "羊毛面料温暖柔软",
    "真丝": "真丝面料顺滑有光泽",
    "灯芯绒": "灯芯绒面料厚实有质感",
}
DETAILS = ["荷叶边", "泡泡袖", "撞色包边", "暗扣门襟", "高腰设计", "收腰系带", "口袋装饰"]


def adgen(rng: random.Random) -> dict[str, str]:
    kind, color = rng.choice(KINDS), rng.choice(COLORS)
    style, material, detail = rng.choice(list(STYLES)), rng.choice(list(MATERIALS)), rng.choice(DETAILS)
    content = f"类型#{kind}*颜色#{color}*风格#{style}*材质#{material}*细节#{detail}"
    summary = (
        f"{color}的{kind}，{STYLES[style]}。{MATERIALS[material]}，{detail}的小心思让整体更加生动，"
        f"是衣橱里值得入手的{style}单品。"
    )
    return {"content": content, "summary": summary}


TOPICS = [
    (
        "我想开始跑步，应该怎么安排？",
        "建议从每周三次、每次二十分钟的慢跑开始，速度以能正常说话为准。",
        "跑完膝盖有点酸，正常吗？",
        "轻微酸胀多半是肌肉还在适应，跑后拉伸大腿前后侧；若是关节刺痛就先停跑。",
        "那多久可以加量？",
        "连续两周都跑得轻松时，每周总距离增加不超过一成比较稳妥。",
    ),
    (
        "家里的绿萝叶子发黄了怎么办？",
        "先看浇水：土表干透再浇，盆底不要积水，黄叶剪掉即可。",
        "需要施肥吗？",
        "春秋生长期每月施一次稀释的液肥就够了，冬天停肥。",
        "放在哪里比较好？",
        "放在明亮的散射光处，避开正午直晒，叶色会更绿。",
    ),
    (
        "怎么做番茄炒蛋更好吃？",
        "鸡蛋先炒到刚凝固就盛出，番茄炒出汁后再把鸡蛋倒回去，最后加少许盐和糖。",
        "番茄要去皮吗？",
        "去皮口感更顺滑：顶部划十字，用开水烫半分钟就很好剥。",
        "可以加葱吗？",
        "可以，出锅前撒一把葱花，香味更足。",
    ),
    (
        "周末去杭州玩两天，怎么安排？",
        "第一天西湖环线加灵隐寺，第二天去龙井村喝茶，傍晚逛河坊街。",
        "交通怎么走方便？",
        "市区坐地铁加步行最省心，西湖周边可以骑共享单车。",
        "住哪里合适？",
        "住在西湖东岸或地铁一号线附近，去各个景点都方便。",
    ),
    (
        "Python 里列表和元组有什么区别？",
        "列表可以修改，元组创建后不可修改；元组可以作为字典的键。",
        "什么时候用元组？",
        "数据不该被改动时用元组，比如坐标或函数返回的多个值。",
        "元组更快吗？",
        "创建和遍历略快一些，占用内存也更少，但差别通常不大。",
    ),
    (
        "晚上总是睡不着怎么办？",
        "固定作息时间，睡前一小时放下手机，卧室保持安静偏凉。",
        "喝牛奶有用吗？",
        "温牛奶能让人放松，有一定帮助，但关键还是规律作息。",
        "午睡会影响晚上吗？",
        "午睡控制在半小时以内，并且在下午三点前结束，一般不会影响。",
    ),
]


def dialogues() -> list[dict]:
    out = []
    for q1, a1, q2, a2, q3, a3 in TOPICS:
        out.append({"prompt": q1, "response": a1, "history": []})
        out.append({"prompt": q2, "response": a2, "history": [[q1, a1]]})
        out.append({"prompt": q3, "response": a3, "history": [[q1, a1], [q2, a2]]})
        out.append({"prompt": q3, "response": a3, "history": [[q2, a2]]})
    return out


PEOPLE = [
    ("林晓", "杭州", "工程师", "2019"),
    ("周明", "成都", "医生", "2015"),
    ("陈静", "武汉", "教师", "2021"),
    ("王磊", "西安", "律师", "2018"),
    ("赵雪", "青岛", "设计师", "2020"),
    ("孙浩", "长沙", "记者", "2016"),
]
REVIEWS = [
    ("物流很快，包装也很用心，水果很新鲜。", "水果"),
    ("屏幕清晰，续航比上一代强多了。", "手机"),
    ("房间干净，前台服务热情，离地铁站很近。", "酒店"),
    ("剧情节奏紧凑，结尾有点仓促。", "电影"),
    ("面料舒服，尺码偏大一点。", "服装"),
    ("菜量很足，就是等位时间有点长。", "餐厅"),
]
SENTIMENT = ["正面", "正面", "正面", "中性", "正面", "中性"]


def extraction() -> list[dict]:
    head = "Instruction: 你是一个信息抽取和分类助手，严格按照指令回答。\nInput: "
    out = []
    for name, city, job, year in PEOPLE:
        text = f"{name}于{year}年来到{city}，目前是一名{job}。"
        triples = [
            {"subject": name, "predicate": "居住地", "object": city},
            {"subject": name, "predicate": "职业", "object": job},
        ]
        out.append(
            {
                "context": f"{head}找出句子中的三元组，输出 json：\n\n{text}\nAnswer: ",
                "target": "```json\n" + json.dumps(triples, ensure_ascii=False) + "\n```",
            }
        )
        out.append({"context": f"{head}句子中提到的人是做什么工作的？只输出职业。\n\n{text}\nAnswer: ", "target": job})
    for (review, kind), senti in zip(REVIEWS, SENTIMENT, strict=True):
        out.append(
            {
                "context": f"{head}下面这条评论是关于哪类商品的？用列表回答。\n\n{review}\nAnswer: ",
                "target": json.dumps([kind], ensure_ascii=False),
            }
        )
        out.append({"context": f"{head}判断评论的情感倾向（正面/中性/负面）。\n\n{review}\nAnswer: ", "target": senti})
    return out


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "查询城市的实时天气",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "城市名"}},
        "required": ["city"],
    },
}
RATE_TOOL = {
    "name": "convert_currency",
    "description": "按实时汇率换算金额",
    "parameters": {
        "type": "object",
        "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
        "required": ["amount", "from", "to"],
    },
}
CITIES = [
    ("北京", "晴", 26),
    ("上海", "多云", 29),
    ("广州", "雷阵雨", 31),
    ("哈尔滨", "小雪", -8),
    ("昆明", "晴", 21),
    ("拉萨", "晴", 15),
]
AMOUNTS = [
    (100, "USD", "CNY", 718.5),
    (50, "EUR", "CNY", 390.2),
    (1000, "JPY", "CNY", 48.1),
    (200, "CNY", "USD", 27.8),
    (80, "GBP", "CNY", 731.6),
    (300, "HKD", "CNY", 275.4),
]


def tools_chatglm3() -> list[dict]:
    out = []
    for city, sky, temp in CITIES:
        out.append(
            {
                "tools": [WEATHER_TOOL],
                "conversations": [
                    {"role": "user", "content": f"{city}现在天气怎么样？"},
                    {
                        "role": "tool",
                        "name": "get_weather",
                        "parameters": {"city": city},
                        "observation": {"city": city, "weather": sky, "temperature": temp},
                    },
                    {"role": "assistant", "content": f"{city}现在{sky}，气温{temp}℃。"},
                ],
            }
        )
    for amount, src, dst, result in AMOUNTS:
        out.append(
            {
                "tools": [RATE_TOOL],
                "conversations": [
                    {"role": "user", "content": f"{amount} {src} 能换多少 {dst}？"},
                    {
                        "role": "tool",
                        "name": "convert_currency",
                        "parameters": {"amount": amount, "from": src, "to": dst},
                        "observation": {"result": result},
                    },
                    {"role": "assistant", "content": f"按当前汇率，{amount} {src} 约合 {result} {dst}。"},
                ],
            }
        )
    return out


def tools_glm4() -> list[dict]:
    out = []
    for city, sky, temp in CITIES:
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}}, ensure_ascii=False)
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "", "tools": [{"type": "function", "function": WEATHER_TOOL}]},
                    {"role": "user", "content": f"帮我看看{city}的天气"},
                    {"role": "assistant", "content": call},
                    {
                        "role": "observation",
                        "content": json.dumps({"weather": sky, "temperature": temp}, ensure_ascii=False),
                    },
                    {"role": "assistant", "content": f"{city}目前{sky}，{temp}℃，出门注意增减衣物。"},
                ]
            }
        )
    for amount, src, dst, result in AMOUNTS:
        call = json.dumps({"name": "convert_currency", "arguments": {"amount": amount, "from": src, "to": dst}})
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "", "tools": [{"type": "function", "function": RATE_TOOL}]},
                    {"role": "user", "content": f"把 {amount} {src} 换成 {dst}"},
                    {"role": "assistant", "content": call},
                    {"role": "observation", "content": json.dumps({"result": result})},
                    {"role": "assistant", "content": f"{amount} {src} 约等于 {result} {dst}。"},
                ]
            }
        )
    return out


def alpaca(rng: random.Random) -> list[dict]:
    out = []
    for r in (adgen(rng) for _ in range(12)):
        out.append({"instruction": "根据商品标签写一段广告文案。", "input": r["content"], "output": r["summary"]})
    for q1, a1, *_ in TOPICS:
        out.append({"system": "你是一个耐心的生活助手，回答简洁。", "instruction": q1, "input": "", "output": a1})
    return out


def main() -> None:
    rng = random.Random(20240601)
    # ADGEN style: one JSON object per line in a .json file, as the original AdvertiseGen/train.json
    (HERE / "adgen.json").write_text(
        "".join(json.dumps(adgen(rng), ensure_ascii=False) + "\n" for _ in range(40)), encoding="utf-8"
    )
    with open(HERE / "adgen.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["content", "summary"])
        w.writeheader()
        for _ in range(24):
            w.writerow(adgen(rng))
    jsonl = {"dialogue.jsonl": dialogues(), "tools_chatglm3.jsonl": tools_chatglm3(), "tools_glm4.jsonl": tools_glm4()}
    for name, rows in jsonl.items():
        (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for name, rows in {"extraction.json": extraction(), "alpaca.json": alpaca(rng)}.items():
        (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
