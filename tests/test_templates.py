"""Templates: golden token layouts per generation (built by hand with a one-id-per-character fake tokenizer) and
label/truncation rules checked against small independent re-implementations of the official THUDM scripts."""

from __future__ import annotations

import json
import random

import pytest

from glmtune.templates import IGNORE_INDEX, EncodeOptions, Message, get_template
from test_data_fake import FakeTokenizer

U, A, S, OBS = "user", "assistant", "system", "observation"


def E(tok, text):  # noqa: N802 - short helper
    return tok.encode(text)


def sid(tok, name):
    return tok.special_id(name)


# ---- golden prompts ----------------------------------------------------------------------------------------
def test_v1_prompt_without_and_with_history():
    tok, t = FakeTokenizer("chatglm"), get_template("chatglm")
    g, sop = sid(tok, "[gMASK]"), sid(tok, "<sop>")
    assert t.encode_prompt(tok, [Message(U, "你好")]) == E(tok, "你好") + [g, sop]
    msgs = [Message(U, "q1"), Message(A, "a1"), Message(U, "q2")]
    assert t.encode_prompt(tok, msgs) == E(tok, "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：") + [g, sop]


def test_v2_prompt_rounds_from_one():
    tok, t = FakeTokenizer("chatglm2"), get_template("chatglm2")
    g, sop = sid(tok, "[gMASK]"), sid(tok, "sop")
    assert t.encode_prompt(tok, [Message(U, "hi")]) == [g, sop] + E(tok, "[Round 1]\n\n问：hi\n\n答：")
    msgs = [Message(U, "q1"), Message(A, "a1"), Message(U, "q2")]
    expect = [g, sop] + E(tok, "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：")
    assert t.encode_prompt(tok, msgs) == expect


def test_v3_prompt_roles_metadata_and_tools():
    tok, t = FakeTokenizer("chatglm3"), get_template("chatglm3")
    g, sop = sid(tok, "[gMASK]"), sid(tok, "sop")
    r = {k: sid(tok, f"<|{k}|>") for k in ("system", "user", "assistant", "observation")}
    tools = [{"name": "f", "parameters": {}}]
    msgs = [
        Message(S, "sys", tools=tools),
        Message(U, "q"),
        Message(A, "call", metadata="f"),
        Message(OBS, "res"),
    ]
    expect = (
        [g, sop]
        + [r["system"]] + E(tok, "\n") + E(tok, "sys\n" + json.dumps(tools, indent=4, ensure_ascii=False))
        + [r["user"]] + E(tok, "\n") + E(tok, "q")
        + [r["assistant"]] + E(tok, "f\n") + E(tok, "call")
        + [r["observation"]] + E(tok, "\n") + E(tok, "res")
        + [r["assistant"]]
    )  # fmt: skip
    assert t.encode_prompt(tok, msgs) == expect
    assert t.encode_prompt(tok, msgs, add_generation_prompt=False) == expect[:-1]


def test_glm4_prompt_tools_block_and_empty_content():
    tok, t = FakeTokenizer("glm4"), get_template("glm4")
    g, sop = sid(tok, "[gMASK]"), sid(tok, "<sop>")
    fn = {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}
    msgs = [Message(S, "", tools=[{"type": "function", "function": fn}]), Message(U, "北京?")]
    tools_text = (
        "\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n"
        + json.dumps(fn, ensure_ascii=False, indent=4)
        + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    )
    expect = [g, sop, sid(tok, "<|system|>")] + E(tok, tools_text)  # the empty system content renders nothing
    expect += [sid(tok, "<|user|>")] + E(tok, "\n北京?") + [sid(tok, "<|assistant|>")]
    assert t.encode_prompt(tok, msgs) == expect
    # metadata and content are one text segment in GLM-4
    assert t.encode_prompt(tok, [Message(A, "{}", metadata="fn")], add_generation_prompt=False) == (
        [g, sop, sid(tok, "<|assistant|>")] + E(tok, "fn\n{}")
    )


# ---- independent re-implementations of the official training preprocessing ---------------------------------
def ref_v1(tok, query, answer, history, prefix, max_src, max_tgt, with_history_column):
    """ChatGLM-6B ptuning/main.py preprocess_function_train (no padding)."""
    if not with_history_column:
        prompt = query
    else:
        prompt = ""
        for turn_idx, (old_query, response) in enumerate(history):
            prompt += "[Round {}]\n问：{}\n答：{}\n".format(turn_idx, old_query, response)  # noqa: UP032
        prompt += "[Round {}]\n问：{}\n答：".format(len(history), query)  # noqa: UP032
    prompt = prefix + prompt
    a_ids, b_ids = tok.encode(prompt), tok.encode(answer)
    if len(a_ids) > max_src - 1:
        a_ids = a_ids[: max_src - 1]
    if len(b_ids) > max_tgt - 2:
        b_ids = b_ids[: max_tgt - 2]
    input_ids = a_ids + [sid(tok, "[gMASK]"), sid(tok, "<sop>")] + b_ids + [sid(tok, "<eop>")]
    context_length = input_ids.index(sid(tok, "<sop>"))
    labels = [-100] * context_length + input_ids[context_length:]
    labels = [(x if x != tok.pad_id else -100) for x in labels]
    return input_ids, labels


def ref_v2(tok, query, answer, history, prefix, max_src, max_tgt):
    """ChatGLM2-6B ptuning/main.py preprocess_function_train (HF truncation: specials count in max_length)."""
    prompt = ""
    for i, (q, r) in enumerate(history or []):
        prompt += "[Round {}]\n\n问：{}\n\n答：{}\n\n".format(i + 1, q, r)  # noqa: UP032
    prompt += "[Round {}]\n\n问：{}\n\n答：".format(len(history or []) + 1, query)  # noqa: UP032
    text = tok.encode(prefix + prompt)
    a_ids = [sid(tok, "[gMASK]"), sid(tok, "sop")] + text[: max(max_src - 2, 0)]
    b_ids = tok.encode(answer)[:max_tgt]
    input_ids = a_ids + b_ids + [tok.eos_id]
    labels = [tok.pad_id] * len(a_ids) + b_ids + [tok.eos_id]
    labels = [(x if x != tok.pad_id else -100) for x in labels]
    return input_ids, labels


def ref_v3(tok, conv, max_in, max_out):
    """ChatGLM3 finetune_demo/finetune_hf.py process_batch (conversations of role/content dicts)."""
    input_ids, loss_masks = [sid(tok, "[gMASK]"), sid(tok, "sop")], [False, False]
    for message in conv:
        loss_mask_val = message["role"] not in ("system", "user")
        new = [sid(tok, f"<|{message['role']}|>")] + tok.encode("\n") + tok.encode(message["content"])
        input_ids += new
        loss_masks += [loss_mask_val] * len(new)
    input_ids.append(tok.eos_id)
    loss_masks = [False, *loss_masks]
    labels = [i if m else -100 for i, m in zip(input_ids, loss_masks, strict=True)]
    n = max_in + max_out + 1
    return input_ids[:n], labels[:n]


def ref_glm4(tok, conv, max_in, max_out):
    """GLM-4 finetune_demo/finetune.py process_batch (messages without tools)."""
    input_ids, loss_masks = [sid(tok, "[gMASK]"), sid(tok, "<sop>")], [False, False]
    for message in conv:
        loss_mask_val = message["role"] not in ("system", "user", "observation")
        rendered = f"<|{message['role']}|>\n{message['content']}" if message["content"] else ""
        new = []
        if rendered:
            new = [sid(tok, f"<|{message['role']}|>")] + tok.encode(rendered[len(f"<|{message['role']}|>") :])
        input_ids += new
        loss_masks += [loss_mask_val] * len(new)
    input_ids.append(tok.eos_id)
    loss_masks = [False, *loss_masks]
    labels = [i if m else -100 for i, m in zip(input_ids, loss_masks, strict=True)]
    n = max_in + max_out + 1
    return input_ids[:n], labels[:n]


def rand_text(rng, lo=0, hi=12):
    return "".join(rng.choice("天地玄黄ab c\n，。") for _ in range(rng.randint(lo, hi)))


def test_v1_golden_example():
    tok, t = FakeTokenizer("chatglm"), get_template("chatglm")
    g, sop, eop = sid(tok, "[gMASK]"), sid(tok, "<sop>"), sid(tok, "<eop>")
    ex = t.encode_example(tok, [Message(U, "问"), Message(A, "答")])
    assert ex.input_ids == E(tok, "问") + [g, sop] + E(tok, "答") + [eop]
    assert ex.labels == [IGNORE_INDEX, IGNORE_INDEX, sop] + E(tok, "答") + [eop]
    assert ex.prefix_length == 2  # tokens before <sop>


@pytest.mark.parametrize("seed", range(40))
def test_v1_matches_ptuning_main(seed):
    rng = random.Random(seed)
    tok, t = FakeTokenizer("chatglm"), get_template("chatglm")
    history = [(rand_text(rng, 1), rand_text(rng, 1)) for _ in range(rng.randint(0, 2))]
    query, answer, prefix = rand_text(rng, 1), rand_text(rng, 1), rng.choice(["", "前缀："])
    max_src, max_tgt = rng.randint(2, 60), rng.randint(3, 20)
    with_col = bool(history) or rng.random() < 0.5
    msgs = ([Message(S, prefix)] if prefix else []) + [m for q, a in history for m in (Message(U, q), Message(A, a))]
    msgs += [Message(U, query), Message(A, answer)]
    ex = t.encode_example(tok, msgs, EncodeOptions(max_src, max_tgt, history_rounds=with_col))
    assert (ex.input_ids, ex.labels) == ref_v1(tok, query, answer, history, prefix, max_src, max_tgt, with_col)
    assert len(ex.input_ids) <= max_src + max_tgt


def test_v2_golden_example():
    tok, t = FakeTokenizer("chatglm2"), get_template("chatglm2")
    g, sop, eos = sid(tok, "[gMASK]"), sid(tok, "sop"), tok.eos_id
    ex = t.encode_example(tok, [Message(U, "q"), Message(A, "a")])
    head = [g, sop] + E(tok, "[Round 1]\n\n问：q\n\n答：")
    assert ex.input_ids == head + E(tok, "a") + [eos]
    assert ex.labels == [IGNORE_INDEX] * len(head) + E(tok, "a") + [eos]


@pytest.mark.parametrize("seed", range(40))
def test_v2_matches_ptuning_main(seed):
    rng = random.Random(seed)
    tok, t = FakeTokenizer("chatglm2"), get_template("chatglm2")
    history = [(rand_text(rng, 1), rand_text(rng, 1)) for _ in range(rng.randint(0, 2))]
    query, answer, prefix = rand_text(rng, 1), rand_text(rng, 1), rng.choice(["", "前缀："])
    max_src, max_tgt = rng.randint(2, 60), rng.randint(1, 20)
    msgs = ([Message(S, prefix)] if prefix else []) + [m for q, a in history for m in (Message(U, q), Message(A, a))]
    msgs += [Message(U, query), Message(A, answer)]
    ex = t.encode_example(tok, msgs, EncodeOptions(max_src, max_tgt))
    assert (ex.input_ids, ex.labels) == ref_v2(tok, query, answer, history, prefix, max_src, max_tgt)
    assert len(ex.input_ids) <= max_src + max_tgt + 1


def test_v3_golden_example_end_of_turn_targets():
    tok, t = FakeTokenizer("chatglm3"), get_template("chatglm3")
    g, sop, eos = sid(tok, "[gMASK]"), sid(tok, "sop"), tok.eos_id
    ru, ra = sid(tok, "<|user|>"), sid(tok, "<|assistant|>")
    msgs = [Message(U, "q1"), Message(A, "a1"), Message(U, "q2"), Message(A, "a2")]
    ex = t.encode_example(tok, msgs)
    nl = E(tok, "\n")
    assert ex.input_ids == [g, sop, ru, *nl, *E(tok, "q1"), ra, *nl, *E(tok, "a1"), ru, *nl, *E(tok, "q2"), ra, *nl,
                            *E(tok, "a2"), eos]  # fmt: skip
    x = IGNORE_INDEX
    # trained: the metadata newline and the reply after <|assistant|>, then the next role token / eos
    assert ex.labels == [x, x, x, x, x, x, x, *nl, *E(tok, "a1"), ru, x, x, x, x, *nl, *E(tok, "a2"), eos]


def _conv(rng, roles):
    return [{"role": r, "content": rand_text(rng, 1)} for r in roles]


@pytest.mark.parametrize("seed", range(30))
def test_v3_matches_finetune_hf(seed):
    rng = random.Random(seed)
    tok, t = FakeTokenizer("chatglm3"), get_template("chatglm3")
    roles = (["system"] if rng.random() < 0.5 else []) + ["user", "assistant"] * rng.randint(1, 3)
    if rng.random() < 0.3:
        roles += ["observation", "assistant"]
    conv = _conv(rng, roles)
    max_in, max_out = rng.randint(1, 30), rng.randint(1, 30)
    ex = t.encode_example(tok, [Message(m["role"], m["content"]) for m in conv], EncodeOptions(max_in, max_out))
    assert (ex.input_ids, ex.labels) == ref_v3(tok, conv, max_in, max_out)


@pytest.mark.parametrize("seed", range(30))
def test_glm4_matches_finetune(seed):
    rng = random.Random(seed)
    tok, t = FakeTokenizer("glm4"), get_template("glm4")
    roles = (["system"] if rng.random() < 0.5 else []) + ["user", "assistant"] * rng.randint(1, 3)
    if rng.random() < 0.5:
        roles += ["observation", "assistant"]
    conv = _conv(rng, roles)
    if rng.random() < 0.3:
        conv[0]["content"] = ""  # an empty message renders nothing
    max_in, max_out = rng.randint(1, 30), rng.randint(1, 30)
    ex = t.encode_example(tok, [Message(m["role"], m["content"]) for m in conv], EncodeOptions(max_in, max_out))
    assert (ex.input_ids, ex.labels) == ref_glm4(tok, conv, max_in, max_out)


def test_observation_trained_in_v3_not_in_glm4():
    msgs = [Message(U, "q"), Message(A, "c", metadata="f"), Message(OBS, "obs"), Message(A, "r")]
    tools = [Message(S, "s", tools=[{"type": "function", "function": {"name": "f"}}])]
    for gen, trained in (("chatglm3", True), ("glm4", False)):
        tok = FakeTokenizer(gen)
        ex = get_template(gen).encode_example(tok, tools + msgs)
        obs = tok.encode("obs")
        i = next(k for k in range(len(ex.input_ids)) if ex.input_ids[k : k + 3] == obs)
        assert (ex.labels[i : i + 3] == obs) is trained


# ---- options beyond the official ---------------------------------------------------------------------------
def test_mask_history_trains_only_last_reply():
    tok, t = FakeTokenizer("chatglm3"), get_template("chatglm3")
    msgs = [Message(U, "q1"), Message(A, "aa"), Message(U, "q2"), Message(A, "bb")]
    ex = t.encode_example(tok, msgs, EncodeOptions(mask_history=True))
    trained = [i for i, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX]
    assert trained == E(tok, "\nbb") + [tok.eos_id]


def test_message_train_false_is_respected():
    tok, t = FakeTokenizer("glm4"), get_template("glm4")
    msgs = [Message(U, "q1"), Message(A, "aa", train=False), Message(U, "q2"), Message(A, "bb")]
    ex = t.encode_example(tok, msgs)
    trained = [i for i, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX]
    assert trained == E(tok, "\nbb") + [tok.eos_id]


@pytest.mark.parametrize("gen", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_train_on_prompt_trains_prompt_but_not_prefix(gen):
    tok, t = FakeTokenizer(gen), get_template(gen)
    ex = t.encode_example(tok, [Message(U, "qq"), Message(A, "aa")], EncodeOptions(train_on_prompt=True))
    trained = {i for i, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX}
    assert set(tok.encode("qq")) <= trained
    assert all(y == IGNORE_INDEX for y in ex.labels[: len(tok.prefix_ids())])


@pytest.mark.parametrize("gen", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_keep_question_truncation_keeps_question(gen):
    tok, t = FakeTokenizer(gen), get_template(gen)
    msgs = [Message(U, "x" * 50), Message(A, "y" * 50), Message(U, "QUESTION"), Message(A, "ok")]
    official = t.encode_example(tok, msgs, EncodeOptions(20, 10))
    kept = t.encode_example(tok, msgs, EncodeOptions(20, 10, truncation="keep_question"))
    assert tok.decode(official.input_ids).find("QUESTION") == -1
    assert "QUESTION" in tok.decode(kept.input_ids)
    assert len(kept.input_ids) <= len(official.input_ids)
    assert kept.input_ids[: len(tok.prefix_ids())] == tok.prefix_ids()


# ---- stop ids, post-processing, registry --------------------------------------------------------------------
def test_stop_ids():
    assert get_template("chatglm").stop_ids(FakeTokenizer("chatglm")) == [sid(FakeTokenizer("chatglm"), "<eop>")]
    t2 = FakeTokenizer("chatglm2")
    assert get_template("chatglm2").stop_ids(t2) == [t2.eos_id]
    for gen in ("chatglm3", "glm4"):
        tok = FakeTokenizer(gen)
        expect = [tok.eos_id, sid(tok, "<|user|>"), sid(tok, "<|observation|>")]
        assert get_template(gen).stop_ids(tok) == expect


def test_postprocess():
    v1 = get_template("chatglm")
    assert v1.postprocess(" 你好,世界!好的:是;吗? ") == "你好，世界！好的：是；吗？"
    assert v1.postprocess("a,b 你好,", original=False) == "a,b 你好,"
    assert v1.postprocess("hello, world") == "hello, world"  # no CJK next to it: kept
    assert get_template("chatglm2").postprocess("  hi \n") == "hi"
    for gen in ("chatglm3", "glm4"):
        t = get_template(gen)
        assert t.postprocess("\n 你好 ") == "你好"
        assert t.postprocess('get_weather\n{"city": "x"}') == 'get_weather\n{"city": "x"}'
        assert t.postprocess("") == ""


def test_registry_and_message_errors():
    assert get_template("ChatGLM3-6B").name == "chatglm3"
    with pytest.raises(ValueError, match="unknown template"):
        get_template("llama")
    with pytest.raises(ValueError, match="unknown role"):
        Message("bot", "x")
    with pytest.raises(ValueError, match="alternate"):
        get_template("chatglm2").encode_example(FakeTokenizer("chatglm2"), [Message(U, "a"), Message(U, "b"),
                                                                            Message(A, "c")])  # fmt: skip
    with pytest.raises(ValueError, match="assistant"):
        get_template("glm4").encode_example(FakeTokenizer("glm4"), [Message(U, "a")])


def test_render_text_matches_ids():
    for gen in ("chatglm", "chatglm2", "chatglm3", "glm4"):
        tok, t = FakeTokenizer(gen), get_template(gen)
        msgs = [Message(U, "q1"), Message(A, "a1"), Message(U, "q2")]
        text = t.render_text(msgs)
        ids = t.encode_prompt(tok, msgs)
        assert tok.decode(ids) == "".join(c for c in text if True).replace("[gMASK]", "").replace(
            "<sop>", "").replace("sop", "").replace("<|user|>", "").replace("<|assistant|>", "")  # fmt: skip


# ---- with the real tokenizers (tiny trained models from conftest) ---------------------------------------------
@pytest.mark.parametrize(("gen", "fixture"), [("chatglm2", "chatglm2_tokenizer_dir"),
                                              ("chatglm3", "chatglm3_tokenizer_dir"),
                                              ("glm4", "glm4_tokenizer_dir")])  # fmt: skip
def test_real_tokenizer_layouts(gen, fixture, request):
    from glmtune.tokenizers import load_tokenizer

    tok = load_tokenizer(request.getfixturevalue(fixture), gen)
    t = get_template(gen)
    msgs = [Message(U, "hello world"), Message(A, "the model")]
    prompt = t.encode_prompt(tok, msgs[:1])
    ex = t.encode_example(tok, msgs)
    assert prompt[:2] == tok.prefix_ids()
    assert ex.input_ids[: len(prompt)] == prompt  # training and inference render the prompt the same way
    assert ex.input_ids[-1] == tok.eos_id
    trained = [y for y in ex.labels if y != IGNORE_INDEX]
    assert "the model" in tok.decode(trained)
    if gen == "chatglm3":  # build_single_message: SentencePiece's own ids for "\n" and the content
        role = tok.special_id("<|user|>")
        assert prompt[2:] == [role] + tok.encode_ordinary("\n") + tok.encode_ordinary("hello world") + [
            tok.special_id("<|assistant|>")
        ]
