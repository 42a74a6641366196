"""What of a collated batch the step gets: the collator's runs (``cu_seqlens``, ``max_seqlen``) only where the model's
attention reads them (the "varlen" backend without a P-Tuning prefix); elsewhere a new bound would only make the
CUDA-graph step capture another graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmtune.data.collate import PackedRow, collate_packed
from glmtune.models import build_model
from glmtune.models.config import preset
from glmtune.templates import IGNORE_INDEX, Encoded
from glmtune.train import loop
from glmtune.train.graph_step import pack_batch
from glmtune.train.step import RUN_INPUTS, TrainStep, reads_runs, step_batch
from train_support import run, small_config, tiny_model


def _packed(lengths: list[list[int]], width: int) -> dict[str, torch.Tensor | int]:
    rows = [PackedRow([Encoded(list(range(10, 10 + n)), [IGNORE_INDEX] + list(range(11, 10 + n))) for n in row])
            for row in lengths]  # fmt: skip
    return collate_packed(rows, pad_id=0, pad_to=width)


def _prefixed(model: torch.nn.Module) -> torch.nn.Module:
    from glmtune.adapters import build_method

    build_method("ptuning", {"pre_seq_len": 4}).setup(model)
    assert model.n_prefix() == 4
    return model


def test_the_runs_stay_only_where_the_attention_reads_them() -> None:
    model = build_model(preset("tiny-chatglm3"))
    short, long = _packed([[20, 30], [25]], 512), _packed([[200, 30], [25]], 512)
    assert short["max_seqlen"] != long["max_seqlen"]  # two bounds: two keys of the CUDA-graph step if kept
    for backend in ("sdpa", "flex", "varlen"):
        model.set_attention_backend(backend)
        batches = [step_batch(b, model) for b in (short, long)]
        if backend == "varlen":
            assert reads_runs(model) and all(b is orig for b, orig in zip(batches, (short, long), strict=True))
            assert pack_batch(batches[0])[0] != pack_batch(batches[1])[0]
        else:
            assert not reads_runs(model)
            assert all(not set(RUN_INPUTS) & set(b) for b in batches)
            assert batches[0].keys() == short.keys() - set(RUN_INPUTS)
            assert all(torch.equal(batches[0][k], short[k]) for k in batches[0])
            assert pack_batch(batches[0])[0] == pack_batch(batches[1])[0]  # one key for both bounds
    assert "max_seqlen" in short and "cu_seqlens" in short  # the collated batch itself is left as it was
    # P-Tuning: "varlen" builds the prefixed rows' masks as flex does, from the segments
    prefixed = _prefixed(build_model(preset("tiny-chatglm3")))
    prefixed.set_attention_backend("varlen")
    assert not reads_runs(prefixed) and not set(RUN_INPUTS) & set(step_batch(short, prefixed))
    # a batch without runs (one sample per row) and a module that is no glmtune model: as they are
    plain = _packed([[20], [25]], 64)
    assert not set(RUN_INPUTS) & set(plain) and step_batch(plain, model) is plain
    assert not reads_runs(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("backend", ["varlen", "sdpa"])
def test_the_trainer_hands_the_step_the_runs_its_model_reads(models: Path, tmp_path: Path, backend: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A packed run whose blocks take ``backend`` (as compile_blocks sets it on CUDA): the step's micro-batches hold
    cu_seqlens and max_seqlen under varlen, none under sdpa; the run trains either way. (P-Tuning's prefixed rows
    go through flex, which has no backward on the CPU: the test above covers them.)"""
    seen: list[set[str]] = []

    class Recording(TrainStep):
        def __call__(self, batches):
            seen.extend(set(b) for b in batches)
            return super().__call__(batches)

    compile_ = loop.Trainer.compile

    def compile_then_backend(self) -> None:
        compile_(self)
        self.model.set_attention_backend(backend)

    monkeypatch.setattr(loop, "TrainStep", Recording)
    monkeypatch.setattr(loop.Trainer, "compile", compile_then_backend)
    cfg = small_config(tiny_model(models), tmp_path / "run", "train.max_steps=2", "data.packing=true",
                       "data.pack_length=160")  # fmt: skip
    result = run(cfg)
    assert result.steps == 2 and seen and all("segment_ids" in keys for keys in seen)  # packed rows
    kept = backend == "varlen"
    assert all(set(RUN_INPUTS) <= keys if kept else not set(RUN_INPUTS) & keys for keys in seen)
