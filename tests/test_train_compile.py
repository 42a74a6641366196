"""``train.compile``: compiled and eager steps give the same losses (every method, v1 and v2+, packed and padded),
an exact resume holds with compile on, names in checkpoints do not change, and recompiles stay few."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glmtune.data.collate import PackedRow
from glmtune.templates import Encoded
from glmtune.train import compile as train_compile
from glmtune.train.config import ConfigError, resume_config
from glmtune.train.data import Batcher, bucket_width
from train_support import ADGEN_DEV, run, small_config, tiny_model, train_losses

FAST = ("train.max_steps=3", "data.max_samples=12", "method.dropout=0.0", "log.every_steps=2")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch):
    """aot_eager: the graphs torch.compile captures, run without code generation (fast on the CPU)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(train_compile, "BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _tensor_names(folder: Path) -> dict[str, list[str]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out[f.name] = sorted(st.keys())
    return out


# every method once, each family packed and padded: (generation, method, packing, evaluate)
CASES = [
    ("chatglm3", "lora", "true", True),
    ("chatglm2", "freeze", "false", False),
    ("chatglm", "ptuning", "false", False),
    ("chatglm", "full", "true", False),
]
OPTIONS = {"freeze": ["method.trainable_layers=1"], "ptuning": ["method.pre_seq_len=4"]}


@pytest.mark.slow
@pytest.mark.parametrize(("generation", "method", "packing", "evaluate"), CASES)
def test_compiled_and_eager_steps_give_the_same_losses(models: Path, tmp_path: Path, backend, generation: str,
                                                       method: str, packing: str, evaluate: bool) -> None:  # fmt: skip
    model = tiny_model(models, generation)
    dev = (f"data.dev={ADGEN_DEV}", "data.max_dev_samples=3", "eval.every_steps=2") if evaluate else ()
    common = (*FAST, f"method.name={method}", f"data.packing={packing}", *OPTIONS.get(method, []), *dev)
    eager = run(small_config(model, tmp_path / "eager", *common, "train.compile=false"))
    assert _graphs() == 0
    compiled = run(small_config(model, tmp_path / "compiled", *common, "train.compile=true"))
    assert _graphs() >= 1  # the blocks did run compiled
    assert [s for s, _ in compiled.losses] == [1, 2, 3]
    assert [v for _, v in compiled.losses] == pytest.approx([v for _, v in eager.losses], rel=1e-5, abs=1e-6)
    if evaluate:
        assert compiled.best_metric == pytest.approx(eager.best_metric, rel=1e-5)  # dev loss, eager in both
    assert _tensor_names(tmp_path / "compiled" / "model") == _tensor_names(tmp_path / "eager" / "model")


@pytest.mark.slow
def test_inductor_matches_eager(models: Path, tmp_path: Path) -> None:
    """The real backend once (CPU inductor generates C++; it needs a compiler, as CI has)."""
    torch._dynamo.reset()
    model = tiny_model(models)
    eager = run(small_config(model, tmp_path / "eager", *FAST, "train.compile=false"))
    compiled = run(small_config(model, tmp_path / "inductor", *FAST, "train.compile=true"))
    torch._dynamo.reset()
    assert [v for _, v in compiled.losses] == pytest.approx([v for _, v in eager.losses], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", ["train.compile=true", "train.cuda_graph=true"])
def test_exact_resume_with_compile(models: Path, tmp_path: Path, backend, mode: str) -> None:
    """A run stopped at step 2 and resumed to 4 has the losses of one that ran through (dropout on: RNG restored);
    compiled, or with the CUDA-graph step (plain calls on the CPU: padded loss positions, lr and scale tensors)."""
    model = tiny_model(models)
    settings = (mode, "method.dropout=0.1", "train.scheduler=constant", "save.every_steps=2",
                "data.max_samples=12")  # fmt: skip
    whole = run(small_config(model, tmp_path / "whole", *settings, "train.max_steps=4"))
    run(small_config(model, tmp_path / "parts", *settings, "train.max_steps=2"))
    resumed = run(resume_config(tmp_path / "parts", ["train.max_steps=4"]), resume=True)
    assert resumed.steps == 4
    assert train_losses(tmp_path / "parts") == train_losses(tmp_path / "whole") == whole.losses


def test_recompiles_stay_bounded(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded batches of many lengths compile once per width bucket, not once per batch."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(train_compile, "BACKEND", counter)
    cfg = small_config(tiny_model(models), tmp_path / "r", "train.compile=true", "data.packing=false",
                       "train.max_steps=8", "train.batch_size=1", "data.max_samples=16", "log.every_steps=4",
                       "data.max_source_length=100", "data.max_target_length=60")  # fmt: skip
    lengths: list[int] = []
    real = Batcher.collate

    def spy(self, units):
        batch = real(self, units)
        lengths.append(max(len(u.input_ids) for u in units))
        assert batch["input_ids"].shape[1] == bucket_width(lengths[-1])
        return batch

    monkeypatch.setattr(Batcher, "collate", spy)
    run(cfg)
    torch._dynamo.reset()
    widths = {bucket_width(n) for n in lengths}
    assert len(set(lengths)) > len(widths) >= 1  # the batches had more lengths than widths
    assert 1 <= counter.frame_count <= 2 * len(widths)  # (with or without a mask: two graphs per width at most)


def test_fixed_shapes_and_buckets() -> None:
    assert [bucket_width(n) for n in (1, 64, 65, 96, 97, 129, 200, 257, 700, 1025)] == [
        64, 64, 96, 96, 128, 192, 256, 384, 768, 1536]  # fmt: skip
    for n in range(1, 3000, 7):
        w = bucket_width(n)
        assert n <= w and (w <= 64 or w < 1.5 * n + 1)
    rows = [PackedRow([Encoded([1] * n, [1] * n)]) for n in (5, 9, 3, 7)]
    batcher = Batcher(rows, 2, 1, 1, seed=0, pad_id=0, positions="1d", pad_to=12)
    assert {batcher.collate(mb)["input_ids"].shape for mb in batcher.step_units(0, 0)} == {(2, 12)}


def test_config_values(models: Path, tmp_path: Path) -> None:
    model = tiny_model(models)
    for text, value in [("on", True), ("off", False), ("true", True), ("auto", "auto")]:
        assert small_config(model, tmp_path, f"train.compile={text}").train.compile == value
    with pytest.raises(ConfigError, match="train.compile"):
        small_config(model, tmp_path, "train.compile=sometimes")
    assert train_compile.use_compile("auto", torch.device("cpu")) is False
    assert train_compile.use_compile("auto", torch.device("cuda")) is True


def test_inductor_options_reach_each_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_blocks(options=...)`` hands Inductor's options to every block's torch.compile (no global config);
    other backends take none."""
    from torch import nn

    from glmtune.models import build_model
    from glmtune.models.config import preset

    seen: list[dict] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **kw: seen.append(kw))
    model = build_model(preset("tiny-chatglm3"), dtype=torch.float32)
    n = train_compile.compile_blocks(model, backend="inductor", options={"coordinate_descent_tuning": True})
    assert n == len(seen) > 0
    assert all(kw == {"backend": "inductor", "dynamic": False, "options": {"coordinate_descent_tuning": True}}
               for kw in seen)  # fmt: skip
    seen.clear()
    train_compile.compile_blocks(model, backend="aot_eager", options={"coordinate_descent_tuning": True})
    assert seen and all("options" not in kw for kw in seen)


def _kv_repeats_at_compile(monkeypatch: pytest.MonkeyPatch) -> list:
    """nn.Module.compile replaced by a recorder of the K/V repeat its block's attention has when it is compiled."""
    from torch import nn

    seen: list = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **kw: seen.append(self.self_attention.kv_repeat))
    return seen


def test_compile_blocks_sets_the_kv_repeat_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU ``compile_blocks`` leaves the attentions' K/V repeat as the model has it (the fused ops' default is
    CUDA's); one it is given is set on every attention before any block is compiled (compiled code keeps the path
    it traced)."""
    from glmtune.models import build_model
    from glmtune.models.attention import KVRepeat
    from glmtune.models.chatglm import SelfAttention, set_kv_repeat
    from glmtune.models.config import preset

    seen = _kv_repeats_at_compile(monkeypatch)
    model = build_model(preset("tiny-chatglm3"), dtype=torch.float32)
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    set_kv_repeat(model, KVRepeat(recompute=True))
    assert train_compile.compile_blocks(model, backend="aot_eager") == len(seen) == len(attentions) > 0
    assert seen == [KVRepeat(recompute=True)] * len(attentions)
    assert {a.kv_repeat for a in attentions} == {KVRepeat(recompute=True)}
    seen.clear()
    train_compile.compile_blocks(model, backend="aot_eager", kv_repeat=KVRepeat())
    assert seen == [KVRepeat()] * len(attentions)
    assert {a.kv_repeat for a in attentions} == {KVRepeat()}


@pytest.mark.parametrize("recompute", [False, True])
def test_train_recompute_kv_reaches_every_attention(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    recompute: bool) -> None:  # fmt: skip
    """``train.recompute_kv``: the trainer compiles every block with its attention's K/V copies recomputed (on the
    CPU: the model's repeat otherwise, expand + reshape), and the config says so in the run's files."""
    from glmtune.models.attention import KVRepeat

    seen = _kv_repeats_at_compile(monkeypatch)  # (the blocks then run uncompiled: one short step is enough)
    cfg = small_config(tiny_model(models), tmp_path / "r", "train.compile=true", f"train.recompute_kv={recompute}",
                       "train.max_steps=1", "data.max_samples=4", "log.every_steps=1")  # fmt: skip
    assert cfg.train.recompute_kv is recompute
    run(cfg)
    assert seen and set(seen) == {KVRepeat(recompute=recompute)}
    assert f"recompute_kv: {str(recompute).lower()}" in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_blocks_fuses_the_kv_repeat_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA with Triton the default switches the repeat to glmtune's fused ops and keeps the model's recompute
    (``train.recompute_kv``); one given is set as it is."""
    import importlib.util

    from glmtune.models import build_model
    from glmtune.models.attention import KVRepeat
    from glmtune.models.chatglm import set_kv_repeat
    from glmtune.models.config import preset

    seen = _kv_repeats_at_compile(monkeypatch)
    model = build_model(preset("tiny-chatglm3"), dtype=torch.float32).cuda()
    set_kv_repeat(model, KVRepeat(recompute=True))
    train_compile.compile_blocks(model)
    fused = importlib.util.find_spec("triton") is not None
    assert seen and set(seen) == {KVRepeat(recompute=True, fused=fused)}
    seen.clear()
    train_compile.compile_blocks(model, kv_repeat=KVRepeat())
    assert seen and set(seen) == {KVRepeat()}
