"""``train.cuda_graph``: the whole optimizer step replayed as CUDA graphs (one process, fixed batch shapes).

A LoRA step on short batches launches ~1,200 kernels for ~35 ms of GPU work: launching them one by one leaves the
GPU idle about half the time. :class:`GraphedTrainStep` computes what :class:`~glmtune.train.step.TrainStep` does,
as two kinds of graph: graph A (one per input key) = forward + backward of one micro-batch, accumulating into the
gradients and the loss sum; graph B = gradient norm and clipping, fused AdamW (skipping a non-finite step on the
device, as TrainStep) and the gradients zeroed. A step is one host-to-device copy per micro-batch (from pinned
buffers kept per key) and a few replays.

What makes a step replayable:
- static inputs: a micro-batch's model inputs and loss positions travel in one flat int64 buffer per key (key =
  the inputs' names and shapes, the host ints such as the runs' bound ``max_seqlen``, and the padded target
  count); the loss positions (``target_index``, ``targets``) are padded to a multiple of ``TARGET_BUCKET`` (at most
  the rows' capacity) with index 0 and target ``IGNORE_INDEX``, which take no loss and give no gradient;
- host numbers as device tensors: the loss scale (1 / target tokens of the step), a "no targets" flag and each
  parameter group's learning rate sit in one small float32 buffer, copied once per step; the optimizer reads its
  lr from there (the param groups keep their Python floats for the scheduler and the checkpoints);
- persistent state: the gradients exist from the start (zeros, never set to None) and are accumulated in place,
  the loss sum is a float64 tensor; graph B writes (loss sum, grad norm, skipped) into a result vector that each
  step clones (the trainer reads steps back later);
- all graphs share one memory pool: they never run at the same time and none reads another one's temporaries.

A new key runs eagerly first (on the capture stream: compilation, lazy initialisations and the optimizer state
happen there), is captured on its second occurrence (logged) and replayed from then on. Dropout stays random: a
replay advances the CUDA generator's philox offset as the eager kernels would. On the CPU there are no graphs:
the same code runs as plain calls (the tests compare it with TrainStep there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from glmtune.templates import IGNORE_INDEX
from glmtune.train.distributed import DistInfo
from glmtune.train.loss import loss_targets
from glmtune.train.step import MODEL_INPUTS, StepOutput, host_counts

log = logging.getLogger(__name__)

TARGET_BUCKET = 256  # padded target counts are multiples of this (few keys per batch shape, little waste)
WARMUP_RUNS = 1  # eager runs of a key before it is captured


def use_cuda_graph(
    setting: str | bool,
    device: torch.device,
    *,
    compiled: bool,
    single: bool,
    precision: str,
    recompute_reads_rng: bool,
    quantized: bool,
) -> bool:
    """``train.cuda_graph`` (auto, true, false) for a run: auto = on with ``train.compile`` on CUDA in one process,
    in bf16/fp32, with an unquantized base and without activation checkpointing that saves/restores the RNG state
    (``recompute.reads_rng_state``: ``true``, or selective modes over modules with dropout; ``mlp`` over plain MLPs
    is fine); true where auto would refuse for a reason graphs cannot work around is an error. On the CPU ``true``
    runs the same step as plain calls."""
    if setting not in ("auto", True, False):
        raise ValueError(f"train.cuda_graph must be auto, true or false, got {setting!r}")
    if setting is False:
        return False
    blockers = {
        "several processes (DDP/FSDP)": not single,
        "train.precision=fp16 (its GradScaler reads the step back)": precision == "fp16",
        "train.gradient_checkpointing over modules that draw random numbers (their recomputation restores the RNG "
        "state; mlp over MLPs without dropout works)": recompute_reads_rng,
    }
    reasons = [why for why, hit in blockers.items() if hit]
    if setting is True:
        if reasons:
            raise ValueError(f"train.cuda_graph=true does not work with {', '.join(reasons)}; set it to auto or false")
        return True
    return device.type == "cuda" and compiled and not reasons and not quantized


def target_slots(n: int, capacity: int) -> int:
    """The padded length of ``n`` loss positions in a batch of ``capacity`` possible ones."""
    return min(capacity, max(TARGET_BUCKET, -(-n // TARGET_BUCKET) * TARGET_BUCKET))


@dataclass
class _Staging:
    """Pinned host buffers (``TURNS``, used in turn) that feed one device buffer, so a step's copy needs no pinned
    allocation (a new pinned block costs ``cudaHostAlloc``, which can stall the host). A buffer is written again
    once the copy out of it, ``TURNS`` copies into this device buffer earlier, has run (its event)."""

    TURNS = 2
    hosts: list[torch.Tensor] = field(default_factory=list)
    events: list[torch.cuda.Event] = field(default_factory=list)
    turn: int = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst`` (CUDA) = ``src`` (host, dst's numel and dtype), without waiting for the copy."""
        if len(self.hosts) < self.TURNS:
            self.hosts.append(torch.empty(src.shape, dtype=src.dtype, pin_memory=True))
            self.events.append(torch.cuda.Event())
        else:
            self.events[self.turn].synchronize()  # (the device is at most a step or two behind: rarely a wait)
        host = self.hosts[self.turn]
        host.copy_(src)
        dst.copy_(host.view(dst.shape), non_blocking=True)
        self.events[self.turn].record(torch.cuda.current_stream(dst.device))  # (the copy runs on dst's device)
        self.turn = (self.turn + 1) % self.TURNS


@dataclass
class _Slot:
    """Static buffers (and graph A) of one key: ``flat`` holds every input, ``spec`` says where."""

    spec: tuple[tuple[str, tuple[int, ...] | int, torch.dtype | type], ...]  # host ints: (name, value, int)
    slots: int  # padded target count
    flat: torch.Tensor  # int64 (sum of numels + 2 * slots,) on the device
    graph: torch.cuda.CUDAGraph | None = None
    runs: int = 0
    staging: _Staging = field(default_factory=_Staging)

    def inputs(self) -> dict[str, torch.Tensor | int]:
        """The loss module's keyword arguments, as views of (or casts from) ``flat``, and the host ints."""
        out, at = {}, 0
        for name, shape, dtype in self.spec:
            if dtype is int:  # (max_seqlen: part of the key, a constant of the captured graph)
                out[name] = shape
                continue
            n = math.prod(shape)
            t = self.flat[at : at + n].view(shape)
            out[name] = t if dtype == torch.long else t.to(dtype)  # (context: bool, cast inside the graph)
            at += n
        out["target_index"] = self.flat[at : at + self.slots]
        out["targets"] = self.flat[at + self.slots : at + 2 * self.slots]
        return out


def pack_batch(batch: dict[str, torch.Tensor | int]) -> tuple[tuple, int, torch.Tensor]:
    """(spec, padded target count, flat int64 host tensor) of a collated host batch; its host ints (max_seqlen)
    are in the spec as (name, value, int)."""
    spec, parts = [], []
    for name in MODEL_INPUTS:
        t = batch.get(name)
        if isinstance(t, int):
            spec.append((name, t, int))
        elif t is not None:
            spec.append((name, tuple(t.shape), t.dtype))
            parts.append(t.reshape(-1).long())
    labels = batch["labels"]
    index, targets = loss_targets(labels)
    slots = target_slots(index.numel(), labels.shape[0] * max(labels.shape[1] - 1, 0))
    pad = slots - index.numel()
    parts += [index, index.new_zeros(pad), targets, targets.new_full((pad,), IGNORE_INDEX)]
    return tuple(spec), slots, torch.cat(parts)


class GraphedTrainStep:
    """One optimizer step as CUDA graph replays (see the module docstring); returns TrainStep's StepOutput.

    Needs a fused AdamW (it reads ``found_inf`` and a tensor lr on the device) and one process without a
    GradScaler. ``capture``: use CUDA graphs (default: on a CUDA device); off, every part runs as a plain call.
    """

    def __init__(
        self,
        net: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        info: DistInfo,
        autocast: AbstractContextManager,
        max_grad_norm: float | None = None,
        capture: bool | None = None,
    ) -> None:
        if info.enabled:
            raise ValueError("the CUDA-graph step runs in one process (DDP/FSDP use TrainStep)")
        if not optimizer.defaults.get("fused"):
            raise ValueError("the CUDA-graph step needs a fused AdamW (build_optimizer(..., fused=True))")
        self.net, self.params, self.optimizer = net, params, optimizer
        self.autocast, self.max_grad_norm = autocast, max_grad_norm
        self.device = device = info.device
        self.capture = device.type == "cuda" if capture is None else capture
        for p in params:  # persistent gradients, accumulated in place (graphs keep their addresses)
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in params]
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.result = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, grad norm, skipped
        n_groups = len(optimizer.param_groups)
        self.scalars = torch.zeros(2 + n_groups, dtype=torch.float32, device=device)  # scale, no targets, lrs
        self.lrs = [self.scalars[2 + i] for i in range(n_groups)]
        self.scalars_staging = _Staging()
        self.slots: dict[tuple, _Slot] = {}
        self.update_graph: torch.cuda.CUDAGraph | None = None
        self.update_runs = 0
        self.stream = torch.cuda.Stream(device) if self.capture else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    # ---- one step -------------------------------------------------------------------------------------------
    def __call__(self, batches: list[dict[str, torch.Tensor]]) -> StepOutput:
        n, tokens = host_counts(batches)
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        scalars = torch.tensor([1.0 / max(n, 1), float(n == 0), *lrs], dtype=torch.float32)
        self._to_device(self.scalars, scalars, self.scalars_staging)
        for batch in batches:
            slot = self._slot(batch)
            self._run(slot, lambda slot=slot: self._forward_backward(slot))
        self._run(None, self._update)
        res = self.result.clone()
        return StepOutput(loss_sum=res[0], targets=float(n), tokens=float(tokens), grad_norm=res[1], bad=res[2] > 0)

    def ready(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether a step on ``batch`` replays graphs only (its key and the update are captured)."""
        spec, slots, _ = pack_batch(batch)
        slot = self.slots.get((spec, slots))
        return self.capture and self.update_graph is not None and slot is not None and slot.graph is not None

    @property
    def graphs(self) -> int:
        """Graphs captured so far (the update's included)."""
        return sum(s.graph is not None for s in self.slots.values()) + (self.update_graph is not None)

    # ---- the two bodies (captured, or run as they are) ---------------------------------------------------------
    def _forward_backward(self, slot: _Slot) -> None:
        with self.autocast:
            s = self.net(**slot.inputs())  # summed token loss of the micro-batch
        (s * self.scalars[0]).backward()  # (scale: 1 / target tokens of the step)
        self.loss_sum += s.detach()

    def _update(self) -> None:
        opt = self.optimizer
        if self.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(self.grads)
        bad = ~torch.isfinite(self.loss_sum) | (self.scalars[1] > 0) | ~torch.isfinite(grad_norm)
        saved = [(g["lr"], g.get("capturable", False)) for g in opt.param_groups]
        capturing = self.capture and torch.cuda.is_current_stream_capturing()
        for g, lr in zip(opt.param_groups, self.lrs, strict=True):
            g["lr"], g["capturable"] = lr, capturing  # the fused kernel reads lr from the device
        opt.found_inf = bad.float()  # the fused kernel leaves parameters and state as they are when set
        try:
            opt.step()
        finally:
            del opt.found_inf
            for g, (lr, cap) in zip(opt.param_groups, saved, strict=True):
                g["lr"], g["capturable"] = lr, cap
        self.result.copy_(torch.stack([self.loss_sum, grad_norm.double(), bad.double()]))
        self.loss_sum.zero_()
        torch._foreach_zero_(self.grads)

    # ---- keys, copies, capture ---------------------------------------------------------------------------------
    def _slot(self, batch: dict[str, torch.Tensor]) -> _Slot:
        """The key's slot (made on first sight), with ``batch`` copied into its buffer."""
        spec, slots, flat = pack_batch(batch)
        slot = self.slots.get((spec, slots))
        if slot is None:
            slot = _Slot(spec, slots, torch.empty(flat.numel(), dtype=torch.long, device=self.device))
            self.slots[(spec, slots)] = slot
        self._to_device(slot.flat, flat, slot.staging)
        return slot

    def _to_device(self, dst: torch.Tensor, src: torch.Tensor, staging: _Staging) -> None:
        """Copy a host tensor into a static buffer without waiting (through ``staging``'s pinned buffers on CUDA)."""
        if dst.device.type == "cuda":
            staging.copy(dst, src)
        else:
            dst.copy_(src)

    def _run(self, slot: _Slot | None, body: Callable[[], None]) -> None:
        """Replay the graph of ``slot`` (None: the update), or run ``body`` eagerly, or capture it first."""
        if not self.capture:
            body()
            return
        graph = self.update_graph if slot is None else slot.graph
        runs = self.update_runs if slot is None else slot.runs
        if graph is None and runs >= WARMUP_RUNS:
            graph = self._capture(body, "the update" if slot is None else _describe(slot))
            if slot is None:
                self.update_graph = graph
            else:
                slot.graph = graph
        if graph is not None:
            graph.replay()
            return
        stream, current = self.stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            body()
        current.wait_stream(stream)
        if slot is None:
            self.update_runs += 1
        else:
            slot.runs += 1

    def _capture(self, body: Callable[[], None], what: str) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                body()
        except RuntimeError as e:  # something in the step synchronises with the host or is not capturable
            raise RuntimeError(f"capturing {what} as a CUDA graph failed ({str(e).splitlines()[0]}); "
                               "train.cuda_graph=false runs the step without graphs") from e  # fmt: skip
        log.info("captured a CUDA graph of %s (%d graphs)", what, self.graphs + 1)
        return graph


def _describe(slot: _Slot) -> str:
    shapes = ", ".join(f"{name} {shape if dtype is int else 'x'.join(map(str, shape))}"
                       for name, shape, dtype in slot.spec if name != "labels")  # fmt: skip
    return f"a micro-batch ({shapes}; {slot.slots} loss positions)"
