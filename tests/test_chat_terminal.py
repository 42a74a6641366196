"""`glmtune chat` on a real terminal (a pseudo-terminal): the prompt on stdout, line editing and history recall."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from glmtune.demo_data import corpus_lines
from glmtune.tiny import make_tiny_model_dir

pty = pytest.importorskip("pty")  # POSIX only
pytest.importorskip("readline")

UP = "\x1b[A"  # the terminal's up-arrow key


def _wait_for(fd: int, proc: subprocess.Popen, seen: bytearray, needle: bytes, count: int = 1) -> None:
    """Read the terminal into ``seen`` until ``needle`` has appeared ``count`` times (or the program ended)."""
    deadline = time.monotonic() + 120
    while seen.count(needle) < count and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the program closed the terminal
                return
        elif proc.poll() is not None:
            return


def test_terminal_chat_prompt_on_stdout_and_history_recall(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    main_fd, child_fd = pty.openpty()
    cmd = [sys.executable, "-m", "glmtune", "chat", str(model), "--device", "cpu", "--max-new-tokens", "2"]
    env = {**os.environ, "TERM": "dumb"}
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=subprocess.PIPE, env=env)
    os.close(child_fd)
    seen = bytearray()
    try:
        _wait_for(main_fd, proc, seen, b"User: ")
        os.write(main_fd, b"clear\r")
        _wait_for(main_fd, proc, seen, b"User: ", 2)
        os.write(main_fd, UP.encode() + b"\r")  # recalls "clear": the history is cleared a second time
        _wait_for(main_fd, proc, seen, b"User: ", 3)
        os.write(main_fd, b"exit\r")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
    assert seen.count(b"(history cleared)") == 2, bytes(seen)
    assert b"User:" not in err, err  # the prompt belongs on stdout, with the conversation
    assert proc.returncode == 0, err
