"""`glmtune demo`: the whole pipeline on a tiny built-in model, on the CPU, in about a minute.

1. build a tiny ChatGLM3-architecture model and tokenizer, saved as an original model folder;
2. write a small ADGEN-style dataset (product tags -> advertising copy), train and dev files;
3. "pre-train" the random model: full fine-tuning on a text-continuation set, so the base knows the language
   (LoRA on a frozen *random* model learns next to nothing, as on any base that knows nothing);
4. fine-tune that base with LoRA on the ADGEN task, through the same code `glmtune train` runs;
5. evaluate base and fine-tuned model on the dev set (ROUGE/BLEU, as `glmtune eval`);
6. chat with the fine-tuned run, and merge the adapter into a full model folder.

Every step calls the same functions as the corresponding command, so the demo is also a smoke test of the tool.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from glmtune.demo_data import corpus_lines, make_continuation_dataset, make_dataset
from glmtune.tiny import make_tiny_model_dir

TRAIN_SIZE, DEV_SIZE, PRETRAIN_SIZE = 240, 16, 400
_COMMON = ["overwrite=true", "train.device=cpu", "train.batch_size=16", "train.warmup_steps=10", "log.every_steps=10"]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def run_demo(out: str | Path, *, seed: int = 0, steps: int = 120, pretrain_steps: int = 150) -> dict:
    """Run the demo into ``out``; returns a summary (losses, metrics, paths) for tests."""
    from glmtune.adapters.merge import merge_lora_to_checkpoint
    from glmtune.chat import ChatSession
    from glmtune.data.encode import eval_examples
    from glmtune.data.readers import read_samples
    from glmtune.evaluate.hook import make_generation_eval_hook
    from glmtune.generate import GenerationConfig
    from glmtune.pretrained import load_pretrained
    from glmtune.runs import load_for_inference
    from glmtune.templates import EncodeOptions
    from glmtune.train.config import load_config
    from glmtune.train.loop import train

    out = Path(out)
    say = print
    t0 = time.perf_counter()
    random_dir = out / "random-model"
    say(f"[1/6] building a tiny ChatGLM3 model (random weights) and tokenizer in {random_dir}")
    make_tiny_model_dir(random_dir, corpus_lines(seed=seed), generation="chatglm3", seed=seed)
    say(f"      files: {', '.join(sorted(p.name for p in random_dir.iterdir()))}")

    say("[2/6] writing an ADGEN-style dataset (product tags -> advertising copy)")
    records = make_dataset(TRAIN_SIZE + DEV_SIZE, seed=seed + 1)
    train_file, dev_file = out / "data" / "train.json", out / "data" / "dev.json"
    pretrain_file = out / "data" / "continuation.json"
    _write_jsonl(train_file, records[:TRAIN_SIZE])
    _write_jsonl(dev_file, records[TRAIN_SIZE:])
    _write_jsonl(pretrain_file, make_continuation_dataset(PRETRAIN_SIZE, seed=seed + 2))
    say(f"      {train_file} ({TRAIN_SIZE} records), {dev_file} ({DEV_SIZE}); e.g. {records[0]['content']}")

    say(f"[3/6] pre-training the base: full fine-tuning on {pretrain_file.name} ({PRETRAIN_SIZE} records)")
    pre = train(load_config(None, [
        f"model={random_dir}", f"output_dir={out / 'run-pretrain'}", f"data.train={pretrain_file}", f"seed={seed}",
        "method.name=full", f"train.max_steps={pretrain_steps}", "train.learning_rate=3e-3", *_COMMON,
    ]))  # fmt: skip
    model_dir = pre.model_dir
    say(f"      loss {pre.losses[0][1]:.3f} -> {pre.losses[-1][1]:.3f}; base model folder: {model_dir}")

    run_dir = out / "run-lora"
    say(f"[4/6] LoRA fine-tuning on the ADGEN task for {steps} steps into {run_dir}")
    result = train(load_config(None, [
        f"model={model_dir}", f"output_dir={run_dir}", f"seed={seed}", f"data.train={train_file}",
        f"data.dev={dev_file}", "method.name=lora", "method.rank=16", "method.alpha=32", "method.dropout=0.0",
        "method.target_modules=all", f"train.max_steps={steps}", "train.learning_rate=1e-2",
        f"eval.every_steps={max(1, steps // 2)}", f"save.every_steps={max(1, steps // 2)}", *_COMMON,
    ]))  # fmt: skip
    first, last = result.losses[0][1], result.losses[-1][1]
    say(f"      loss {first:.3f} -> {last:.3f} over {result.steps} steps; adapter in {result.model_dir}")

    say("[5/6] dev-set generation metrics, base model vs fine-tuned (greedy, ROUGE on jieba words, BLEU-4)")
    gen = GenerationConfig(max_new_tokens=64, do_sample=False)
    base = load_pretrained(model_dir, dtype="float32", device="cpu")
    samples, _ = read_samples(dev_file)
    examples = eval_examples(base.tokenizer, base.template, samples, EncodeOptions())
    metrics = {}
    tuned = load_for_inference(run_dir, dtype="float32", device="cpu")
    for name, p in (("base", base), ("fine-tuned", tuned)):
        hook = make_generation_eval_hook(p.tokenizer, p.template, examples, gen, max_examples=DEV_SIZE)
        metrics[name] = hook(p.model)
        m = metrics[name]
        say(f"      {name:10s} rouge-1 {m['rouge-1']:6.2f}  rouge-2 {m['rouge-2']:6.2f}  rouge-l {m['rouge-l']:6.2f}  "
            f"bleu-4 {m['bleu-4']:6.2f}")  # fmt: skip

    say("[6/6] chatting with the fine-tuned run, then merging LoRA into a full model folder")
    query = records[-1]["content"]
    sys.stdout.write(f"      User: {query}\n      Assistant: ")
    session = ChatSession(tuned, gen)
    reply = ""
    for piece in session.reply_stream(query):
        reply += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    merged_dir = out / "merged"
    merge_lora_to_checkpoint(model_dir, result.model_dir, merged_dir)
    say(f"      merged model: {merged_dir}")

    say(f"\ndone in {time.perf_counter() - t0:.1f}s. Next:")
    say(f"  .venv/bin/glmtune chat {run_dir}")
    say(f"  .venv/bin/glmtune eval {run_dir} --data {dev_file} --greedy")
    say(f"  .venv/bin/glmtune chat {merged_dir}")
    return {
        "model_dir": model_dir, "run_dir": run_dir, "merged_dir": merged_dir, "first_loss": first,
        "last_loss": last, "metrics": metrics, "reply": reply,
    }  # fmt: skip
