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
