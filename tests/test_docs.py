"""The README and `--help` name only files and commands that exist."""

import re
from pathlib import Path

from glmtune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _mentioned_examples(text: str) -> set[str]:
    return set(re.findall(r"examples/[\w./-]+\.(?:yaml|json|jsonl|csv)", text))


def test_readme_examples_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = _mentioned_examples(readme) | {f"examples/{n}" for n in re.findall(r"`(\w+-[\w-]+\.yaml)`", readme)}
    assert names
    for name in names:
        assert (ROOT / name).is_file(), name


def test_help_examples_exist_and_commands_are_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("chat", "train", "eval", "merge", "export", "data", "demo"):
        assert command in sub.choices, command
        for name in _mentioned_examples(sub.choices[command].format_help()):
            assert (ROOT / name).is_file(), f"glmtune {command} --help names {name}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in re.findall(r"glmtune (\w+)", readme):
        assert command in sub.choices, f"README uses `glmtune {command}`"


def test_cli_starts_without_importing_torch():
    """`glmtune --help` stays instant: command modules import torch only when a command runs."""
    import subprocess
    import sys

    code = "import sys, glmtune.cli; glmtune.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
