"""The optimizer step on its own: the fused AdamW path (the GPU's, run here on the CPU) skips a non-finite step on
the device exactly as the foreach path (the CPU's) skips it on the host; the step's numbers stay tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune.templates import IGNORE_INDEX
from glmtune.train.config import OptimConfig
from glmtune.train.distributed import DistInfo
from glmtune.train.setup import build_optimizer
from glmtune.train.step import TrainStep

VOCAB, HIDDEN = 37, 8


class ToyLoss(nn.Module):
    """Embedding + output layer; returns the summed token loss at the given positions, like ``LMLoss``.
    ``poison`` makes the next forward return NaN (a non-finite loss); ``poison_grad`` an infinite gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)
        self.norm_weight = nn.Parameter(torch.ones(HIDDEN))
        self.poison = False
        self.poison_grad = False

    def forward(self, input_ids, labels, attention_mask=None, target_index=None, targets=None, **_) -> torch.Tensor:
        h = self.emb(input_ids) * self.norm_weight  # (b, s, H)
        if self.poison_grad:  # a finite loss whose gradient is infinite
            h = h.clone()
            h.register_hook(lambda g: g + float("inf"))
        logits = self.out(h.flatten(0, 1).index_select(0, target_index))
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return loss * float("nan") if self.poison else loss


def _batches(seed: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (3, 7), generator=g)
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def _step(net: ToyLoss, fused: bool, max_grad_norm: float | None = 1.0) -> TrainStep:
    named = dict(net.named_parameters())
    cfg = OptimConfig(learning_rate=0.05, weight_decay=0.1)
    opt = build_optimizer(named, cfg, torch.device("cpu"), fused=fused)
    assert bool(opt.defaults["fused"]) == fused
    return TrainStep(net, list(named.values()), opt, info=DistInfo(), autocast=torch.autocast("cpu", enabled=False),
                     max_grad_norm=max_grad_norm)  # fmt: skip


def _state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in net.named_parameters()}
    for i, st in enumerate(opt.state.values()):
        out.update({f"s{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


@pytest.mark.parametrize("poison", ["poison", "poison_grad"])
@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_fused_device_skip_matches_foreach_host_skip(poison: str, max_grad_norm: float | None) -> None:
    torch.manual_seed(0)
    base = ToyLoss()
    runs = {}
    for fused in (False, True):
        net = copy.deepcopy(base)
        step = _step(net, fused, max_grad_norm)
        history = []
        for s in range(5):
            setattr(net, poison, s == 2)  # the third step is bad
            before = _state(net, step.optimizer)
            out = step(_batches(s))
            assert isinstance(out.loss_sum, torch.Tensor) and isinstance(out.bad, torch.Tensor)
            assert bool(out.bad) == (s == 2)
            after = _state(net, step.optimizer)
            if s == 2:  # skipped: weights and optimizer state (step count included) untouched
                assert before.keys() == after.keys()
                for k in before:
                    torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
            history.append((float(out.loss_sum), float(out.grad_norm)))
        runs[fused] = (history, _state(net, step.optimizer))
    (h_foreach, s_foreach), (h_fused, s_fused) = runs[False], runs[True]
    assert [loss for loss, _ in h_fused if loss == loss] == pytest.approx([loss for loss, _ in h_foreach
                                                                         if loss == loss], rel=1e-6)  # fmt: skip
    assert s_foreach.keys() == s_fused.keys()
    for k in s_foreach:
        torch.testing.assert_close(s_fused[k].float(), s_foreach[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    steps = {float(v) for k, v in s_fused.items() if k.endswith(".step")}
    assert steps == {4.0}  # 5 steps, one skipped


def test_clipping_and_the_global_token_mean() -> None:
    """Two micro-batches: the gradient is that of the mean over all their targets; the norm is clipped."""
    torch.manual_seed(1)
    net = ToyLoss()
    ref = copy.deepcopy(net)
    step = _step(net, fused=False, max_grad_norm=0.01)
    step.optimizer.step = lambda *a, **k: None  # keep the gradients for a look (zero_grad runs after)
    grads: dict[str, torch.Tensor] = {}
    step.optimizer.zero_grad = lambda **k: grads.update({n: p.grad.clone() for n, p in net.named_parameters()})
    batches = _batches(7)
    out = step(batches)

    total, n = 0.0, 0
    for b in batches:
        labels = b["labels"]
        rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        h = ref.emb(b["input_ids"]) * ref.norm_weight
        total = total + F.cross_entropy(ref.out(h[rows, cols]), labels[rows, cols + 1], reduction="sum")
        n += rows.numel()
    (total / n).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref.parameters()))
    assert float(out.targets) == n and float(out.loss_sum) == pytest.approx(float(total.detach()), rel=1e-6)
    assert float(out.grad_norm) == pytest.approx(float(norm), rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad * (0.01 / (float(norm) + 1e-6)), rtol=1e-4, atol=1e-7)


def test_a_batch_without_targets_is_skipped() -> None:
    torch.manual_seed(2)
    net = ToyLoss()
    step = _step(net, fused=True)
    batches = _batches(3)
    for b in batches:
        b["labels"][:] = IGNORE_INDEX
    before = _state(net, step.optimizer)
    out = step(batches)
    assert bool(out.bad) and float(out.targets) == 0.0
    after = _state(net, step.optimizer)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_loss_kind_reads_the_run_once_and_after_compile_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LMLoss.loss_kind`` asks torch.distributed and walks the blocks once per module (the first forward), not
    once per micro-batch; a module built before ``compile_blocks`` (the trainer's order) and one built after it both
    see the compiled blocks."""
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.train import compile as train_compile
    from glmtune.train.step import LMLoss

    asked: list[str] = []
    blocks_compiled, is_initialized = train_compile.blocks_compiled, torch.distributed.is_initialized
    monkeypatch.setattr(train_compile, "blocks_compiled", lambda m: asked.append("blocks") or blocks_compiled(m))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: asked.append("dist") or is_initialized())

    torch.manual_seed(0)
    model = build_model(preset("tiny-chatglm3"))
    net = LMLoss(model, 8)
    ids = torch.randint(5, 200, (2, 12))
    losses = [net(ids, ids) for _ in range(3)]  # three micro-batches
    assert sorted(asked) == ["blocks", "dist"]  # once, not once a micro-batch
    assert all(torch.equal(loss, losses[0]) for loss in losses)  # (eager, recomputed chunks on the CPU)

    cuda = torch.device("cuda")  # (only its type is read)
    before = LMLoss(model, 8)  # built before the blocks are compiled, asked after (the trainer's order)
    train_compile.compile_blocks(model, backend="aot_eager")
    after = LMLoss(model, 8)
    asked.clear()
    for _ in range(3):
        assert before.loss_kind(cuda) == (False, True) and after.loss_kind(cuda) == (False, True)
    assert sorted(asked) == ["blocks", "blocks", "dist", "dist"]  # once per module
