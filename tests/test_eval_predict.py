"""Batched evaluation generation, the resumable predictions file, the training hook and `glmtune eval` end to end,
on a tiny ChatGLM3 model folder built on the spot."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

from glmtune.data.encode import eval_examples  # noqa: E402
from glmtune.data.readers import ReadOptions, read_samples  # noqa: E402
from glmtune.evaluate import command  # noqa: E402
from glmtune.evaluate.hook import make_generation_eval_hook  # noqa: E402
from glmtune.evaluate.metrics import compute_metrics  # noqa: E402
from glmtune.evaluate.predict import (  # noqa: E402
    generate_predictions,
    length_order,
    predict_to_file,
    read_predictions,
)
from glmtune.generate import GenerationConfig  # noqa: E402
from glmtune.pretrained import load_pretrained  # noqa: E402
from glmtune.tiny import make_tiny_model_dir  # noqa: E402

RECORDS = [
    {"content": "类型#裙*颜色#蓝色*风格#清新", "summary": "这款连衣裙选用蓝色面料，清新优雅。"},
    {"content": "类型#上衣*版型#宽松*材质#棉", "summary": "宽松的棉质上衣，舒适透气。"},
    {"content": "类型#裤*风格#简约", "summary": "简约的裤子，百搭。"},
    {"content": "类型#裙*图案#碎花*风格#复古*长度#长裙*领型#圆领", "summary": "复古碎花长裙，圆领设计修饰脸型。"},
    {"content": "类型#上衣*颜色#白色", "summary": "白色上衣干净利落。"},
    {"content": "hello world 类型#外套", "summary": "a warm coat for the winter"},
    {"content": "类型#裙*裙长#短裙*风格#甜美*图案#蝴蝶结*颜色#粉色*材质#雪纺", "summary": "粉色雪纺短裙，甜美可爱。"},
]


def _write_data(path) -> None:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lines = [r["content"] + " " + r["summary"] for r in RECORDS] * 20
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-chatglm3", lines, generation="chatglm3", seed=0)


@pytest.fixture(scope="module")
def pretrained(model_dir):
    return load_pretrained(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def examples(pretrained, tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "dev.json"
    _write_data(path)
    samples, _ = read_samples(path, ReadOptions())
    return eval_examples(pretrained.tokenizer, pretrained.template, samples)


GREEDY = GenerationConfig(max_new_tokens=6)
SAMPLED = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.95, top_p=0.7, seed=3)


def _run(pretrained, examples, gen, **kw):
    return generate_predictions(pretrained.model, pretrained.tokenizer, pretrained.template, examples, gen, **kw)


def test_length_order_longest_first(examples):
    order = length_order(examples)
    lengths = [len(examples[i].prompt_ids) for i in order]
    assert lengths == sorted(lengths, reverse=True)
    assert len(set(lengths)) > 2  # the batches really mix lengths (left padding is exercised)


@pytest.mark.parametrize("gen", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_equals_one_by_one(pretrained, examples, gen):
    batched = _run(pretrained, examples, gen, batch_size=4)
    alone = _run(pretrained, examples, gen, batch_size=1)
    assert [p.index for p in batched] == list(range(len(examples)))
    assert [p.prediction for p in batched] == [p.prediction for p in alone]
    assert [p.label for p in batched] == [e.reference for e in examples]
    assert any(p.prediction for p in batched)


def test_predictions_follow_the_generated_tokens(pretrained, examples):
    """One example by hand: greedy argmax of full forwards, decoded as the prediction text."""
    ex = examples[0]
    model, tok = pretrained.model, pretrained.tokenizer
    stop = set(pretrained.template.stop_ids(tok))
    seq = list(ex.prompt_ids)
    new = []
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            ids = torch.tensor([seq])
            logits = model(ids, position_ids=model.prompt_position_ids(ids, torch.ones_like(ids)))
            t = int(logits[0, -1].argmax())
            if t in stop:
                break
            new.append(t)
            seq.append(t)
    expected = pretrained.template.postprocess(tok.decode(new), original=False)
    assert _run(pretrained, [ex], GREEDY)[0].prediction == expected


class Crash(Exception):
    pass


def test_interrupted_run_resumes_without_duplicates(pretrained, examples, tmp_path):
    full = _run(pretrained, examples, SAMPLED, batch_size=3)
    out = tmp_path / "generated_predictions.jsonl"
    args = (pretrained.model, pretrained.tokenizer, pretrained.template, examples, SAMPLED, out)

    def crash_after_first(batch):
        raise Crash

    with pytest.raises(Crash):
        predict_to_file(*args, batch_size=3, on_batch=crash_after_first)
    first = out.read_text(encoding="utf-8").splitlines()
    assert len(first) == 3  # the first batch reached the disk before the crash
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"index": 6, "prompt": "cut sh')  # a write cut short by the crash

    generated, resumed_from = [], []
    result = predict_to_file(*args, batch_size=2, on_batch=generated.extend, on_resume=resumed_from.append)
    assert resumed_from == [3]
    assert sorted(p.index for p in generated) == sorted(set(range(len(examples))) - {json.loads(x)["index"]
                                                                                      for x in first})  # fmt: skip
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [x["index"] for x in lines] == list(range(len(examples)))  # each once, in index order
    assert [x["prediction"] for x in lines] == [p.prediction for p in full] == [p.prediction for p in result]
    assert set(lines[0]) == {"index", "prompt", "label", "prediction", "origin"}
    assert lines[0]["label"] == examples[0].reference and "<|user|>" in lines[0]["prompt"]

    # a complete run does nothing more
    again = []
    predict_to_file(*args, batch_size=2, on_batch=again.extend)
    assert again == []


def test_predictions_file_from_other_data_is_refused(pretrained, examples, tmp_path):
    out = tmp_path / "p.jsonl"
    args = (pretrained.model, pretrained.tokenizer, pretrained.template)
    predict_to_file(*args, examples[:2], GREEDY, out)
    other = [type(e)(e.prompt_ids, e.reference + "!", e.origin) for e in examples[:2]]
    with pytest.raises(ValueError, match="label of example 0 differs"):
        predict_to_file(*args, other, GREEDY, out)
    with pytest.raises(ValueError, match="larger --limit"):
        predict_to_file(*args, examples[:1], GREEDY, out)
    out.write_text('{"index": 0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: not a prediction line"):
        read_predictions(out)


def test_hook_scores_a_fixed_subset_and_restores_training_mode(pretrained, examples):
    hook = make_generation_eval_hook(pretrained.tokenizer, pretrained.template, examples, GREEDY, max_examples=4,
                                     batch_size=3, bleu=("char", "word"))  # fmt: skip
    model = pretrained.model
    model.train()
    try:
        scores = hook(model)
        assert model.training
    finally:
        model.eval()
    preds = _run(pretrained, examples[:4], GREEDY)
    expected = compute_metrics([p.prediction for p in preds], [e.reference for e in examples[:4]], ("char", "word"))
    assert scores == expected.flat()
    assert set(scores) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "bleu-4-word", "empty_predictions", "count"}
    assert scores["count"] == 4.0
    assert hook(model) == scores  # deterministic: same model, same numbers


def _eval(argv):
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_eval_command_end_to_end(model_dir, tmp_path, capsys):
    data = tmp_path / "dev.json"
    _write_data(data)
    out = tmp_path / "eval"
    base = [str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "5",
            "--device", "cpu", "--dtype", "fp32", "--no-progress", "--bleu", "char,word"]  # fmt: skip
    assert _eval(base) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    lines = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(RECORDS) == metrics["count"]
    assert [x["label"] for x in lines] == [r["summary"] for r in RECORDS]
    expected = compute_metrics([x["prediction"] for x in lines], [x["label"] for x in lines], ("char", "word"))
    assert metrics["scores"] == pytest.approx(expected.scores)
    assert metrics["empty_predictions"] == expected.empty_predictions
    assert set(metrics["definitions"]) == {"rouge", "bleu-4", "bleu-4-word"}
    assert metrics["generation_config"]["do_sample"] is True and metrics["generation_config"]["top_p"] == 0.7
    assert metrics["generation_config"]["seed"] == 0 and metrics["template"] == "chatglm3"
    assert "rouge-1" in printed and "bleu-4-word" in printed

    # rerun: nothing left to generate, same numbers
    assert _eval(base) == 0
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["scores"] == metrics["scores"]
    # other generation settings in the same folder: refused, unless --overwrite
    with pytest.raises(ValueError, match="other settings.*gen"):
        _eval([*base, "--greedy"])
    assert _eval([*base, "--greedy", "--overwrite", "--limit", "2"]) == 0
    assert len((out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_eval_command_rejects_unknown_bleu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _eval(["model", "--data", "dev.json", "--bleu", "char,sacre"])
    assert "unknown BLEU definition 'sacre'" in capsys.readouterr().err
