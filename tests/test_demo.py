"""`glmtune demo`: the whole pipeline on a tiny model, as a user runs it first."""

from glmtune.cli import main
from glmtune.demo import run_demo


def test_demo_trains_evaluates_chats_and_merges(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo")
    out = capsys.readouterr().out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert summary["last_loss"] < 0.7 * summary["first_loss"]  # LoRA learned the task
    base, tuned = summary["metrics"]["base"], summary["metrics"]["fine-tuned"]
    assert tuned["rouge-l"] > base["rouge-l"] and tuned["bleu-4"] > base["bleu-4"]
    assert summary["reply"].strip()
    assert (summary["run_dir"] / "run.json").is_file() and (summary["run_dir"] / "metrics.jsonl").is_file()
    # the merged folder answers exactly like the run (LoRA folded into the weights)
    prompt = ["--prompt", "类型#裙*颜色#红色", "--greedy", "--max-new-tokens", "16", "--device", "cpu"]
    assert main(["chat", str(summary["run_dir"]), *prompt]) == 0
    from_run = capsys.readouterr().out
    assert main(["chat", str(summary["merged_dir"]), *prompt]) == 0
    assert capsys.readouterr().out == from_run


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "4", "--pretrain-steps", "4"]) == 0
    assert "done in" in capsys.readouterr().out
