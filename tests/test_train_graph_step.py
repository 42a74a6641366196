"""``train.cuda_graph``: the graphed step computes what ``TrainStep`` computes (padded loss positions, the loss scale
and the learning rate as device tensors, persistent gradients) and reads nothing back from the device inside what it
captures (exact resume: test_train_compile.py). On the CPU its parts run as plain calls; the ``gpu`` tests capture
and replay."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glmtune.adapters import build_method
from glmtune.models import build_model
from glmtune.models.config import preset
from glmtune.templates import IGNORE_INDEX, Encoded, get_template
from glmtune.train import compile as train_compile
from glmtune.train.config import ConfigError, DataConfig, OptimConfig
from glmtune.train.data import make_batcher
from glmtune.train.distributed import DistInfo
from glmtune.train.graph_step import TARGET_BUCKET, GraphedTrainStep, pack_batch, target_slots, use_cuda_graph
from glmtune.train.loss import loss_targets
from glmtune.train.recompute import apply_checkpointing
from glmtune.train.setup import build_optimizer, trainable_parameters
from glmtune.train.step import LMLoss, TrainStep
from test_train_step import ToyLoss, _batches, _state
from train_support import run, small_config, tiny_model

CUDA = torch.cuda.is_available()
METHODS = {"lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "query_key_value"},
           "ptuning": {"pre_seq_len": 3, "prefix_projection": False}}  # fmt: skip


def _examples(n: int, vocab: int, seed: int) -> list[Encoded]:
    """Random samples: a prompt without loss, then a response with loss, of random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, reply = (int(x) for x in torch.randint(3, 12, (2,), generator=g))
        ids = torch.randint(5, vocab, (prompt + reply,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _setup(
    method: str,
    device: torch.device,
    *,
    seed: int = 0,
    lr: float = 0.05,
    compiled: bool = False,
    checkpointing: bool | str = False,
):
    """A tiny ChatGLM3 with ``method`` on ``device``: (loss module, trainable parameters, fused AdamW)."""
    torch.manual_seed(seed)
    model = build_model(preset("tiny-chatglm3"), device=device, dtype=torch.float32, generation="chatglm3")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 else torch.randn_like(p) * 0.05)
    m = build_method(method, dict(METHODS[method]))
    m.setup(model)
    named = trainable_parameters(m, model)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a gradient everywhere from step 1
        for p in named.values():
            p.add_(torch.randn_like(p) * 0.05)
    apply_checkpointing(model, checkpointing)
    if compiled:
        train_compile.compile_blocks(model)
    model.train()
    opt = build_optimizer(named, OptimConfig(learning_rate=lr, weight_decay=0.01), device, fused=True)
    return LMLoss(model, chunk_tokens=96), list(named.values()), opt


def _steps(packing: bool, n: int, grad_accum: int = 2) -> list[list[dict[str, torch.Tensor]]]:
    """The micro-batches of ``n`` steps, fixed shapes as the trainer makes them for compiled/graphed steps."""
    examples = _examples(40, preset("tiny-chatglm3").padded_vocab_size, seed=1)
    batcher = make_batcher(examples, cfg=DataConfig(packing=packing, pack_length=48 if packing else None),
                           batch_size=2, grad_accum=grad_accum, world_size=1, seed=0,
                           tokenizer=SimpleNamespace(pad_id=0), template=get_template("chatglm3"),
                           fixed_shapes=True)  # fmt: skip
    return [[batcher.collate(u) for u in batcher.step_units(i, 0)] for i in range(n)]


def _compare(method: str, packing: bool, device: torch.device, *, compiled: bool = False, n: int = 5,
             checkpointing: bool | str = False):  # fmt: skip
    """(TrainStep's history, the graphed step's history, its step object) over ``n`` steps from the same start."""
    steps = _steps(packing, n)
    histories, graphed = [], None
    for cls in (TrainStep, GraphedTrainStep):
        net, params, opt = _setup(method, device, compiled=compiled, checkpointing=checkpointing)
        autocast = torch.autocast(device.type, enabled=False)
        step = cls(net, params, opt, info=DistInfo(device=device), autocast=autocast, max_grad_norm=0.5)
        torch.manual_seed(7)  # the same dropout draws
        history = []
        for i, batches in enumerate(steps):
            for g in opt.param_groups:  # a schedule: the graphed step must read each step's lr
                g["lr"] = 0.05 / (i + 1)
            out = step(batches)
            history.append((float(out.loss_sum) / float(out.targets), float(out.grad_norm), bool(out.bad)))
        history.append([p.detach().cpu().clone() for p in params])
        histories.append(history)
        graphed = step
    return histories[0], histories[1], graphed


def _assert_same(ref, got, rel: float = 1e-5) -> None:
    *ref_steps, ref_params = ref
    *got_steps, got_params = got
    assert [b for *_, b in got_steps] == [b for *_, b in ref_steps] == [False] * len(ref_steps)
    assert [x for x, *_ in got_steps] == pytest.approx([x for x, *_ in ref_steps], rel=rel)
    assert [x for _, x, _ in got_steps] == pytest.approx([x for _, x, _ in ref_steps], rel=rel)
    # Adam's first steps divide by sqrt(v): elements with ~eps-sized gradients carry rounding differences (the
    # output layer runs over more rows here) into the weights at ~1e-5; a wrong lr or scale moves them by ~lr
    for a, b in zip(got_params, ref_params, strict=True):
        diff = (a - b).abs()
        assert float(diff.max()) < 2e-3 and float(diff.mean()) < 2e-5, (float(diff.max()), float(diff.mean()))


@pytest.mark.parametrize(("method", "packing"), [("lora", True), ("lora", False), ("ptuning", True)])
def test_graphed_step_matches_train_step_on_the_cpu(method: str, packing: bool) -> None:
    """Two micro-batches a step, dropout on (the same draws on both sides), a changing lr: the same losses, norms
    and weights as TrainStep."""
    ref, got, _ = _compare(method, packing, torch.device("cpu"))
    assert len({round(x, 6) for x, *_ in ref[:-1]}) == len(ref) - 1  # the steps did differ (training happened)
    _assert_same(ref, got)


def test_graphed_step_with_recomputed_mlps_matches_train_step_on_the_cpu() -> None:
    """train.gradient_checkpointing=mlp (the MLPs draw no random numbers: recomputed without the RNG state, so CUDA
    graphs keep working) with LoRA dropout on query_key_value: the same losses, norms and weights as TrainStep
    without recomputation."""
    ref, _, _ = _compare("lora", True, torch.device("cpu"))
    _, got, _ = _compare("lora", True, torch.device("cpu"), checkpointing="mlp")
    _assert_same(ref, got)


@pytest.mark.parametrize("poison", ["poison", "poison_grad", "no_targets"])
def test_non_finite_and_empty_steps_are_skipped_as_in_train_step(poison: str) -> None:
    torch.manual_seed(0)
    base = ToyLoss()
    runs = []
    for cls in (TrainStep, GraphedTrainStep):
        net = copy.deepcopy(base)
        named = dict(net.named_parameters())
        opt = build_optimizer(named, OptimConfig(learning_rate=0.05, weight_decay=0.1), torch.device("cpu"), fused=True)
        step = cls(net, list(named.values()), opt, info=DistInfo(), autocast=torch.autocast("cpu", enabled=False),
                   max_grad_norm=1.0)  # fmt: skip
        history = []
        for s in range(5):
            batches = _batches(s)
            if poison == "no_targets" and s == 2:
                for b in batches:
                    b["labels"][:] = IGNORE_INDEX
            elif poison != "no_targets":
                setattr(net, poison, s == 2)
            out = step(batches)
            history.append((float(out.loss_sum), float(out.grad_norm), bool(out.bad)))
        runs.append((history, _state(net, opt)))
    (h_ref, s_ref), (h_got, s_got) = runs
    assert [b for *_, b in h_got] == [b for *_, b in h_ref] == [False, False, True, False, False]
    finite = [v for x, y, b in h_ref if not b for v in (x, y)]
    assert [v for x, y, b in h_got if not b for v in (x, y)] == pytest.approx(finite, rel=1e-6)
    for k in s_ref:
        torch.testing.assert_close(s_got[k].float(), s_ref[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    assert {float(v) for k, v in s_got.items() if k.endswith(".step")} == {4.0}


class _NoReadBack(TorchDispatchMode):
    """Fails on the operations that make a GPU wait for the host or the host for the GPU (not capturable)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            raise AssertionError(f"{func} reads a device value back inside the captured part of the step")
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i
                                   is not None):  # fmt: skip
            raise AssertionError("boolean indexing inside the captured part of the step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_captured_parts_read_nothing_back(method: str) -> None:
    """What graphs A and B hold (forward + backward, clip + AdamW + zeroing) never asks the device for a value."""
    net, params, opt = _setup(method, torch.device("cpu"))
    step = GraphedTrainStep(net, params, opt, info=DistInfo(), autocast=torch.autocast("cpu", enabled=False),
                            max_grad_norm=1.0)  # fmt: skip
    (batches,) = _steps(True, 1)
    step(batches)  # the optimizer state exists (as after the eager warm-up run)
    for batch in batches:
        slot = step._slot(batch)
        with _NoReadBack():
            step._forward_backward(slot)
    with _NoReadBack():
        step._update()
    assert all(float(p.grad.abs().sum()) == 0.0 for p in params)  # zeroed in place for the next step


def test_target_slots_and_packed_inputs() -> None:
    assert [target_slots(n, 10_000) for n in (0, 1, 256, 257, 700)] == [256, 256, 256, 512, 768]
    assert target_slots(300, 290) == 290 and TARGET_BUCKET == 256
    (batches,) = _steps(True, 1, grad_accum=1)
    batch = batches[0]
    spec, slots, flat = pack_batch(batch)
    index, targets = loss_targets(batch["labels"])
    b, s = batch["labels"].shape
    assert slots == target_slots(index.numel(), b * (s - 1)) and slots > index.numel()
    from glmtune.train.graph_step import _Slot

    inputs = _Slot(spec, slots, flat).inputs()
    for name, _, dtype in spec:
        assert inputs[name] == batch[name] if dtype is int else torch.equal(inputs[name], batch[name]), name
    # the runs' bound is a host int: part of the key (a graph each), not of the flat buffer
    assert inputs["max_seqlen"] == batch["max_seqlen"] == 48
    other, _, other_flat = pack_batch({**batch, "max_seqlen": 32})
    assert other != spec and torch.equal(other_flat, flat) and _Slot(other, slots, flat).inputs()["max_seqlen"] == 32
    n = index.numel()
    assert torch.equal(inputs["target_index"][:n], index) and torch.equal(inputs["targets"][:n], targets)
    assert set(inputs["target_index"][n:].tolist()) == {0} and set(inputs["targets"][n:].tolist()) == {IGNORE_INDEX}


def test_use_cuda_graph_decisions(tmp_path) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ok = {"compiled": True, "single": True, "precision": "bf16", "recompute_reads_rng": False, "quantized": False}
    assert use_cuda_graph("auto", cuda, **ok) is True
    assert use_cuda_graph("auto", cpu, **ok) is False
    assert use_cuda_graph(True, cpu, **ok) is True  # plain calls on the CPU
    assert use_cuda_graph(False, cuda, **ok) is False
    for change in ({"compiled": False}, {"single": False}, {"precision": "fp16"}, {"recompute_reads_rng": True},
                   {"quantized": True}):  # fmt: skip
        assert use_cuda_graph("auto", cuda, **{**ok, **change}) is False, change
    for change in ({"single": False}, {"precision": "fp16"}, {"recompute_reads_rng": True}):
        with pytest.raises(ValueError, match="train.cuda_graph=true"):
            use_cuda_graph(True, cuda, **{**ok, **change})
    model = tiny_model(tmp_path)
    for text, value in [("on", True), ("off", False), ("true", True), ("auto", "auto")]:
        assert small_config(model, tmp_path, f"train.cuda_graph={text}").train.cuda_graph == value
    with pytest.raises(ConfigError, match="train.cuda_graph"):
        small_config(model, tmp_path, "train.cuda_graph=sometimes")


FAST = ("train.max_steps=4", "data.max_samples=12", "train.grad_accum=2", "log.every_steps=2")


@pytest.mark.parametrize("case", [("method.name=lora", "data.packing=true"),
                                  ("method.name=ptuning", "method.pre_seq_len=4", "data.packing=false")])  # fmt: skip
def test_trainer_with_cuda_graph_gives_the_same_losses(tmp_path, case) -> None:
    model = tiny_model(tmp_path)
    common = (*FAST, "method.dropout=0.0", *case) if "lora" in case[0] else (*FAST, *case)
    plain = run(small_config(model, tmp_path / "plain", *common, "train.cuda_graph=false"))
    graphed = run(small_config(model, tmp_path / "graphed", *common, "train.cuda_graph=true"))
    assert [s for s, _ in graphed.losses] == [1, 2, 3, 4]
    assert [v for _, v in graphed.losses] == pytest.approx([v for _, v in plain.losses], rel=1e-5)


# ---- on the GPU: real capture and replay --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("method", "packing"), [("lora", True), ("ptuning", False)])
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_step_on_cuda_matches_train_step(method: str, packing: bool, compiled: bool) -> None:
    """Captured and replayed (eager blocks, and compiled ones with FlexAttention): TrainStep's numbers."""
    torch._dynamo.reset()
    ref, got, step = _compare(method, packing, torch.device("cuda"), compiled=compiled, n=6)
    torch._dynamo.reset()
    assert step.capture and step.graphs >= 2  # graph A (per key) and the update were captured and replayed
    _assert_same(ref, got, rel=1e-4 if compiled else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_replays_draw_new_dropout_masks() -> None:
    """lr 0: the weights stay; the same batch replayed gives a different loss at each step with dropout (the
    generator's offset advances per replay), the same one without."""
    losses = {}
    for dropout in (0.1, 0.0):
        METHODS["lora"]["dropout"] = dropout
        try:
            net, params, opt = _setup("lora", torch.device("cuda"), lr=0.0)
        finally:
            METHODS["lora"]["dropout"] = 0.1
        step = GraphedTrainStep(net, params, opt, info=DistInfo(device=torch.device("cuda")),
                                autocast=torch.autocast("cuda", enabled=False))  # fmt: skip
        (batches,) = _steps(True, 1)
        losses[dropout] = [float(step(batches).loss_sum) for _ in range(5)]
        assert step.ready(batches[0])
        # the copies go through each key's two pinned buffers, kept, not a pinned allocation a step
        assert [len(slot.staging.hosts) for slot in step.slots.values()] == [2]
        assert all(host.is_pinned() for host in next(iter(step.slots.values())).staging.hosts)
    assert len(set(losses[0.1][2:])) == 3  # steps 3-5 are replays
    assert losses[0.0][2:] == pytest.approx([losses[0.0][0]] * 3, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_trainer_on_cuda_with_cuda_graph(tmp_path) -> None:
    """The trainer end to end on the GPU (compiled blocks, FlexAttention on packed rows): graphed = not graphed."""
    torch._dynamo.reset()
    model = tiny_model(tmp_path)
    common = ("train.device=cuda", "train.compile=true", "method.dropout=0.0", "data.packing=true", *FAST,
              "train.max_steps=6")  # fmt: skip
    plain = run(small_config(model, tmp_path / "plain", *common, "train.cuda_graph=false"))
    graphed = run(small_config(model, tmp_path / "graphed", *common, "train.cuda_graph=true"))
    torch._dynamo.reset()
    assert [v for _, v in graphed.losses] == pytest.approx([v for _, v in plain.losses], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graphed_step_with_the_host_ahead_reads_each_steps_batch() -> None:
    """The host queues steps faster than the GPU runs them (a GPU sleep before each, nothing read back until the
    end): every micro-batch still reaches its own step (a pinned staging buffer is rewritten only after the copy out
    of it ran), so the losses equal TrainStep's."""
    steps = _steps(True, 8)  # two micro-batches of one key a step: each key's two buffers are reused many times
    device = torch.device("cuda")
    losses = []
    for cls in (TrainStep, GraphedTrainStep):
        net, params, opt = _setup("lora", device)
        step = cls(net, params, opt, info=DistInfo(device=device), autocast=torch.autocast("cuda", enabled=False),
                   max_grad_norm=0.5)  # fmt: skip
        torch.manual_seed(7)  # the same dropout draws
        outs = []
        for batches in steps:
            torch.cuda._sleep(5_000_000)  # a few ms of GPU time queued before each step: the host runs ahead
            outs.append(step(batches))
        losses.append([float(o.loss_sum) / float(o.targets) for o in outs])  # (read back only now)
    assert len(set(losses[0])) == len(steps)  # different batches, different losses
    # Float32 on the GPU, the two steps' sums in different orders, 8 optimizer steps on: the last losses drift ~1e-5
    # apart (1.4e-5 measured on an H200). A step that read another step's batch would land nearer that step's loss.
    for i, got in enumerate(losses[1]):
        assert min(range(len(steps)), key=lambda j: abs(got - losses[0][j])) == i
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
