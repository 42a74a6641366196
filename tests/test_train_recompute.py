"""``train.gradient_checkpointing`` true / mlp / half: the same losses as keeping every activation, the chosen
modules recomputed in the backward pass, parameter names unchanged, and under ``train.compile`` too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmtune.models import chatglm
from glmtune.pretrained import load_pretrained
from glmtune.train import compile as train_compile
from glmtune.train.compile import transformer_blocks
from glmtune.train.recompute import apply_checkpointing
from train_support import run, small_config, tiny_model

FAST = ("train.max_steps=3", "data.max_samples=8", "train.batch_size=4", "method.dropout=0.0")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def _mlp_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record every MLP forward (grad enabled or not) of the ChatGLM family."""
    calls: list[bool] = []
    real = chatglm.MLP.forward

    def counted(self, x):
        calls.append(torch.is_grad_enabled())
        return real(self, x)

    monkeypatch.setattr(chatglm.MLP, "forward", counted)
    return calls


@pytest.mark.parametrize(
    ("mode", "compiled", "layers"),
    [
        ("true", False, None),
        ("mlp", False, None),
        ("half", False, None),
        ("mlp", False, 1),
        ("true", False, 1),
        ("half", False, 2),
        pytest.param("mlp", True, None, marks=pytest.mark.slow),
    ],
)
def test_same_losses_and_the_chosen_modules_recomputed(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       mode: str, compiled: bool, layers: int | None
                                                       ) -> None:  # fmt: skip
    model = tiny_model(models)
    calls = _mlp_calls(monkeypatch)
    plain = run(small_config(model, tmp_path / "plain", *FAST, "train.gradient_checkpointing=false"))
    n_plain = len(calls)
    calls.clear()
    if compiled:
        torch._dynamo.reset()
        monkeypatch.setattr(train_compile, "BACKEND", "aot_eager")
    limit = () if layers is None else (f"train.recompute_layers={layers}",)
    cfg = small_config(model, tmp_path / mode, *FAST, f"train.gradient_checkpointing={mode}",
                       f"train.compile={str(compiled).lower()}", *limit)  # fmt: skip
    checkpointed = run(cfg)
    if compiled:
        torch._dynamo.reset()
    assert [v for _, v in checkpointed.losses] == pytest.approx([v for _, v in plain.losses], rel=1e-6, abs=1e-7)
    if not compiled:  # (compiled code does not call the Python forward)
        n_layers = len(transformer_blocks(load_pretrained(model, device="cpu").model))
        chosen = n_layers if layers is None else layers  # (the first `layers` blocks)
        extra = {"true": chosen, "mlp": chosen, "half": (chosen + 1) // 2}[mode]
        assert len(calls) == n_plain * (n_layers + extra) // n_layers  # each step: one more MLP pass per choice


def test_recompute_layers_is_checked(models: Path, tmp_path: Path) -> None:
    """train.recompute_layers: at least 1, only with a checkpointing mode (config), at most the model's blocks."""
    from glmtune.train.config import ConfigError

    model_dir = tiny_model(models)
    bad_values = (("train.recompute_layers=0", "at least 1"), ("train.recompute_layers=2", "needs train.gradient"))
    for bad, match in bad_values:
        with pytest.raises(ConfigError, match=f"train.recompute_layers.*{match}"):
            small_config(model_dir, tmp_path / "bad", *FAST, bad)
    model = load_pretrained(model_dir, device="cpu").model
    n = len(transformer_blocks(model))
    with pytest.raises(ValueError, match=f"between 1 and the model's {n} blocks, got {n + 1}"):
        apply_checkpointing(model, "mlp", n + 1)
    apply_checkpointing(model, True, 1)  # the first block whole, by wrapping it (the model's own switch stays off)
    assert model.transformer.gradient_checkpointing is False
    from glmtune.train.recompute import reads_rng_state

    # blocks without dropout recomputed by the wrapper keep the RNG state alone (CUDA graphs stay possible); the
    # models' own switch over every block always reads it
    assert reads_rng_state(model, True, 1) is False and reads_rng_state(model, True) is True


def test_names_unchanged_and_bad_modes(models: Path) -> None:
    model = load_pretrained(tiny_model(models), device="cpu").model
    names = list(model.state_dict())
    apply_checkpointing(model, "mlp")
    assert list(model.state_dict()) == names and model.transformer.gradient_checkpointing is False
    with pytest.raises(ValueError, match="gradient_checkpointing must be"):
        apply_checkpointing(model, "attention")


@pytest.mark.parametrize(
    ("mode", "lora_targets", "reads"),
    [
        (False, "query_key_value", False),
        ("mlp", "query_key_value", False),  # LoRA's dropout sits in the attention, not in the recomputed MLPs
        ("mlp", "dense_h_to_4h", True),  # ... here inside the MLP: its recomputation must replay the same draws
        ("half", "query_key_value", True),  # whole blocks hold the attention's LoRA dropout
        (True, "query_key_value", True),  # the models' own switch always keeps the RNG state
    ],
)
def test_which_modes_read_the_rng_state(models: Path, mode, lora_targets: str, reads: bool) -> None:
    """What decides whether train.cuda_graph can stay on (graph_step.use_cuda_graph's recompute_reads_rng)."""
    from glmtune.adapters import build_method
    from glmtune.train.recompute import reads_rng_state

    model = load_pretrained(tiny_model(models), device="cpu").model
    build_method("lora", {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": lora_targets}).setup(model)
    assert reads_rng_state(model, mode) is reads


def test_recomputed_mlps_without_dropout_leave_the_rng_state_alone(models: Path, monkeypatch) -> None:
    """mlp over plain MLPs: the backward recomputes them without reading or setting the RNG state (which a CUDA
    graph capture refuses), and the gradients equal those of no recomputation; with dropout inside, the state is
    saved and restored (torch's default)."""
    from glmtune.adapters import build_method

    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, reads = [], []

    def counting(name: str):
        real = getattr(torch, name)
        return lambda *a, **k: reads.append(name) or real(*a, **k)

    for mode in (False, "mlp"):
        model = load_pretrained(tiny_model(models), device="cpu", dtype="float32").model
        torch.manual_seed(1)  # the same LoRA initialisation on both sides
        build_method("lora", {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": "query_key_value"}).setup(model)
        apply_checkpointing(model, mode)
        model.train()
        for name in ("get_rng_state", "set_rng_state"):
            monkeypatch.setattr(torch, name, counting(name))
        torch.manual_seed(3)  # the same dropout draws
        model(ids).float().square().mean().backward()
        monkeypatch.undo()
        assert reads == []
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    model = load_pretrained(tiny_model(models), device="cpu", dtype="float32").model
    build_method("lora", {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": "dense_h_to_4h"}).setup(model)
    apply_checkpointing(model, "mlp")
    model.train()
    monkeypatch.setattr(torch, "get_rng_state", counting("get_rng_state"))
    model(ids).float().square().mean().backward()
    assert reads  # the MLP's LoRA dropout: its draws replayed by restoring the state
