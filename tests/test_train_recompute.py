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
    ("mode", "compiled"),
    [("true", False), ("mlp", False), ("half", False), pytest.param("mlp", True, marks=pytest.mark.slow)],
)
def test_same_losses_and_the_chosen_modules_recomputed(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       mode: str, compiled: bool) -> None:  # fmt: skip
    model = tiny_model(models)
    calls = _mlp_calls(monkeypatch)
    plain = run(small_config(model, tmp_path / "plain", *FAST, "train.gradient_checkpointing=false"))
    n_plain = len(calls)
    calls.clear()
    if compiled:
        torch._dynamo.reset()
        monkeypatch.setattr(train_compile, "BACKEND", "aot_eager")
    cfg = small_config(model, tmp_path / mode, *FAST, f"train.gradient_checkpointing={mode}",
                       f"train.compile={str(compiled).lower()}")  # fmt: skip
    checkpointed = run(cfg)
    if compiled:
        torch._dynamo.reset()
    assert [v for _, v in checkpointed.losses] == pytest.approx([v for _, v in plain.losses], rel=1e-6, abs=1e-7)
    if not compiled:  # (compiled code does not call the Python forward)
        n_layers = len(transformer_blocks(load_pretrained(model, device="cpu").model))
        extra = {"true": n_layers, "mlp": n_layers, "half": (n_layers + 1) // 2}[mode]
        assert len(calls) == n_plain * (n_layers + extra) // n_layers  # each step: one more MLP pass per choice


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
