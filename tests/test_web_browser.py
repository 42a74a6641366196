"""glmtune web in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's chromedriver
(nothing is downloaded: both paths are given, so Selenium Manager never runs). The test starts the real command on
a tiny ChatGLM3 folder, sends a message, waits for the streamed reply and compares it with what the serve engine
answers for that prompt (greedy), sends a second one (its reply is the engine's for the whole conversation),
checks that neither the page nor the server asked anything of another host, clears the chat, and saves a screenshot as
``<pytest's tmp_path>/glmtune-web.png`` (kept under /tmp/pytest-of-$USER/).

Skips, saying how to install them, when Chromium or chromedriver is missing (scripts/install.sh installs both
with apt-get where it can). Every wait has a deadline: the whole test stays under a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from glmtune.demo_data import corpus_lines  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.serve.app import Engine, Outcome  # noqa: E402
from glmtune.serve.schemas import parse_chat_request  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402
from glmtune.web.page import CHAT_ID, CLEAR_ID, MESSAGE_ID, SYSTEM_ID  # noqa: E402

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

MAX_TOKENS = 16
PROMPTS = ["hello, who are you?", "write one line about the weather", "tell me a short story", "what is python?"]
MARKUP = re.compile(r"[*_`~\\[&$]|<[A-Za-z/!]")  # emphasis, code, escapes, links, entities, LaTeX, HTML tags
LINE_MARKUP = re.compile(r"\s*(#|>|[-+|]|\d+[.)])")  # headings, quotes, lists, tables at the start of a line
BOT = f"#{CHAT_ID} [data-testid='bot']"
SERVER_START_S, PAGE_LOAD_S, REPLY_S = 35, 12, 10  # deadlines; together under a minute


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Debian's Chromium and chromedriver are not installed (scripts/install.sh installs them where "
            "apt-get can be used): sudo apt-get install --no-install-recommends chromium chromium-driver"
        )
    return browser, driver


def verbatim_in_markdown(text: str) -> bool:
    """True when the chat component's Markdown shows ``text`` as it is (white space aside)."""
    return not MARKUP.search(text) and not any(LINE_MARKUP.match(line) for line in text.splitlines())


def shown(text: str) -> str:
    """Text as the page shows it: runs of white space are one space (HTML)."""
    return " ".join(text.split())


def engine_replies(folder: Path, conversations: list[list[dict]]) -> list[str]:
    """Each conversation's greedy reply from the engine glmtune serve runs (in this process)."""
    engine = Engine(load_pretrained(folder, dtype="float32", device="cpu"))

    async def reply(messages: list[dict]) -> str:
        body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
        job = engine.job(parse_chat_request(body))
        return "".join([item async for item in engine.run(job) if not isinstance(item, Outcome)])

    try:
        return [asyncio.run(reply(m)) for m in conversations]
    finally:
        engine.close()


def pick(prompts: list[str], replies: list[str]) -> tuple[str, str]:
    """The first (prompt, reply) whose reply the chat's Markdown shows verbatim (the tiny model's text is random)."""
    for prompt, reply in zip(prompts, replies, strict=True):
        if shown(reply) and verbatim_in_markdown(reply):
            return prompt, reply
    pytest.fail(f"every reply has Markdown markup: {replies}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutboundRecorder:
    """A proxy that answers nothing: the server runs with HTTP(S)_PROXY pointing here (127.0.0.1 excepted), so any
    HTTP call it makes to another host (Gradio's analytics, its version check, Hugging Face telemetry) shows up as
    a recorded request line (``CONNECT api.gradio.app:443``)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(256).split(b"\r\n")[0].decode("latin-1"))
                except OSError as e:
                    self.requests.append(f"a connection ({e})")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def outbound():
    recorder = OutboundRecorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def web_page(tmp_path_factory, outbound):
    """(URL, model folder) of a running ``glmtune web`` on a tiny ChatGLM3 folder, greedy, short replies. The
    environment asks for Gradio's analytics: the command must turn them off itself."""
    chromium_paths()
    folder = make_tiny_model_dir(tmp_path_factory.mktemp("web") / "tiny-chatglm3", corpus_lines(seed=0),
                                 generation="chatglm3", vocab_size=600)  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "True", "HTTP_PROXY": outbound.url, "HTTPS_PROXY": outbound.url,
           "http_proxy": outbound.url, "https_proxy": outbound.url, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}  # fmt: skip
    command = [sys.executable, "-m", "glmtune", "web", str(folder), "--port", str(port), "--device", "cpu",
               "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)]  # fmt: skip
    out = tmp_path_factory.mktemp("web-log") / "glmtune-web.log"
    with open(out, "wb") as logfile:
        proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"glmtune web exited with {proc.returncode}:\n{out.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"glmtune web did not answer within {SERVER_START_S} s:\n{out.read_text()}")
            time.sleep(0.3)
        log.info("glmtune web answered after %.1f s", SERVER_START_S - (deadline - time.monotonic()))
        yield url, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    path, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--disable-background-networking", "--disable-component-update"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_S)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def send_and_wait(driver, prompt: str, want: str, n: int) -> list[str]:
    """Type ``prompt``, wait until the ``n``-th reply shows ``want``; the reply's states on the way."""
    box = WebDriverWait(driver, PAGE_LOAD_S).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f"#{MESSAGE_ID} textarea"))  # unlocked after a reply
    )
    box.send_keys(prompt)
    box.send_keys(Keys.ENTER)
    seen: list[str] = []

    def done(d) -> bool:
        texts = [e.text for e in d.find_elements(By.CSS_SELECTOR, BOT)]
        if len(texts) == n and (not seen or seen[-1] != texts[-1]):
            seen.append(texts[-1])
        return len(texts) == n and shown(texts[-1]) == shown(want)

    try:
        WebDriverWait(driver, REPLY_S, poll_frequency=0.05).until(done)
    except Exception:
        pytest.fail(f"reply {n}: the page showed {seen!r}, the engine answers {want!r}")
    assert all(shown(want).startswith(shown(s)) for s in seen), seen  # every state on the way was a prefix
    return seen


def test_chat_in_the_browser(web_page, browser, outbound, tmp_path):
    url, folder = web_page
    alone = engine_replies(folder, [[{"role": "user", "content": p}] for p in PROMPTS])
    first, reply = pick(PROMPTS, alone)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply}]
    second, reply2 = pick(
        PROMPTS, engine_replies(folder, [[*history, {"role": "user", "content": p}] for p in PROMPTS])
    )
    assert shown(reply2) != shown(alone[PROMPTS.index(second)])  # so the second reply shows the history was sent

    browser.get(url)
    WebDriverWait(browser, PAGE_LOAD_S).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, f"#{SYSTEM_ID} textarea"))
    )  # ChatGLM3 has a system turn
    send_and_wait(browser, first, reply, 1)
    send_and_wait(browser, second, reply2, 2)  # the page sends the history with the new message
    users = browser.find_elements(By.CSS_SELECTOR, f"#{CHAT_ID} [data-testid='user']")
    assert [shown(u.text) for u in users] == [first, second]

    shot = tmp_path / "glmtune-web.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.info("screenshot of the chat page: %s", shot)

    outside = [u for u in requested_urls(browser) if not u.startswith((url, "data:", "blob:"))]
    assert outside == [], f"the page called out: {outside}"
    assert outbound.requests == [], f"the server called out: {outbound.requests}"

    browser.find_element(By.ID, CLEAR_ID).click()
    WebDriverWait(browser, 5).until(lambda d: not d.find_elements(By.CSS_SELECTOR, BOT))
