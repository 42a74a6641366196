"""`glmtune demo`: the whole pipeline on a tiny built-in model, on the CPU, in about a minute.

1. build a tiny ChatGLM3-architecture model and tokenizer, saved as an original model folder;
2. write a small ADGEN-style dataset (product tags -> advertising copy), train and dev files;
3. "pre-train" the random model: full fine-tuning on a text-continuation set of product pages (advertising copy
   and a recap of the product's details), so the base knows the words and can refer back to what it read
   (LoRA on a frozen *random* model learns next to nothing, as on any base that knows nothing);
4. fine-tune that base with LoRA on the ADGEN task, through the same code `glmtune train` runs;
5. evaluate base and fine-tuned model on the held-out dev prompts with greedy decoding: ROUGE/BLEU (as
   `glmtune eval`) and the attribute score (how many of each prompt's colour, style, material and pattern the
   answer states correctly), with a few prompts shown side by side;
6. chat with the fine-tuned run, and merge the adapter into a full model folder.

Every step calls the same functions as the corresponding command, so the demo is also a smoke test of the tool.
Running it again in the same folder rebuilds everything there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.demo_data import attribute_hits, attribute_score, corpus_lines, make_continuation_dataset, make_dataset
from glmtune.tiny import make_tiny_model_dir


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and steps of the demo (measured: 100% of the dev attributes after 120 LoRA steps, seeds 0-2)."""

    train_size: int = 240
    dev_size: int = 16
    pretrain_size: int = 400
    pretrain_steps: int = 150
    steps: int = 120
    batch_size: int = 32  # packed rows, both phases
    pretrain_lr: float = 3e-3
    lr: float = 1e-2
    rank: int = 16
    vocab_size: int = 800
    # pieces of at most two characters, as most Chinese words are: with longer ones the tokenizer glues a tag value
    # to the words around it ("这款黑色裤" as one token), and the model would have to learn each combination
    # instead of copying the tag
    max_piece_length: int = 2
    # changes to the tiny-chatglm3 preset (2 layers, 64 wide): at 64 LoRA needs 2-3 times the steps to learn the
    # copying (seed-dependent), at 128 it is steady and costs little more on a CPU
    sizes: dict = field(default_factory=lambda: {"hidden_size": 128, "ffn_hidden_size": 256, "kv_channels": 32})
    show: int = 4  # dev prompts printed with both answers


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def run_demo(
    out: str | Path, *, seed: int = 0, steps: int | None = None, pretrain_steps: int | None = None,
    plan: DemoPlan | None = None,
) -> dict:  # fmt: skip
    """Run the demo into ``out``; returns a summary (losses, metrics, attribute scores, paths) for tests."""
    import torch

    # The tiny model's matrices are too small to split across threads: one thread is about as fast, and on a busy
    # machine several threads waiting on each other made the demo many times slower (measured on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out), seed, steps, pretrain_steps, plan or DemoPlan())
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, seed: int, steps: int | None, pretrain_steps: int | None, plan: DemoPlan) -> dict:
    from glmtune.chat import ChatSession
    from glmtune.data.encode import eval_examples
    from glmtune.data.readers import read_samples
    from glmtune.evaluate.metrics import compute_metrics
    from glmtune.evaluate.predict import generate_predictions
    from glmtune.generate import GenerationConfig
    from glmtune.merge import merge_lora_to_checkpoint
    from glmtune.pretrained import load_pretrained
    from glmtune.runs import load_for_inference
    from glmtune.templates import EncodeOptions
    from glmtune.train.config import load_config
    from glmtune.train.loop import train

    steps = plan.steps if steps is None else steps
    pretrain_steps = plan.pretrain_steps if pretrain_steps is None else pretrain_steps
    common = ["overwrite=true", "train.device=cpu", f"train.batch_size={plan.batch_size}", "train.warmup_steps=10",
              "log.every_steps=10", "train.precision=fp32"]  # fmt: skip
    say = print
    t0 = time.perf_counter()
    random_dir = out / "random-model"
    say(f"[1/6] building a tiny ChatGLM3 model (random weights) and tokenizer in {random_dir}")
    pretrain_records = make_continuation_dataset(plan.pretrain_size, seed=seed + 2)
    lines = corpus_lines(seed=seed) + [r["input"] + r["output"] for r in pretrain_records]
    make_tiny_model_dir(
        random_dir, lines, generation="chatglm3", vocab_size=plan.vocab_size, seed=seed,
        max_piece_length=plan.max_piece_length, sizes=plan.sizes,
    )  # fmt: skip
    say(f"      files: {', '.join(sorted(p.name for p in random_dir.iterdir()))}")

    say("[2/6] writing an ADGEN-style dataset (product tags -> advertising copy)")
    records = make_dataset(plan.train_size + plan.dev_size, seed=seed + 1)
    train_records = records[: plan.train_size]
    seen = {r["content"] for r in train_records}
    dev_records = [r for r in records[plan.train_size :] if r["content"] not in seen]  # held out: unseen tags only
    train_file, dev_file = out / "data" / "train.json", out / "data" / "dev.json"
    pretrain_file = out / "data" / "continuation.json"
    _write_jsonl(train_file, train_records)
    _write_jsonl(dev_file, dev_records)
    _write_jsonl(pretrain_file, pretrain_records)
    say(f"      {train_file} ({len(train_records)} records), {dev_file} ({len(dev_records)}); "
        f"e.g. {records[0]['content']} -> {records[0]['summary']}")  # fmt: skip

    say(f"[3/6] pre-training the base: full fine-tuning on {pretrain_file.name} ({plan.pretrain_size} records)")
    pre = train(load_config(None, [
        f"model={random_dir}", f"output_dir={out / 'run-pretrain'}", f"data.train={pretrain_file}", f"seed={seed}",
        "method.name=full", f"train.max_steps={pretrain_steps}", f"train.learning_rate={plan.pretrain_lr}", *common,
    ]))  # fmt: skip
    model_dir = pre.model_dir
    say(f"      loss {pre.losses[0][1]:.3f} -> {pre.losses[-1][1]:.3f}; base model folder: {model_dir}")

    run_dir = out / "run-lora"
    say(f"[4/6] LoRA fine-tuning on the ADGEN task for {steps} steps into {run_dir}")
    result = train(load_config(None, [
        f"model={model_dir}", f"output_dir={run_dir}", f"seed={seed}", f"data.train={train_file}",
        f"data.dev={dev_file}", "method.name=lora", f"method.rank={plan.rank}", f"method.alpha={2 * plan.rank}",
        "method.dropout=0.0", "method.target_modules=all", f"train.max_steps={steps}",
        f"train.learning_rate={plan.lr}", f"eval.every_steps={max(1, steps // 2)}",
        f"save.every_steps={max(1, steps // 2)}", *common,
    ]))  # fmt: skip
    first, last = result.losses[0][1], result.losses[-1][1]
    say(f"      loss {first:.3f} -> {last:.3f} over {result.steps} steps; adapter in {result.model_dir}")

    say("[5/6] held-out dev prompts, base model vs fine-tuned (greedy decoding)")
    gen = GenerationConfig(max_new_tokens=64, do_sample=False)
    base = load_pretrained(model_dir, dtype="float32", device="cpu")
    tuned = load_for_inference(run_dir, dtype="float32", device="cpu")
    samples, _ = read_samples(dev_file)
    prompts = [s.messages[0].content for s in samples]
    examples = eval_examples(base.tokenizer, base.template, samples, EncodeOptions())
    answers, metrics, scores = {}, {}, {}
    for name, p in (("base", base), ("fine-tuned", tuned)):
        preds = generate_predictions(p.model.eval(), p.tokenizer, p.template, examples, gen, batch_size=8)
        answers[name] = [pr.prediction for pr in preds]
        metrics[name] = compute_metrics(answers[name], [e.reference for e in examples]).flat()
        scores[name] = attribute_score(list(zip(prompts, answers[name], strict=True)))
    for i in range(min(plan.show, len(prompts))):
        say(f"      {prompts[i]}")
        for name in answers:
            correct, total = attribute_hits(prompts[i], answers[name][i])
            say(f"        {name:10s} {correct}/{total}  {answers[name][i]}")
    say("      attributes stated correctly (colour, style, material, pattern), ROUGE on jieba words, BLEU-4:")
    for name, m in metrics.items():
        say(f"      {name:10s} attributes {scores[name]:6.1%}  rouge-1 {m['rouge-1']:6.2f}  "
            f"rouge-l {m['rouge-l']:6.2f}  bleu-4 {m['bleu-4']:6.2f}")  # fmt: skip

    say("[6/6] chatting with the fine-tuned run, then merging LoRA into a full model folder")
    query = prompts[-1]
    sys.stdout.write(f"      User: {query}\n      Assistant: ")
    session = ChatSession(tuned, gen)
    reply = ""
    for piece in session.reply_stream(query):
        reply += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    merged_dir = out / "merged"
    merge_lora_to_checkpoint(model_dir, result.model_dir, merged_dir, overwrite=True)
    say(f"      merged model: {merged_dir}")

    say(f"\ndone in {time.perf_counter() - t0:.1f}s. Next:")
    say(f"  .venv/bin/glmtune chat {run_dir}")
    say(f"  .venv/bin/glmtune eval {run_dir} --data {dev_file} --greedy")
    say(f"  .venv/bin/glmtune chat {merged_dir}")
    return {
        "model_dir": model_dir, "run_dir": run_dir, "merged_dir": merged_dir, "first_loss": first,
        "last_loss": last, "metrics": metrics, "attribute_score": scores, "answers": answers, "prompts": prompts,
        "reply": reply,
    }  # fmt: skip
