"""Options chat and eval share (sampling, device, dtype), the device check of train/chat/eval, --version."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from glmtune import __version__
from glmtune.cli import build_parser, main
from glmtune.cli_options import check_device, generation_config
from glmtune.demo_data import corpus_lines, make_dataset
from glmtune.tiny import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("opts") / "tiny-chatglm3", corpus_lines(seed=0),
                               generation="chatglm3", vocab_size=600)  # fmt: skip


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "dev.json"
    path.write_text(json.dumps(make_dataset(3, seed=1), ensure_ascii=False), encoding="utf-8")
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'^version = "{re.escape(__version__)}"$', pyproject, re.M)
    assert capsys.readouterr().out.strip() == f"glmtune {__version__}"


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_chat_and_eval_share_the_sampling_options(command):
    extra = ["--data", "dev.json"] if command == "eval" else []
    argv = [command, "m", *extra, "--top-k", "5", "--repetition-penalty", "1.3", "--top-p", "0.5",
            "--temperature", "0.7", "--max-new-tokens", "9", "--seed", "4", "--dtype", "bf16"]  # fmt: skip
    args = build_parser().parse_args(argv)
    gen = generation_config(args)
    assert (gen.top_k, gen.repetition_penalty, gen.top_p, gen.temperature) == (5, 1.3, 0.5, 0.7)
    assert (gen.max_new_tokens, gen.seed, gen.do_sample, args.dtype) == (9, 4, True, "bf16")
    assert not generation_config(build_parser().parse_args([*argv, "--greedy"])).do_sample


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_dtype_is_one_of_the_choices(command, capsys):
    extra = ["--data", "dev.json"] if command == "eval" else []
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "m", *extra, "--dtype", "bf61"])
    assert "invalid choice: 'bf61'" in capsys.readouterr().err


def test_temperature_zero_is_greedy(model_dir, capsys):
    args = build_parser().parse_args(["chat", "m", "--temperature", "0"])
    assert generation_config(args).do_sample is False
    base = ["chat", str(model_dir), "--prompt", "你好", "--max-new-tokens", "8", "--device", "cpu"]
    assert main([*base, "--temperature", "0"]) == 0
    zero = capsys.readouterr().out
    assert main([*base, "--greedy"]) == 0
    assert capsys.readouterr().out == zero
    with pytest.raises(ValueError, match="--temperature must be >= 0"):
        generation_config(build_parser().parse_args(["chat", "m", "--temperature", "-1"]))
    with pytest.raises(ValueError, match="--top-p must be in"):
        generation_config(build_parser().parse_args(["chat", "m", "--top-p", "0"]))


def test_eval_uses_the_shared_sampling_options(model_dir, dev_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(model_dir), "--data", str(dev_file), "--out", str(out), "--max-new-tokens", "3",
            "--top-k", "3", "--repetition-penalty", "1.2", "--temperature", "0", "--device", "cpu", "--dtype",
            "fp32", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    gen = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["generation_config"]
    assert (gen["top_k"], gen["repetition_penalty"], gen["do_sample"]) == (3, 1.2, False)


def _one_clear_line(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


@no_cuda
def test_cuda_without_cuda_is_one_clear_line(model_dir, dev_file, tmp_path, capsys):
    assert main(["chat", str(model_dir), "--device", "cuda", "--prompt", "你好"]) == 2
    _one_clear_line(capsys.readouterr().err, "glmtune chat: error: --device cuda: CUDA is not available")
    argv = ["eval", str(model_dir), "--data", str(dev_file), "--out", str(tmp_path / "e"), "--device", "cuda:1"]
    assert main(argv) == 2
    _one_clear_line(capsys.readouterr().err, "glmtune eval: error: --device cuda:1: CUDA is not available")
    argv = ["train", str(REPO / "examples" / "lora-chatglm3-adgen.yaml"), f"model={model_dir}",
            f"output_dir={tmp_path / 'run'}", "train.device=cuda"]  # fmt: skip
    assert main(argv) == 2
    _one_clear_line(capsys.readouterr().err, "glmtune train: error: train.device=cuda: CUDA is not available",
                    "train.device=cpu")  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "--device gpu: not a device"), ("cuda:x", "not a device"), ("xpu", "runs on cpu, cuda or mps")],
)
def test_unknown_devices_are_one_clear_line(model_dir, capsys, device, message):
    assert main(["chat", str(model_dir), "--device", device, "--prompt", "你好"]) == 2
    _one_clear_line(capsys.readouterr().err, message)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message of a machine without MPS")
def test_mps_without_mps(capsys):
    with pytest.raises(ValueError, match="--device mps: Apple's MPS backend is not available"):
        check_device("mps")
    check_device("cpu")
    check_device("auto")


def test_parse_adapters_names_once_whatever_the_spaces():
    from glmtune.cli_options import parse_adapters

    assert parse_adapters(["a=/x", " b = /y "]) == {"a": "/x", "b": "/y"}
    for values in (["a=/x", "a =/y"], ["a =/x", "a=/y"]):
        with pytest.raises(ValueError, match="given twice"):
            parse_adapters(values)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters(["=/x"])
