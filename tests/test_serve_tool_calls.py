"""A tool-call round trip through glmtune serve with the official openai client, on tiny ChatGLM3 and GLM-4 models.

A random tiny model never emits a tool call, so each model is first trained (a few hundred Adam steps, CPU) on one
conversation in its own format: the user asks, the assistant calls ``get_weather``, the tool answers, the assistant
replies. The conversation is rendered by the server's own path (serve/tools.py ``request_messages`` + the
template), so what this proves end to end: the request's ``tools`` and messages reach the model as the prompt it was
trained on; its generated call is parsed into OpenAI ``tool_calls`` with ``finish_reason`` "tool_calls" (streamed as
one delta too); the client sends the call and the tool's result back; the model's answer arrives as content. It does
not prove that a real ChatGLM3/GLM-4 checkpoint calls tools (that is the format tests' job, test_serve_tools.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import create_app, serving  # noqa: E402
from glmtune.serve.tools import parse_tools, request_messages  # noqa: E402
from glmtune.templates import IGNORE_INDEX, Message  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
QUESTION = [{"role": "user", "content": "北京天气"}]
CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
RESULT = {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 22}'}
ANSWER = "北京今天22度"


def conversation(generation: str) -> list[Message]:
    """The whole round trip as the model's turns (the server renders requests the same way)."""
    tools = parse_tools(TOOLS, None, generation)
    asked = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT]
    return [*request_messages(asked, tools, generation), Message("assistant", ANSWER)]


def train_on(p, messages: list[Message], steps: int = 300) -> None:
    """Fit the tiny model to the conversation's assistant turns (teacher forcing, Adam) until each target token is
    the clear argmax."""
    example = p.template.encode_example(p.tokenizer, messages)
    ids = torch.tensor([example.input_ids])
    targets = torch.tensor([example.labels])[:, 1:]
    trained = targets != IGNORE_INDEX
    model = p.model
    model.train()
    for q in model.parameters():
        q.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    with torch.enable_grad():
        for _ in range(steps):
            logits = model(ids)[:, :-1].float()
            loss = F.cross_entropy(logits[trained], targets[trained])
            if (logits[trained].argmax(-1) == targets[trained]).all() and loss.item() < 0.1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    assert loss.item() < 0.1, f"the tiny model did not learn the conversation in {steps} steps ({loss.item():.3f})"


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def trained(request, tmp_path_factory):
    from glmtune.templates import get_template

    text = get_template(request.param).render_text(conversation(request.param))  # a tokenizer that knows the format
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("tools") / request.param,
                                 corpus_lines(seed=0) + [text] * 20, generation=request.param, vocab_size=2000,
                                 sizes={"seq_length": 1024})  # fmt: skip
    p = load_pretrained(folder, dtype="float32", device="cpu")
    train_on(p, conversation(request.param))
    return p


def test_tool_call_round_trip_with_the_openai_client(trained):
    app = create_app(trained, model_name="tiny")
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        first = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, temperature=0,
                                               max_tokens=48)  # fmt: skip
        [choice] = first.choices
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert json.loads(call.function.arguments) == {"city": "北京"}
        assert first.usage.completion_tokens > 0

        chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, temperature=0,
                                                     max_tokens=48, stream=True))  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1  # sent whole, as one delta
        [streamed] = deltas[0].tool_calls
        assert (streamed.index, streamed.id, streamed.function.name) == (0, call.id, "get_weather")
        assert json.loads(streamed.function.arguments) == {"city": "北京"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        back = [*QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": RESULT["content"]}]  # fmt: skip
        answer = client.chat.completions.create(model="tiny", messages=back, tools=TOOLS, temperature=0,
                                                max_tokens=24)  # fmt: skip
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.content == ANSWER
        assert not answer.choices[0].message.tool_calls
        streamed = list(client.chat.completions.create(model="tiny", messages=back, tools=TOOLS, temperature=0,
                                                       max_tokens=24, stream=True))  # fmt: skip
        texts = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
        assert "".join(texts) == ANSWER and len(texts) > 1  # not a tool call: streamed as it comes
        assert streamed[-1].choices[0].finish_reason == "stop"

        plain = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=8)
        assert plain.choices[0].finish_reason in ("stop", "length") and not plain.choices[0].message.tool_calls
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=QUESTION, tools=[{"type": "function"}])
        assert e.value.body["param"].startswith("tools[0]")


def test_a_named_tool_choice_forces_the_call(trained):
    """A named ``tool_choice`` (and ``"required"`` with one tool) puts the tool's name line after ``<|assistant|>``:
    the model writes only the arguments, and the server reads the call with that line in front. After the tool's
    result the trained model answers in text; forced, its reply starts as the call."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    app = create_app(trained, model_name="tiny")
    back = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT]
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for choice_ in (named, "required"):
            first = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, temperature=0,
                                                   max_tokens=48, tool_choice=choice_)  # fmt: skip
            [choice] = first.choices
            assert choice.finish_reason == "tool_calls", choice
            [call] = choice.message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        plain = client.chat.completions.create(model="tiny", messages=back, tools=TOOLS, temperature=0, max_tokens=24)
        assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls
        forced = client.chat.completions.create(model="tiny", messages=back, tools=TOOLS, temperature=0,
                                                max_tokens=48, tool_choice=named)  # fmt: skip
        # the tiny model never saw a call after a result: its arguments need not parse, but the reply is the call's
        message = forced.choices[0].message
        if message.tool_calls:
            assert message.tool_calls[0].function.name == "get_weather"
        else:
            assert message.content.split("\n")[0] == "get_weather" and message.content != ANSWER
