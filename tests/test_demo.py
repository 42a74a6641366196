"""`glmtune demo`: the whole pipeline on a tiny model, as a user runs it first; it must visibly learn."""

import json
import re

import pytest

from glmtune.cli import main
from glmtune.demo import run_demo
from glmtune.demo_data import SCORED, attribute_hits, attribute_score, make_dataset, parse_tags

PROMPT = "类型#裤*颜色#黑色*风格#文艺*材质#针织*图案#纯色"


def test_parse_tags():
    assert parse_tags(PROMPT) == {"类型": "裤", "颜色": "黑色", "风格": "文艺", "材质": "针织", "图案": "纯色"}
    assert parse_tags("颜色#红色*no tag*材质#棉") == {"颜色": "红色", "材质": "棉"}


def test_attribute_hits_counts_each_attribute_stated_correctly():
    right = "这款黑色裤，文艺的气息温柔又知性。针织面料弹性十足，纯色图案点缀其间，让你轻松穿出文艺范儿。"
    assert attribute_hits(PROMPT, right) == (4, 4)
    # the answer: a red cotton coat with stripes, in a 复古 style
    wrong = "这款红色外套，复古的设计带来满满的年代感。采用棉质面料，条纹图案点缀其间，让你轻松穿出通勤范儿。"
    assert attribute_hits(PROMPT, wrong) == (0, 4)
    assert attribute_hits(PROMPT, "黑色针织") == (2, 4)  # style and pattern not stated
    assert attribute_hits(PROMPT, "黑色还是红色，针织，文艺，纯色") == (3, 4)  # two colours: the colour is not right
    assert attribute_hits(PROMPT, "") == (0, 4)
    assert attribute_hits("类型#裤*颜色#黑色", "黑色") == (1, 1)  # only the attributes the prompt has are scored
    assert attribute_hits("类型#裤", "裤") == (0, 0)


def test_attribute_score_pools_attributes_over_prompts():
    pairs = [(PROMPT, "黑色 文艺 针织 纯色"), ("颜色#红色*材质#棉", "白色，棉"), ("类型#裙", "")]
    assert attribute_score(pairs) == pytest.approx(5 / 6)
    assert attribute_score([]) == 0.0


def test_generated_copy_states_every_attribute():
    for record in make_dataset(50, seed=3):
        assert attribute_hits(record["content"], record["summary"]) == (len(SCORED), len(SCORED))


def _check_learned(summary: dict) -> None:
    base, tuned = summary["attribute_score"]["base"], summary["attribute_score"]["fine-tuned"]
    assert tuned >= 0.8, summary["answers"]["fine-tuned"]
    assert tuned >= base + 0.3, (base, tuned)
    # the scores are the model's real greedy answers on the held-out prompts
    pairs = list(zip(summary["prompts"], summary["answers"]["fine-tuned"], strict=True))
    assert attribute_score(pairs) == tuned


def test_demo_trains_evaluates_chats_and_merges(tmp_path, capsys):
    """The default demo learns the task (slow: marked in conftest.SLOW_TESTS), and runs again in its folder."""
    out = tmp_path / "demo"
    summary = run_demo(out)
    text = capsys.readouterr().out
    for step in range(1, 7):
        assert f"[{step}/6]" in text
    assert "fine-tuned attributes" in text and "done in" in text
    _check_learned(summary)
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    m = summary["metrics"]
    assert m["fine-tuned"]["rouge-l"] > m["base"]["rouge-l"] + 20
    # dev prompts are held out: none of their tag sets is in the training file
    train_tags = {json.loads(line)["content"] for line in (out / "data" / "train.json").read_text().splitlines()}
    assert summary["prompts"] and not set(summary["prompts"]) & train_tags
    assert (summary["run_dir"] / "run.json").is_file() and (summary["run_dir"] / "metrics.jsonl").is_file()
    # the merged folder answers exactly like the run (LoRA folded into the weights)
    prompt = ["--prompt", PROMPT, "--greedy", "--max-new-tokens", "40", "--device", "cpu"]
    assert main(["chat", str(summary["run_dir"]), *prompt]) == 0
    from_run = capsys.readouterr().out
    assert main(["chat", str(summary["merged_dir"]), *prompt]) == 0
    assert capsys.readouterr().out == from_run
    # a second run in the same folder replaces the first (short, to keep the suite fast; the slow test runs it full)
    again = run_demo(out, steps=2, pretrain_steps=2)
    assert "done in" in capsys.readouterr().out
    assert again["merged_dir"] == summary["merged_dir"] and (again["merged_dir"] / "config.json").is_file()


def _scores(text: str) -> dict[str, float]:
    found = re.findall(r"^ +(base|fine-tuned) +attributes +([\d.]+)%", text, flags=re.M)
    assert len(found) == 2, text
    return {name: float(value) / 100 for name, value in found}


@pytest.mark.slow
def test_demo_command_twice_in_a_row(tmp_path, capsys):
    """`make demo` twice: the same command in the same folder, both runs learn, with the same (seeded) results."""
    outputs = []
    for _ in range(2):
        assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
        outputs.append(capsys.readouterr().out)
    scores = [_scores(text) for text in outputs]
    assert scores[0] == scores[1]
    assert scores[0]["fine-tuned"] >= 0.8 and scores[0]["fine-tuned"] >= scores[0]["base"] + 0.3
    answers = [[line for line in text.splitlines() if "Assistant:" in line] for text in outputs]
    assert answers[0] == answers[1] and answers[0]
