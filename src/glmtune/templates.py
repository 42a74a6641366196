"""Chat templates of every generation, defined once: messages -> prompt ids, (ids, labels), stop ids, clean-up.

Training and inference both render through these classes, so the two can never disagree. Each template
reproduces the token layout of the original THUDM code by default:

- ``chatglm`` (ChatGLM-6B): ``X [gMASK] <sop> Y <eop>``; with history ``"[Round i]\\n问：…\\n答：…\\n"`` from 0
  (``chat()``: no wrapper without history). Training as ``ptuning/main.py``: prompt cut to max_source_length - 1,
  answer to max_target_length - 2, labels from ``<sop>`` on.
- ``chatglm2``: ``[gMASK] sop`` + ``"[Round i]\\n\\n问：…\\n\\n答："`` from 1 (``build_prompt``); training as its
  ``ptuning/main.py``: ``[gMASK] sop`` + prompt cut to max_source_length (the two specials count), answer cut to
  max_target_length, then eos; labels on answer + eos.
- ``chatglm3``: ``[gMASK] sop`` then per message ``<|role|>`` + ``encode(metadata + "\\n")`` + ``encode(content)``
  (``build_single_message``); training as ``finetune_demo/finetune_hf.py``: eos appended, a token is trained when
  the token *before* it belongs to a trained message (so the end-of-turn target is the next role token or eos),
  then everything cut to max_input_length + max_output_length + 1.
- ``glm4``: ``[gMASK] <sop>`` then per message with non-empty content ``<|role|>`` + ``encode(metadata + "\\n" +
  content)``; tools render as a system block first (``tokenizer_config.json`` chat template); training as
  ``finetune_demo/finetune.py`` (same shifted mask as v3; observation turns are not trained there).

Default lengths (``official_lengths``: max_source_length/max_input_length, max_target_length/max_output_length)
are the official scripts' defaults: v1/v2 1024/128 (``ptuning/arguments.py``), v3 256/512 and GLM-4 512/512
(``finetune_demo/configs/lora.yaml``).

Labels follow the Hugging Face convention: aligned with ``input_ids`` (not shifted), ``IGNORE_INDEX`` where no
loss is taken; the loss compares logits at position ``i`` with ``labels[i + 1]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from glmtune.tokenizers.base import Tokenizer

IGNORE_INDEX = -100  # label value of a token that takes no loss (the one place this number is written)

ROLES = ("system", "user", "assistant", "observation", "tool")
Truncation = Literal["official", "keep_question"]


@dataclass
class Message:
    """One turn. ``tool`` is an OpenAI-style tool result and renders as ``observation``.

    ``metadata`` is ChatGLM3/GLM-4's text after the role token (a tool name on a tool call); ``tools`` the tool
    definitions a system message carries; ``train`` overrides whether an assistant/observation turn is trained.
    """

    role: str
    content: str
    metadata: str = ""
    tools: list | None = None
    train: bool | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")


@dataclass(frozen=True)
class EncodeOptions:
    """How a conversation becomes (ids, labels). The defaults reproduce each generation's official script.

    ``max_source_length``/``max_target_length`` are v1/v2's ``max_source_length``/``max_target_length`` and
    v3/GLM-4's ``max_input_length``/``max_output_length``; None means no limit.
    """

    max_source_length: int | None = None
    max_target_length: int | None = None
    ignore_pad_token_for_loss: bool = True  # v1/v2: labels equal to the pad id take no loss (as the original)
    train_on_prompt: bool = False  # also train system/user turns (never the [gMASK] sop prefix)
    mask_history: bool = False  # v3/GLM-4: train only the last assistant turn
    truncation: Truncation = "official"  # "keep_question": cut the oldest prompt tokens instead of the question
    history_rounds: bool = False  # v1: "[Round 0]" wrapper even without history (ptuning with history_column)

    def __post_init__(self) -> None:
        if self.truncation not in ("official", "keep_question"):
            raise ValueError(f"truncation must be 'official' or 'keep_question', got {self.truncation!r}")
        for name in ("max_source_length", "max_target_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")


@dataclass
class Encoded:
    """One training example: ids, labels (IGNORE_INDEX where untrained) and v1's prefix length (index of <sop>)."""

    input_ids: list[int]
    labels: list[int]
    prefix_length: int = 0  # tokens before <sop> that every token may attend to (v1 prefix-LM); 0 = causal only
    truncated: bool = field(default=False, compare=False)  # some of the conversation was cut by the length limits

    def __len__(self) -> int:
        return len(self.input_ids)


def _plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """The original SPTokenizer.encode where the tokenizer exposes it (v3's build_single_message uses it)."""
    enc = getattr(tokenizer, "encode_ordinary", None)
    return enc(text) if enc is not None else tokenizer.encode(text)


def _split_single_turn(messages: list[Message]) -> tuple[str, list[tuple[str, str]], str, str]:
    """v1/v2 layout: (prefix from system messages, history pairs, query, answer). The last message must answer."""
    prefix = "".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "assistant":
        raise ValueError("the last message must be an assistant reply")
    if len(turns) % 2:
        raise ValueError("v1/v2 conversations must alternate user/assistant turns starting with a user turn")
    pairs = []
    for i in range(0, len(turns), 2):
        q, a = turns[i], turns[i + 1]
        if q.role != "user" or a.role != "assistant":
            raise ValueError(
                f"v1/v2 conversations must alternate user/assistant turns; got {q.role!r} then {a.role!r}"
                " (tool turns need chatglm3 or glm4)"
            )
        pairs.append((q.content, a.content))
    *history, (query, answer) = pairs
    return prefix, history, query, answer


def _split_prompt(messages: list[Message]) -> tuple[str, list[tuple[str, str]], str]:
    """v1/v2 prompt: (prefix, history pairs, query) from messages that end with a user turn."""
    if not messages or messages[-1].role != "user":
        raise ValueError("a prompt must end with a user message")
    prefix, history, query, _ = _split_single_turn([*messages, Message("assistant", "")])
    return prefix, history, query


class Template:
    """Base of the per-generation templates; see the module docstring for the layouts."""

    name: str = ""
    system_role: bool = False  # a system turn of its own (v3/GLM-4); v1/v2 only put system text before the prompt
    pad_side: str = "left"  # the original tokenizers pad on the left (training collators included)
    official_lengths: tuple[int, int] = (1024, 128)  # default (max_source_length, max_target_length)

    def encode_prompt(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        raise NotImplementedError

    def encode_example(
        self, tokenizer: Tokenizer, messages: list[Message], options: EncodeOptions | None = None
    ) -> Encoded:
        raise NotImplementedError

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        return [tokenizer.eos_id]

    def postprocess(self, text: str, original: bool = True) -> str:
        return text.strip()

    def render_text(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as readable text (for inspection); specials shown by name."""
        raise NotImplementedError

    # generation-based evaluation: one example per assistant turn (v3/GLM-4's process_batch_eval) or one per record
    # (its last reply, the v1/v2 ptuning scripts)
    eval_every_turn: bool = False

    def eval_prompt(self, tokenizer: Tokenizer, history: list[Message], limit: int | None) -> list[int]:
        """The prompt that asks for the reply after ``history``, cut to ``limit`` tokens as the original scripts cut
        it (``max_source_length``)."""
        ids = self.encode_prompt(tokenizer, history)
        return ids[:limit] if limit is not None else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---- ChatGLM-6B (v1) ---------------------------------------------------------------------------------------
class ChatGLMTemplate(Template):
    name = "chatglm"
    official_lengths = (1024, 128)  # ptuning/arguments.py: max_source_length, max_target_length

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]], rounds: bool = False) -> str:
        """The original chat(): the bare query without history, else "[Round i]" blocks from 0."""
        if not history and not rounds:
            return query
        text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return text + f"[Round {len(history)}]\n问：{query}\n答："

    def encode_prompt(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        prefix, history, query = _split_prompt(messages)
        ids = tokenizer.encode(prefix + self.build_prompt(query, history))
        return ids + [tokenizer.special_id("[gMASK]"), tokenizer.special_id("<sop>")]

    def render_text(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        prefix, history, query = _split_prompt(messages)
        return prefix + self.build_prompt(query, history) + "[gMASK]<sop>"

    def eval_prompt(self, tokenizer: Tokenizer, history: list[Message], limit: int | None) -> list[int]:
        ids = self.encode_prompt(tokenizer, history)
        if limit is not None and len(ids) > limit:
            ids = ids[: max(limit - 2, 0)] + ids[-2:]  # text cut, [gMASK] <sop> kept at the end
        return ids

    def encode_example(
        self, tokenizer: Tokenizer, messages: list[Message], options: EncodeOptions | None = None
    ) -> Encoded:
        o = options or EncodeOptions()
        prefix, history, query, answer = _split_single_turn(messages)
        a = tokenizer.encode(prefix + self.build_prompt(query, history, rounds=o.history_rounds))
        b = tokenizer.encode(answer)
        truncated = False
        if o.max_source_length is not None and len(a) > o.max_source_length - 1:
            keep = max(o.max_source_length - 1, 0)
            a = a[len(a) - keep :] if o.truncation == "keep_question" else a[:keep]
            truncated = True
        if o.max_target_length is not None and len(b) > o.max_target_length - 2:
            b = b[: max(o.max_target_length - 2, 0)]
            truncated = True
        sop = tokenizer.special_id("<sop>")
        ids = a + [tokenizer.special_id("[gMASK]"), sop] + b + [tokenizer.special_id("<eop>")]
        context = len(a) + 1  # index of <sop>: the original's input_ids.index(bos_token_id)
        labels = [IGNORE_INDEX] * context + ids[context:]
        if o.train_on_prompt:
            labels = ids[:context] + labels[context:]
        if o.ignore_pad_token_for_loss:
            labels = [IGNORE_INDEX if t == tokenizer.pad_id else t for t in labels]
        return Encoded(ids, labels, prefix_length=context, truncated=truncated)

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        return [tokenizer.special_id("<eop>")]

    _PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))

    def postprocess(self, text: str, original: bool = True) -> str:
        """The original process_response: strip, the training-date placeholder, ASCII punctuation next to CJK."""
        text = text.strip()
        if not original:
            return text
        text = text.replace("[[训练时间]]", "2023年")
        for ascii_p, full in self._PUNCT:
            text = re.sub(rf"([\u4e00-\u9fff]){ascii_p}", rf"\1{full}", text)
            text = re.sub(rf"{ascii_p}([\u4e00-\u9fff])", rf"{full}\1", text)
        return text


# ---- ChatGLM2-6B (v2) --------------------------------------------------------------------------------------
class ChatGLM2Template(Template):
    name = "chatglm2"
    official_lengths = (1024, 128)  # ptuning/arguments.py: max_source_length, max_target_length

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]]) -> str:
        """The original tokenizer.build_prompt: "[Round i]" from 1, always."""
        text = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history))
        return text + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def encode_prompt(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        prefix, history, query = _split_prompt(messages)
        return tokenizer.prefix_ids() + tokenizer.encode(prefix + self.build_prompt(query, history))

    def render_text(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        prefix, history, query = _split_prompt(messages)
        return "[gMASK]sop" + prefix + self.build_prompt(query, history)

    def encode_example(
        self, tokenizer: Tokenizer, messages: list[Message], options: EncodeOptions | None = None
    ) -> Encoded:
        o = options or EncodeOptions()
        prefix, history, query, answer = _split_single_turn(messages)
        head = tokenizer.prefix_ids()
        text = tokenizer.encode(prefix + self.build_prompt(query, history))
        truncated = False
        if o.max_source_length is not None and len(head) + len(text) > o.max_source_length:
            keep = max(o.max_source_length - len(head), 0)  # the specials count towards max_source_length
            text = text[len(text) - keep :] if o.truncation == "keep_question" else text[:keep]
            truncated = True
        b = tokenizer.encode(answer)
        if o.max_target_length is not None and len(b) > o.max_target_length:
            b = b[: o.max_target_length]
            truncated = True
        a = head + text
        ids = a + b + [tokenizer.eos_id]
        prompt_labels = [IGNORE_INDEX] * len(head) + text if o.train_on_prompt else [IGNORE_INDEX] * len(a)
        labels = prompt_labels + b + [tokenizer.eos_id]
        if o.ignore_pad_token_for_loss:
            labels = [IGNORE_INDEX if t == tokenizer.pad_id else t for t in labels]
        return Encoded(ids, labels, truncated=truncated)

    def postprocess(self, text: str, original: bool = True) -> str:
        text = text.strip()
        return text.replace("[[训练时间]]", "2023年") if original else text


# ---- ChatGLM3-6B and GLM-4 ---------------------------------------------------------------------------------
def _role_token(role: str) -> str:
    return "<|observation|>" if role == "tool" else f"<|{role}|>"


class _RoleTemplate(Template):
    """Shared by v3 and GLM-4: role tokens, the shifted loss mask of the official finetune scripts."""

    untrained_roles: tuple[str, ...] = ("system", "user")
    system_role = True
    eval_every_turn = True

    def eval_prompt(self, tokenizer: Tokenizer, history: list[Message], limit: int | None) -> list[int]:
        """The first ``limit`` tokens of the history, then ``<|assistant|>`` (finetune_hf.py's process_batch_eval)."""
        ids = self.encode_prompt(tokenizer, history, add_generation_prompt=False)
        if limit is not None:
            ids = ids[:limit]
        return ids + [tokenizer.special_id("<|assistant|>")]

    def _message_blocks(self, tokenizer: Tokenizer, m: Message) -> list[list[int]]:
        raise NotImplementedError

    def _message_texts(self, m: Message) -> list[str]:
        raise NotImplementedError

    def reply_start(self, tokenizer: Tokenizer, metadata: str) -> list[int]:
        """The ids that begin an assistant reply whose metadata line is ``metadata`` (a tool's name), to put after
        the prompt's ``<|assistant|>``: the reply then continues as that tool's call (a forced tool call)."""
        return tokenizer.encode(f"{metadata}\n")

    def encode_prompt(
        self, tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        ids = list(tokenizer.prefix_ids())
        for m in messages:
            for block in self._message_blocks(tokenizer, m):
                ids += block
        if add_generation_prompt:
            ids.append(tokenizer.special_id("<|assistant|>"))
        return ids

    def render_text(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        text = self.prefix_text + "".join(t for m in messages for t in self._message_texts(m))
        return text + ("<|assistant|>" if add_generation_prompt else "")

    prefix_text = "[gMASK]sop"

    def _trained(self, m: Message, is_last_assistant: bool, o: EncodeOptions) -> bool:
        if m.role in self.untrained_roles:
            return o.train_on_prompt and m.role in ("system", "user")
        if o.mask_history and m.role == "assistant" and not is_last_assistant:
            return False
        return m.train if m.train is not None else True

    def encode_example(
        self, tokenizer: Tokenizer, messages: list[Message], options: EncodeOptions | None = None
    ) -> Encoded:
        o = options or EncodeOptions()
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("a training conversation needs at least one assistant message")
        last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
        ids = list(tokenizer.prefix_ids())
        mask = [False] * len(ids)  # mask[i]: the token *after* position i is a target ("loss on prediction")
        for i, m in enumerate(messages):
            trained = self._trained(m, i == last_assistant, o)
            for block in self._message_blocks(tokenizer, m):
                ids += block
                mask += [trained] * len(block)
        ids.append(tokenizer.eos_id)
        shifted = [False, *mask]  # the official [False, *loss_masks]: the eos closes the last trained turn
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, shifted, strict=True)]
        truncated = False
        if o.max_source_length is not None and o.max_target_length is not None:
            max_length = o.max_source_length + o.max_target_length + 1
            if len(ids) > max_length:
                truncated = True
                if o.truncation == "keep_question":
                    n_head = len(tokenizer.prefix_ids())
                    cut = len(ids) - max_length
                    ids = ids[:n_head] + ids[n_head + cut :]
                    labels = [IGNORE_INDEX] * n_head + labels[n_head + cut :]
                else:
                    ids, labels = ids[:max_length], labels[:max_length]
        return Encoded(ids, labels, truncated=truncated)

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        return [tokenizer.eos_id, tokenizer.special_id("<|user|>"), tokenizer.special_id("<|observation|>")]

    def postprocess(self, text: str, original: bool = True) -> str:
        """Drop the metadata line after <|assistant|> (empty for a plain reply); a tool call keeps its name line."""
        text = text.split("<|assistant|>")[-1]
        if "\n" not in text:
            return text.strip()
        metadata, content = text.split("\n", 1)
        if metadata.strip():
            return f"{metadata.strip()}\n{content.strip()}"
        content = content.strip()
        return content.replace("[[训练时间]]", "2023年") if original else content


CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


def chatglm3_tool_call(arguments: dict[str, Any]) -> str:
    """ChatGLM3's assistant text for a tool call (the name goes in the metadata): a python block calling
    ``tool_call(k=v, …)`` with Python literals, as its tool demos and ``PROMPT.md`` write it."""
    args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"```python\ntool_call({args})\n```"


class ChatGLM3Template(_RoleTemplate):
    name = "chatglm3"
    official_lengths = (256, 512)  # finetune_demo/configs/lora.yaml: max_input_length, max_output_length
    # finetune_hf.py trains every role but system and user (observation turns included).
    untrained_roles = ("system", "user")

    @staticmethod
    def _content(m: Message) -> str:
        if m.role == "system" and m.tools:
            return m.content + "\n" + json.dumps(m.tools, indent=4, ensure_ascii=False)  # build_chat_input
        return m.content

    def _message_blocks(self, tokenizer: Tokenizer, m: Message) -> list[list[int]]:
        head = [tokenizer.special_id(_role_token(m.role))] + _plain(tokenizer, f"{m.metadata}\n")
        return [head + _plain(tokenizer, self._content(m))]

    def _message_texts(self, m: Message) -> list[str]:
        return [f"{_role_token(m.role)}{m.metadata}\n{self._content(m)}"]

    def reply_start(self, tokenizer: Tokenizer, metadata: str) -> list[int]:
        return _plain(tokenizer, f"{metadata}\n")  # as _message_blocks encodes a call turn's head


# The tools preamble of glm-4-9b-chat's current tokenizer_config.json chat template (its first release said
# "名为 GLM-4 的"); tool JSON as transformers' tojson renders it (indent 4, key order kept, non-ASCII kept).
GLM4_SYSTEM = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def glm4_tools_text(tools: list[dict[str, Any]]) -> str:
    """The system text GLM-4's chat template writes for a tools list (function tools; others by name)."""
    text = GLM4_SYSTEM + "\n\n# 可用工具"
    for tool in tools:
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if kind == "function":
            fn = tool["function"] if "function" in tool else tool
            text += f"\n\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}" + GLM4_TOOL_SUFFIX
        elif kind in ("python", "simple_browser", "cogview"):
            raise ValueError(f"GLM-4 built-in tool {kind!r} is not supported; define it as a function tool")
        else:
            raise ValueError(f"unknown tool type {kind!r} (expected 'function')")
    return text


class GLM4Template(_RoleTemplate):
    name = "glm4"
    official_lengths = (512, 512)  # finetune_demo/configs/lora.yaml: max_input_length, max_output_length
    untrained_roles = ("system", "user", "observation", "tool")  # finetune.py: observation takes no loss
    prefix_text = "[gMASK]<sop>"

    def _message_blocks(self, tokenizer: Tokenizer, m: Message) -> list[list[int]]:
        blocks = []
        if m.tools:
            blocks.append([tokenizer.special_id("<|system|>")] + tokenizer.encode("\n" + glm4_tools_text(m.tools)))
        if m.content:
            blocks.append([tokenizer.special_id(_role_token(m.role))] + tokenizer.encode(f"{m.metadata}\n{m.content}"))
        return blocks

    def _message_texts(self, m: Message) -> list[str]:
        texts = []
        if m.tools:
            texts.append("<|system|>\n" + glm4_tools_text(m.tools))
        if m.content:
            texts.append(f"{_role_token(m.role)}{m.metadata}\n{m.content}")
        return texts


TEMPLATES: dict[str, type[Template]] = {
    "chatglm": ChatGLMTemplate,
    "chatglm2": ChatGLM2Template,
    "chatglm3": ChatGLM3Template,
    "glm4": GLM4Template,
}
ALIASES = {"chatglm1": "chatglm", "chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3",
           "glm-4": "glm4", "glm-4-9b-chat": "glm4"}  # fmt: skip


def get_template(name: str) -> Template:
    """The template of a generation: "chatglm" (v1), "chatglm2", "chatglm3" or "glm4"."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[key]()
