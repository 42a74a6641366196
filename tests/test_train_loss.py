"""Chunked causal LM loss against a naive float64 full-logits loss: values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmtune.templates import IGNORE_INDEX
from glmtune.train.loss import chunked_lm_loss, count_targets


def _inputs(seed: int, b: int = 3, s: int = 11, h: int = 16, vocab: int = 97, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, dtype=dtype)
    layer = nn.Linear(h, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, h, generator=g, dtype=dtype))
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.4] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # a row with nothing to learn
    labels[2, 3:7] = torch.randint(0, vocab, (4,), generator=g)
    return hidden, labels, layer


def _naive(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Full float64 logits, explicit shift, mean over the targets (the textbook way)."""
    logits = hidden.double() @ weight.double().T  # (b, s, V)
    total, n = torch.zeros((), dtype=torch.float64), 0
    b, s = labels.shape
    for i in range(b):
        for j in range(s - 1):
            target = int(labels[i, j + 1])
            if target == IGNORE_INDEX:
                continue
            total = total - torch.log_softmax(logits[i, j], dim=-1)[target]
            n += 1
    return total, n


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_value_and_gradients_match_naive_float64(chunk: int) -> None:
    hidden, labels, layer = _inputs(seed=chunk)
    hidden.requires_grad_(True)
    loss_sum, n = chunked_lm_loss(hidden, labels, layer, chunk_tokens=chunk)
    (loss_sum / n).backward()
    got_h, got_w = hidden.grad.clone(), layer.weight.grad.clone()

    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    ref_sum, ref_n = _naive(h_ref, labels, w_ref)
    (ref_sum / ref_n).backward()

    assert n == ref_n == count_targets(labels)
    assert loss_sum.dtype == torch.float64
    torch.testing.assert_close(loss_sum.detach(), ref_sum.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h, h_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_float32_and_bf16_autocast_close_to_reference() -> None:
    hidden, labels, layer = _inputs(seed=5, dtype=torch.float32)
    ref_sum, ref_n = _naive(hidden, labels, layer.weight.detach())
    loss_sum, n = chunked_lm_loss(hidden, labels, layer, chunk_tokens=4)
    torch.testing.assert_close(loss_sum.double() / n, ref_sum / ref_n, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_sum, _ = chunked_lm_loss(hidden.bfloat16(), labels, layer, chunk_tokens=4)
    assert low_sum.dtype == torch.float32  # the log-softmax runs in float32 even under bf16 autocast
    torch.testing.assert_close(low_sum.double() / n, ref_sum / ref_n, rtol=3e-2, atol=3e-2)


class _Recorder(nn.Module):
    """An output layer that records how many rows it is asked for at once."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.layer(x)


def test_logits_exist_one_chunk_at_a_time_forward_and_backward() -> None:
    hidden, labels, layer = _inputs(seed=9, b=4, s=20, dtype=torch.float32)
    rec = _Recorder(layer)
    hidden.requires_grad_(True)
    loss_sum, n = chunked_lm_loss(hidden, labels, rec, chunk_tokens=5)
    forward_calls = len(rec.rows)
    loss_sum.backward()
    assert forward_calls == -(-n // 5)
    assert max(rec.rows) <= 5 and len(rec.rows) == 2 * forward_calls  # recomputed chunk by chunk in backward
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_no_targets_gives_zero_with_a_graph() -> None:
    hidden, labels, layer = _inputs(seed=2)
    labels[:] = IGNORE_INDEX
    hidden.requires_grad_(True)
    loss_sum, n = chunked_lm_loss(hidden, labels, layer)
    assert n == 0 and float(loss_sum.detach()) == 0.0
    loss_sum.backward()  # no error: a micro-batch without targets still takes part in backward (DDP)
    assert float(hidden.grad.abs().sum()) == 0.0


def test_shape_mismatch_is_named() -> None:
    hidden, labels, layer = _inputs(seed=3)
    with pytest.raises(ValueError, match="do not line up"):
        chunked_lm_loss(hidden[:, :-1], labels, layer)


def test_loss_without_recompute_gives_the_same_loss_and_gradients():
    """``train.loss_recompute: false`` keeps each chunk's logits for the backward instead of recomputing them:
    the same numbers, one output-layer product less."""
    from glmtune.train.loss import indexed_lm_loss, loss_targets

    torch.manual_seed(0)
    out = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    index, targets = loss_targets(labels)
    calls = []
    out.register_forward_hook(lambda *_: calls.append(1))
    results, forwards = [], []
    for recompute in (True, False):
        out.zero_grad()
        hidden.grad = None
        calls.clear()
        loss = indexed_lm_loss(hidden, index, targets, out, chunk_tokens=4, recompute=recompute)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), out.weight.grad.clone()))
        forwards.append(len(calls))
    chunks = -(-index.numel() // 4)
    assert forwards == [2 * chunks, chunks]  # recomputed in the backward, or not
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_chunk_loss_gives_the_eager_loss_and_gradients(backend):
    """The compiled chunk loss (``train.loss_recompute: auto`` with compiled blocks on a GPU): the same loss and
    gradients as the eager chunks, chunks of several lengths through one dynamic graph, padded IGNORE_INDEX slots
    taking no loss, and it refuses recomputation."""
    from glmtune.train.loss import compiled_chunk_loss, indexed_lm_loss, loss_targets

    torch.manual_seed(1)
    out = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    index, targets = loss_targets(labels)
    pad = 5  # as the CUDA-graph step pads its loss positions
    index = torch.cat([index, index.new_zeros(pad)])
    targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
    compiled = compiled_chunk_loss(backend)
    results = []
    for chunk_loss, chunk in ((None, 7), (compiled, 7), (compiled, 4), (compiled, 100)):
        out.zero_grad()
        hidden.grad = None
        loss = indexed_lm_loss(hidden, index, targets, out, chunk_tokens=chunk, recompute=chunk_loss is None,
                               chunk_loss=chunk_loss)  # fmt: skip
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), out.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="recompute"):
        indexed_lm_loss(hidden, index, targets, out, recompute=True, chunk_loss=compiled)


def test_loss_recompute_auto_decides_by_compile_and_device():
    """``train.loss_recompute``: auto compiles the chunk loss (kept, not recomputed) only with compiled blocks on
    CUDA in one process; true always recomputes the eager chunks, false keeps them."""
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.train import compile as train_compile
    from glmtune.train.step import KEEP_LOGITS_BYTES, LMLoss

    model = build_model(preset("tiny-chatglm3"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    kinds = {r: LMLoss(model, 8, recompute=r).loss_kind(cuda) for r in ("auto", True, False)}
    assert kinds == {"auto": (True, False), True: (True, False), False: (False, False)}  # blocks not compiled
    train_compile.compile_blocks(model, backend="aot_eager")
    assert train_compile.blocks_compiled(model)
    assert LMLoss(model, 8).loss_kind(cuda) == (False, True)
    assert LMLoss(model, 8, recompute=False).loss_kind(cuda) == (False, True)
    assert LMLoss(model, 8, recompute=True).loss_kind(cuda) == (True, False)
    assert LMLoss(model, 8).loss_kind(cpu) == (True, False)  # the CPU: as before
    # auto keeps logits only up to KEEP_LOGITS_BYTES (then recomputes, as before); false keeps them whatever the size
    assert LMLoss(model, 8).loss_kind(cuda, KEEP_LOGITS_BYTES) == (False, True)
    assert LMLoss(model, 8).loss_kind(cuda, KEEP_LOGITS_BYTES + 1) == (True, False)
    assert LMLoss(model, 8, recompute=False).loss_kind(cuda, 10 * KEEP_LOGITS_BYTES) == (False, True)
    with pytest.raises(ValueError, match="loss_recompute"):
        LMLoss(model, 8, recompute="sometimes")


def test_loss_recompute_config_values(tmp_path):
    from glmtune.train.config import ConfigError
    from train_support import small_config, tiny_model

    model = tiny_model(tmp_path)
    assert small_config(model, tmp_path).train.loss_recompute == "auto"
    for text, value in [("true", True), ("off", False), ("auto", "auto")]:
        assert small_config(model, tmp_path, f"train.loss_recompute={text}").train.loss_recompute == value
    with pytest.raises(ConfigError, match="train.loss_recompute"):
        small_config(model, tmp_path, "train.loss_recompute=sometimes")
