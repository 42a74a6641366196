"""The chat page: a Gradio ``Blocks`` app over :class:`glmtune.serve.app.Engine`, the engine ``glmtune serve`` runs.

The page keeps no conversation on the server: the history lives in the browser's chat component and every turn
sends it again, as the OpenAI API does. A turn is an OpenAI-shaped request body checked by the API's own
``parse_chat_request``, so the page and ``POST /v1/chat/completions`` render the same prompt and give the same
reply (greedy). When the conversation no longer fits the model's context the oldest turns are left out of the
prompt (the page says how many); a reply longer than the room left stops at the context's end.

Nothing calls out: analytics and Gradio's version check off, no share link, no server-side rendering process; the
page's fonts and scripts come from the page's own server (the browser test checks both sides).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmtune.serve.schemas import APIError, parse_chat_request

if TYPE_CHECKING:
    import gradio as gr

    from glmtune.serve.app import Engine

log = logging.getLogger(__name__)

# Element ids the browser test finds the page's parts by.
CHAT_ID, MESSAGE_ID, SEND_ID, STOP_ID, CLEAR_ID, SYSTEM_ID = "chat", "message", "send", "stop", "clear", "system"
MODEL_ID = "model"  # the adapter picker (shown when the engine serves adapters beside the model)


@dataclass(frozen=True)
class Sampling:
    """The page's sampling controls (and their starting values): temperature 0 is greedy."""

    temperature: float = 0.95
    top_p: float = 0.7
    max_tokens: int = 1024


def content_text(content: Any) -> str:
    """A chat component message's content as text: a string, or Gradio's list of ``{"type": "text", "text"}``
    parts (other parts, such as files, carry no text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def conversation(history: list[dict], system: str) -> list[dict]:
    """The chat component's history (ending with the user's new message) as OpenAI ``messages``."""
    head = [{"role": "system", "content": system}] if system.strip() else []
    turns = [{"role": m["role"], "content": content_text(m.get("content"))} for m in history
             if m.get("role") in ("user", "assistant")]  # fmt: skip
    return head + turns


class PageChat:
    """Replies for the page, streamed from the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _job(self, messages: list[dict], sampling: Sampling, model: str | None = None) -> tuple[Any, int]:
        """The engine's job for ``messages`` (``model``: one of the engine's names, None: the model itself) and how
        many of the oldest turns had to be left out to fit."""
        head = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(head) :]
        max_tokens: int | None = sampling.max_tokens
        dropped = 0
        while True:
            body = {"messages": head + turns[2 * dropped :], "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "max_tokens": max_tokens, "model": model}  # fmt: skip
            try:
                return self.engine.job(parse_chat_request(body)), dropped
            except APIError as e:
                if e.code != "context_length_exceeded":
                    raise
                if e.param == "max_tokens" and max_tokens is not None:
                    max_tokens = None  # the reply takes what room is left (less than asked)
                elif 2 * (dropped + 1) < len(turns):
                    dropped += 1  # one turn: a user message and its reply
                else:
                    raise

    async def reply(self, messages: list[dict], sampling: Sampling,
                    model: str | None = None) -> AsyncIterator[tuple[str, int]]:  # fmt: skip
        """(the reply so far, oldest turns left out) as it grows; APIError for a turn the model cannot take.
        ``model``: which of the engine's names answers (an adapter), None: the model itself."""
        job, dropped = self._job(messages, sampling, model)
        text = ""
        yield text, dropped
        async for item in self.engine.run(job):
            if isinstance(item, str):
                text += item
                yield text, dropped


def build_page(engine: Engine, *, title: str, system_prompt: bool, sampling: Sampling, max_total_tokens: int,
               system: str = "") -> gr.Blocks:  # fmt: skip
    """The page. ``system_prompt``: show a system prompt box (generations with a system turn of their own);
    ``max_total_tokens``: prompt + reply tokens a turn may have (the engine's limit)."""
    import gradio as gr

    chat = PageChat(engine)

    def add_message(message: str, history: list[dict]) -> tuple[Any, list[dict]]:
        """The message joins the history; the box is locked until the reply is done (a second message sent while
        one streams would race it for the history)."""
        if not message.strip():
            return gr.update(), history
        return gr.update(value="", interactive=False), [*history, {"role": "user", "content": message}]

    def unlock() -> Any:
        return gr.update(interactive=True)

    async def respond(history: list[dict], system_text: str, temperature: float, top_p: float, max_tokens: float,
                      model: str | None):  # fmt: skip
        if not history or history[-1].get("role") != "user":
            return
        settings = Sampling(float(temperature), float(top_p), int(max_tokens))
        messages = conversation(history, system_text if system_prompt else "")
        try:
            async for text, dropped in chat.reply(messages, settings, model or None):
                if dropped and not text:
                    gr.Info(f"The conversation is longer than the {max_total_tokens} tokens a turn may have: "
                            f"its {dropped} oldest turn(s) were left out of this reply's prompt.")  # fmt: skip
                yield [*history, {"role": "assistant", "content": text}]
        except APIError as e:
            log.info("turn refused: %s", e.message)
            yield history[:-1]  # the message the model cannot take leaves the history
            raise gr.Error(e.message) from None

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(elem_id=CHAT_ID, label="Chat", height=520, buttons=["copy"])
                with gr.Row():
                    message = gr.Textbox(elem_id=MESSAGE_ID, show_label=False, placeholder="Message (Enter sends)",
                                         lines=1, max_lines=8, scale=6, autofocus=True)  # fmt: skip
                    send = gr.Button("Send", elem_id=SEND_ID, variant="primary", scale=1)
                with gr.Row():
                    stop = gr.Button("Stop", elem_id=STOP_ID)
                    clear = gr.Button("Clear", elem_id=CLEAR_ID)
            with gr.Column(scale=1, min_width=240):
                names = list(engine.names)  # the model itself, then its adapters
                model = gr.Dropdown(names, value=names[0], label="Model (adapter)", elem_id=MODEL_ID,
                                    visible=len(names) > 1)  # fmt: skip
                system_box = gr.Textbox(value=system, label="System prompt", lines=4, elem_id=SYSTEM_ID,
                                        visible=system_prompt)  # fmt: skip
                temperature = gr.Slider(
                    0.0, 2.0, value=sampling.temperature, step=0.05, label="Temperature (0: greedy)"
                )
                top_p = gr.Slider(0.05, 1.0, value=sampling.top_p, step=0.05, label="Top p")
                limit = max_total_tokens - 1  # a prompt takes a token at least
                max_tokens = gr.Slider(1, limit, value=min(sampling.max_tokens, limit), step=1,
                                       label="Max new tokens")  # fmt: skip
        controls = [chatbot, system_box, temperature, top_p, max_tokens, model]
        events = []
        for trigger in (message.submit, send.click):
            added = trigger(add_message, [message, chatbot], [message, chatbot], queue=False)
            events.append(added.then(respond, controls, chatbot, concurrency_limit=None))
            events[-1].then(unlock, None, message, queue=False)  # after a reply or an error
        stop.click(unlock, None, message, cancels=events, queue=False)  # a stopped reply keeps what it said
        clear.click(lambda: (gr.update(value="", interactive=True), []), None, [message, chatbot], cancels=events,
                    queue=False)  # fmt: skip
    return page


def launch_page(page: gr.Blocks, *, host: str, port: int) -> None:
    """Serve ``page`` on ``host:port`` until Ctrl-C: no share link, no server-side rendering process."""
    page.queue(default_concurrency_limit=None)  # the engine queues and limits what runs at once
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, mcp_server=False,
                show_error=True, footer_links=[], quiet=True)  # fmt: skip
