"""OpenAI tool calls <-> ChatGLM3 / GLM-4 formats (glmtune.serve.tools): requests rendered as the original chat
templates render the equivalent conversation (GLM-4: its Jinja chat template; ChatGLM3: its tokenizer's
build_chat_input), replies parsed back into tool_calls, and every malformed field named in the error."""

from __future__ import annotations

import json
import re

import pytest

from glmtune.serve.tools import (
    ToolError,
    forced_tool,
    parse_tools,
    reply_message,
    request_messages,
    tool_call_possible,
)
from glmtune.templates import CHATGLM3_TOOL_PROMPT, GLM4_SYSTEM, get_template
from test_data_fake import FakeTokenizer

WEATHER = {
    "name": "get_weather",
    "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
ARGS = {"city": "北京", "days": 3, "hourly": True, "fields": ["温度", None]}

# GLM-4-9b-chat's tokenizer_config.json chat template, the function-tool branch (the built-in tools' branches
# are left out: glmtune refuses those tools).
GLM4_JINJA = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n" + GLM4_SYSTEM + "\n\n"
    "# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = re.compile(r"(\[gMASK\]|<sop>|sop|<\|system\|>|<\|user\|>|<\|assistant\|>|<\|observation\|>)")


def glm4_official_text(messages: list[dict]) -> str:
    """The chat template rendered with transformers' ``tojson`` (key order and non-ASCII kept). Blocks are not
    trimmed: transformers' ``trim_blocks`` would eat the first of the two newlines before each ``## name``, which
    THUDM's own Python rendering of the tools block (``build_system_prompt`` in the GLM-4 README) keeps, as
    glmtune's template does."""
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(GLM4_JINJA).render(messages=messages, add_generation_prompt=True)


def text_ids(tok: FakeTokenizer, text: str) -> list[int]:
    """Rendered text -> ids, special tokens by name (as a tokenizer reads its chat template's output)."""
    ids = []
    for part in SPECIAL.split(text):
        if SPECIAL.fullmatch(part):
            ids.append(tok.special_id(part))
        elif part:
            ids += tok.encode(part)
    return ids


def call(ident: str, name: str, arguments: dict | str) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": args}}


CONVERSATION = [
    {"role": "system", "content": "你是天气助手"},
    {"role": "user", "content": "北京明天天气？"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", ARGS)]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"温度": 22}'},
]


# ---- requests -> the model's format -------------------------------------------------------------------------
def test_glm4_request_renders_as_the_official_chat_template():
    tools = parse_tools(TOOLS, "auto", "glm4")
    msgs = request_messages(CONVERSATION, tools, "glm4")
    # THUDM's openai_api_server process_messages: tools as a system item without content, each tool call as an
    # assistant item (metadata = name, content = arguments), tool results as observation items.
    official = [
        {"role": "system", "content": None, "tools": TOOLS},
        {"role": "system", "content": "你是天气助手"},  # glmtune keeps the caller's system prompt (the demo drops it)
        {"role": "user", "content": "北京明天天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": json.dumps(ARGS, ensure_ascii=False)},
        {"role": "observation", "content": '{"温度": 22}'},
    ]
    text = glm4_official_text(official)
    template, tok = get_template("glm4"), FakeTokenizer("glm4")
    assert template.render_text(msgs) == text
    assert template.encode_prompt(tok, msgs) == text_ids(tok, text)


def test_chatglm3_request_renders_as_build_chat_input():
    tools = parse_tools(TOOLS, None, "chatglm3")
    msgs = request_messages(CONVERSATION, tools, "chatglm3")
    tok = FakeTokenizer("chatglm3")
    # ChatGLM3's tokenizer: build_single_message(role, metadata, content) for each history item, the tools dumped
    # after the system content; the assistant's call is the python block of its openai_api demo.
    block = "```python\ntool_call(city='北京', days=3, hourly=True, fields=['温度', None])\n```"
    items = [
        ("system", "", CHATGLM3_TOOL_PROMPT + "\n" + json.dumps([WEATHER, CLOCK], indent=4, ensure_ascii=False)),
        ("system", "", "你是天气助手"),
        ("user", "", "北京明天天气？"),
        ("assistant", "get_weather", block),
        ("observation", "", '{"温度": 22}'),
    ]
    expect = tok.prefix_ids()
    for role, metadata, content in items:
        expect += [tok.special_id(f"<|{role}|>")] + tok.encode(f"{metadata}\n") + tok.encode(content)
    expect.append(tok.special_id("<|assistant|>"))
    assert get_template("chatglm3").encode_prompt(tok, msgs) == expect


def test_text_and_several_calls_become_one_turn_each():
    messages = [
        {"role": "user", "content": "天气和时间"},
        {"role": "assistant", "content": "我来查一下。",
         "tool_calls": [call("a", "get_weather", {"city": "上海"}), call("b", "get_time", {})]},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "晴"}]},
    ]  # fmt: skip
    msgs = request_messages(messages, None, "glm4")
    assert [(m.role, m.metadata, m.content) for m in msgs] == [
        ("user", "", "天气和时间"),
        ("assistant", "", "我来查一下。"),
        ("assistant", "get_weather", '{"city": "上海"}'),
        ("assistant", "get_time", "{}"),
        ("observation", "", "12:00"),
        ("observation", "", "晴"),
    ]
    v3 = request_messages(messages, None, "chatglm3")
    assert [m.content for m in v3[2:4]] == ["```python\ntool_call(city='上海')\n```", "```python\ntool_call()\n```"]


@pytest.mark.parametrize("generation", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_plain_conversations_on_every_generation(generation):
    parts = [{"type": "text", "text": "q"}, {"type": "text", "text": "2"}]
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": parts}]  # fmt: skip
    msgs = request_messages(messages, None, generation)
    assert [(m.role, m.content) for m in msgs] == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    get_template(generation).render_text(msgs)  # renders in the generation's own layout
    dev = request_messages([{"role": "developer", "content": "s"}, {"role": "user", "content": "q"}], None, generation)
    assert dev[0].role == "system"


# ---- replies -> OpenAI ------------------------------------------------------------------------------------------
def test_glm4_reply_with_a_tool_call():
    raw = 'get_weather\n{"city": "北京", "days": 3}'
    content, calls = reply_message(raw, "glm4", TOOLS)
    assert content is None
    [c] = calls
    assert c["type"] == "function" and re.fullmatch(r"call_[0-9a-f]{24}", c["id"])
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'}
    assert reply_message(raw, "glm4", TOOLS) == (content, calls)  # deterministic


def test_chatglm3_reply_with_a_tool_call_parsed_as_literals():
    raw = "get_weather\n```python\ntool_call(city=\"北京\", days=3, hourly=True, fields=('温度', None))\n```"
    content, [c] = reply_message(raw, "chatglm3", TOOLS)
    assert content is None and c["function"]["name"] == "get_weather"
    assert json.loads(c["function"]["arguments"]) == ARGS


def test_chatglm3_reply_that_talks_then_calls_two_tools():
    raw = ("\n我来查一下。<|assistant|>get_weather\n```python\ntool_call(city='上海')\n```"
           "<|assistant|>get_time\n```python\ntool_call()\n```")  # fmt: skip
    content, calls = reply_message(raw, "chatglm3", TOOLS)
    assert content == "我来查一下。"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "上海"}), ("get_time", {})]  # fmt: skip
    assert calls[0]["id"] != calls[1]["id"]
    assert [c["id"] for c in reply_message(raw, "chatglm3", TOOLS)[1]] == [c["id"] for c in calls]
    other = raw.replace("上海", "广州")
    assert reply_message(other, "chatglm3", TOOLS)[1][0]["id"] != calls[0]["id"]


@pytest.mark.parametrize("generation", ["chatglm3", "glm4"])
def test_reply_then_request_reproduces_the_models_turn(generation):
    """A reply's tool calls sent back as history render exactly the text the model generated."""
    body = ("```python\ntool_call(city='北京', days=3)\n```" if generation == "chatglm3"
            else '{"city": "北京",  "days": 3}')  # fmt: skip
    raw = "get_weather\n" + body
    content, calls = reply_message(raw, generation, TOOLS)
    messages = [{"role": "user", "content": "北京？"}, {"role": "assistant", "content": content, "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "晴"}]  # fmt: skip
    text = get_template(generation).render_text(request_messages(messages, None, generation))
    assert "<|assistant|>" + raw + "<|observation|>\n晴<|assistant|>" in text


NOT_CALLS = {
    "plain reply": "\n北京明天晴。",
    "no metadata newline": "北京明天晴。",
    "unknown tool": 'get_stock\n{"code": "1"}',
    "glm4 arguments not JSON": "get_weather\n{city: 北京}",
    "glm4 arguments an array": 'get_weather\n["北京"]',
    "glm4 NaN": 'get_weather\n{"x": NaN}',
    "v3 no code block": "get_weather\ntool_call(city='北京')",
    "v3 not tool_call": "get_weather\n```python\nprint(city='北京')\n```",
    "v3 positional": "get_weather\n```python\ntool_call('北京')\n```",
    "v3 **kwargs": "get_weather\n```python\ntool_call(**{'city': '北京'})\n```",
    "v3 code in arguments": "get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```",
    "v3 a set": "get_weather\n```python\ntool_call(city={'北京'})\n```",
    "v3 infinity": "get_weather\n```python\ntool_call(x=1e999)\n```",
    "v3 syntax error": "get_weather\n```python\ntool_call(city='北京'\n```",
    "valid call then a broken one": 'get_weather\n{"city": "北京"}<|assistant|>get_time\nnot json',
}


@pytest.mark.parametrize("case", NOT_CALLS)
@pytest.mark.parametrize("generation", ["chatglm3", "glm4"])
def test_a_reply_that_is_not_a_valid_call_is_plain_content(generation, case):
    raw = NOT_CALLS[case]
    assert reply_message(raw, generation, TOOLS) == (get_template(generation).postprocess(raw), None)


def test_no_tools_or_old_generations_give_plain_content():
    raw = 'get_weather\n{"city": "北京"}'
    assert reply_message(raw, "glm4", None) == (get_template("glm4").postprocess(raw), None)
    for generation in ("chatglm", "chatglm2"):
        assert reply_message("[[训练时间]] ok", generation, TOOLS) == ("2023年 ok", None)


@pytest.mark.parametrize("generation", ["chatglm3", "glm4"])
def test_tool_call_possible_while_the_first_line_may_name_a_tool(generation):
    possible = [
        tool_call_possible(raw, generation, TOOLS) for raw in ("", "get", "get_w", "get_time", "get_weather\n{")
    ]
    assert possible == [True] * 5
    for raw in ("\n", "\nget_weather", "hello", "get_weatherX", "get_weather2\n{", "get_time_\n"):
        assert not tool_call_possible(raw, generation, TOOLS), raw
    assert not tool_call_possible("get", generation, None)
    # every prefix of a real call is held back, so no part of it is streamed as content
    raw = 'get_weather\n{"city": "北京"}'
    assert all(tool_call_possible(raw[:i], generation, TOOLS) for i in range(len(raw) + 1))


def test_tool_call_possible_is_false_without_tool_calls():
    assert not tool_call_possible("get", "chatglm2", TOOLS) and not tool_call_possible("", "chatglm", TOOLS)


# ---- tools and tool_choice ----------------------------------------------------------------------------------
def test_tool_choice_decides_what_the_model_sees():
    wrapped = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
    assert parse_tools(TOOLS, None, "glm4") == wrapped
    assert parse_tools(TOOLS, "auto", "chatglm3") == wrapped
    assert parse_tools(TOOLS, "required", "glm4") == wrapped
    assert parse_tools(TOOLS, "none", "glm4") is None
    assert parse_tools(None, None, "chatglm") is None and parse_tools([], "none", "chatglm2") is None
    named = {"type": "function", "function": {"name": "get_time"}}
    assert parse_tools(TOOLS, named, "glm4") == [{"type": "function", "function": CLOCK}]
    extra = [{"type": "function", "function": {"parameters": {}, "strict": True, "name": "f", "description": "d"}}]
    assert parse_tools(extra, None, "glm4") == [{"type": "function", "function":
                                                 {"name": "f", "description": "d", "parameters": {}}}]  # fmt: skip
    assert list(parse_tools(extra, None, "glm4")[0]["function"]) == ["name", "description", "parameters"]


BAD_TOOLS = {
    "tools not a list": ({"type": "function"}, None, "glm4", "tools"),
    "tool not an object": (["f"], None, "glm4", "tools[0]"),
    "tool type": ([{"type": "retrieval"}], None, "glm4", "tools[0].type"),
    "function missing": ([{"type": "function"}], None, "glm4", "tools[0].function"),
    "name missing": ([{"type": "function", "function": {}}], None, "glm4", "tools[0].function.name"),
    "name with a newline": ([{"type": "function", "function": {"name": "a\nb"}}], None, "glm4",
                            "tools[0].function.name"),
    "description a number": ([{"type": "function", "function": {"name": "f", "description": 1}}], None, "glm4",
                             "tools[0].function.description"),
    "parameters a string": ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], None, "glm4",
                            "tools[0].function.parameters"),
    "duplicate name": ([*TOOLS, TOOLS[0]], None, "glm4", "tools[2].function.name"),
    "tools on v1": (TOOLS, None, "chatglm", "tools"),
    "tools on v2": (TOOLS, "none", "chatglm2", "tools"),
    "unknown tool_choice": (TOOLS, "any", "glm4", "tool_choice"),
    "tool_choice a number": (TOOLS, 1, "glm4", "tool_choice"),
    "required without tools": (None, "required", "glm4", "tool_choice"),
    "named without tools": (None, {"type": "function", "function": {"name": "f"}}, "glm4",
                            "tool_choice.function.name"),
    "tool_choice type": (TOOLS, {"type": "tool", "function": {"name": "get_time"}}, "glm4", "tool_choice.type"),
    "tool_choice function": (TOOLS, {"type": "function"}, "glm4", "tool_choice.function"),
    "tool_choice name": (TOOLS, {"type": "function", "function": {"name": 3}}, "glm4", "tool_choice.function.name"),
    "tool_choice unknown name": (TOOLS, {"type": "function", "function": {"name": "nope"}}, "glm4",
                                 "tool_choice.function.name"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_TOOLS)
def test_malformed_tools_name_the_field(case):
    tools, choice, generation, param = BAD_TOOLS[case]
    with pytest.raises(ToolError) as e:
        parse_tools(tools, choice, generation)
    assert e.value.param == param and e.value.message and isinstance(e.value, ValueError)


U = {"role": "user", "content": "q"}
BAD_MESSAGES = {
    "not a list": ("hi", "glm4", "messages"),
    "empty": ([], "glm4", "messages"),
    "message not an object": ([U, "x"], "glm4", "messages[1]"),
    "unknown role": ([{"role": "function", "content": "x"}, U], "glm4", "messages[0].role"),
    "content a number": ([{"role": "user", "content": 3}], "glm4", "messages[0].content"),
    "content part not text": ([{"role": "user", "content": [{"type": "image_url"}]}], "glm4",
                              "messages[0].content[0]"),
    "user content null": ([{"role": "user", "content": None}], "glm4", "messages[0].content"),
    "ends with an assistant": ([U, {"role": "assistant", "content": "a"}], "glm4", "messages[1].role"),
    "tool_calls not a list": ([U, {"role": "assistant", "tool_calls": {"id": "a"}}, U], "glm4",
                              "messages[1].tool_calls"),
    "tool call not an object": ([U, {"role": "assistant", "tool_calls": ["f"]}, U], "glm4",
                                "messages[1].tool_calls[0]"),
    "tool call id missing": ([U, {"role": "assistant", "tool_calls": [{"type": "function", "function":
                              {"name": "f", "arguments": "{}"}}]}, U], "glm4", "messages[1].tool_calls[0].id"),
    "tool call type": ([U, {"role": "assistant", "tool_calls": [{**call("a", "f", {}), "type": "x"}]}, U], "glm4",
                       "messages[1].tool_calls[0].type"),
    "tool call function": ([U, {"role": "assistant", "tool_calls": [{"id": "a", "function": "f"}]}, U], "glm4",
                           "messages[1].tool_calls[0].function"),
    "tool call name": ([U, {"role": "assistant", "tool_calls": [call("a", "", {})]}, U], "glm4",
                       "messages[1].tool_calls[0].function.name"),
    "arguments not JSON": ([U, {"role": "assistant", "tool_calls": [call("a", "f", "{city")]}, U], "chatglm3",
                           "messages[1].tool_calls[0].function.arguments"),
    "arguments an array": ([U, {"role": "assistant", "tool_calls": [call("a", "f", "[1]")]}, U], "glm4",
                           "messages[1].tool_calls[0].function.arguments"),
    "arguments an object": ([U, {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f",
                             "arguments": {}}}]}, U], "glm4", "messages[1].tool_calls[0].function.arguments"),
    "tool without a call": ([U, {"role": "tool", "tool_call_id": "a", "content": "x"}], "glm4",
                            "messages[1].tool_call_id"),
    "tool with a wrong id": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {})]},
                              {"role": "tool", "tool_call_id": "b", "content": "x"}], "glm4",
                             "messages[2].tool_call_id"),
    "the same result twice": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {})]},
                               {"role": "tool", "tool_call_id": "a", "content": "x"},
                               {"role": "tool", "tool_call_id": "a", "content": "x"}], "glm4",
                              "messages[3].tool_call_id"),
    "tool content missing": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {})]},
                              {"role": "tool", "tool_call_id": "a"}], "glm4", "messages[2].content"),
    "v3 argument not a Python name": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {"user-name": 1})]}, U],
                                      "chatglm3", "messages[1].tool_calls[0].function.arguments"),
    "v3 argument a keyword": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {"class": 1})]}, U],
                              "chatglm3", "messages[1].tool_calls[0].function.arguments"),
    "tool result on v2": ([U, {"role": "tool", "tool_call_id": "a", "content": "x"}], "chatglm2", "messages[1].role"),
    "tool calls on v1": ([U, {"role": "assistant", "tool_calls": [call("a", "f", {})]}, U], "chatglm",
                         "messages[1].tool_calls"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_MESSAGES)
def test_malformed_messages_name_the_field(case):
    messages, generation, param = BAD_MESSAGES[case]
    with pytest.raises(ToolError) as e:
        request_messages(messages, None, generation)
    assert e.value.param == param, e.value.message


def test_tools_for_an_old_generation_are_refused_in_the_messages_too():
    with pytest.raises(ToolError) as e:
        request_messages([U], [{"type": "function", "function": CLOCK}], "chatglm2")
    assert e.value.param == "tools"


def test_which_tool_choice_forces_a_call():
    tools = parse_tools(TOOLS, None, "glm4")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert forced_tool(named, parse_tools(TOOLS, named, "glm4")) == "get_time"
    assert forced_tool("required", tools) is None and forced_tool("auto", tools) is None  # several tools: no pick
    one = parse_tools(TOOLS[:1], "required", "glm4")
    assert forced_tool("required", one) == TOOLS[0]["function"]["name"]
    assert forced_tool("none", None) is None and forced_tool(None, None) is None
