"""The README and `--help` name only files and commands that exist; the README's Layout names every module."""

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


def _layout_items() -> list[str]:
    """The README's Layout section, one string per bullet (the closing paragraph is one more)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    items: list[str] = []
    for line in section.splitlines():
        if line.startswith("- ") or not items or not line.strip():
            items.append(line)
        else:
            items[-1] += " " + line
    return items


_PATH = re.compile(r"[\w./-]+(?:\.(?:py|md|sh)|/)")


def test_readme_layout_names_existing_paths_and_every_module():
    package = ROOT / "src" / "glmtune"
    named: set[str] = set()
    for item in _layout_items():
        tokens = [t for t in re.findall(r"`([^`]+)`", item) if _PATH.fullmatch(t) and not t.startswith(".")]
        folder = tokens[0] if tokens and tokens[0].endswith("/") and (package / tokens[0]).is_dir() else ""
        for token in tokens:
            where = [package / folder / token, package / token, ROOT / token]
            assert any(p.exists() for p in where), f"README Layout names {token!r}, which does not exist"
            named.add(token)
    top = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    top |= {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    assert not top - named, f"README Layout leaves out {sorted(top - named)}"


def test_slow_tests_named_in_conftest_exist():
    """The README's fast subset (`pytest -m "not slow"`) leaves out the tests conftest.SLOW_TESTS names: each one must
    still exist, or a renamed slow test would silently join the fast subset."""
    from conftest import SLOW_TESTS

    for entry in SLOW_TESTS:
        file, name = entry.split("::")
        source = (ROOT / "tests" / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"conftest.SLOW_TESTS names {entry}, which does not exist"


def test_cli_starts_without_importing_torch():
    """`glmtune --help` stays instant: command modules import torch only when a command runs."""
    import subprocess
    import sys

    code = "import sys, glmtune.cli; glmtune.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
