"""One optimizer step, with no host synchronisation on a GPU.

The micro-batches of a step (collated on the host) go to the device without waiting; the loss of each is
normalised by the number of target tokens of the whole global batch (counted on the host from the CPU labels, and
all-reduced as a device tensor under DDP), so one process and N processes, or any split into micro-batches,
compute the same gradient. The summed loss, the gradient norm and the non-finite check stay on the device: a
non-finite loss or gradient skips the update there (the fused AdamW reads the flag as ``found_inf``, as under a
GradScaler). The trainer reads the numbers back only when it logs, evaluates or saves.

On the CPU (foreach AdamW) the skip is decided on the host, where reading a flag costs nothing; fp16 reads the loss
flag once per step (its GradScaler skips non-finite gradients by itself).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from glmtune.models.masks import takes_runs
from glmtune.train import compile as train_compile
from glmtune.train import distributed
from glmtune.train.distributed import DistInfo
from glmtune.train.loss import compiled_chunk_loss, count_targets, indexed_lm_loss, loss_targets

# the batch keys the loss module takes: ids, labels and the sequence layout's tensors (data/collate.py), and
# max_seqlen, a host int (the bound on the runs of cu_seqlens)
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids", "context", "cu_seqlens",
                "max_seqlen")  # fmt: skip
# the collator's runs of packed 1-D rows (masks.packed_runs), which only the "varlen" attention backend reads
RUN_INPUTS = ("cu_seqlens", "max_seqlen")


# train.loss_recompute auto keeps the compiled chunk loss's logits for the backward only while they take at most this
# (2 bytes x vocab a target in bf16: ~8,000 ChatGLM3 or ~3,500 GLM-4 targets a micro-batch); more targets are
# recomputed chunk by chunk, so a long-sequence batch never needs more memory than before the compiled loss
KEEP_LOGITS_BYTES = 1 << 30


class LMLoss(nn.Module):
    """model + chunked loss in one module, so that DDP sees a forward pass: returns the summed token loss.

    ``target_index`` / ``targets`` (from :func:`glmtune.train.loss.loss_targets` on the host) spare the device the
    question of how many targets ``labels`` holds; without them they are computed from ``labels``.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, recompute: bool | str = "auto") -> None:
        super().__init__()
        if recompute not in ("auto", True, False):
            raise ValueError(f"train.loss_recompute must be auto, true or false, got {recompute!r}")
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.recompute = recompute  # the loss chunks' logits recomputed in the backward (train.loss_recompute)
        # (several processes, blocks compiled): constant for a run, asked at the first loss_kind (the first forward),
        # so that the trainer may compile the blocks after building this module
        self._run_facts: tuple[bool, bool] | None = None

    def loss_kind(self, device: torch.device, kept_bytes: int = 0) -> tuple[bool, bool]:
        """(recompute, compiled) of the chunked loss: with compiled blocks on CUDA in one process and
        ``recompute`` false, or auto while the kept logits (``kept_bytes``: targets x vocab x element size) take at
        most ``KEEP_LOGITS_BYTES``, the chunk loss is compiled and kept for the backward (no float32 logits in
        memory, one output-layer product less); else the eager chunk loss, recomputed unless ``recompute`` is
        false (auto: recomputed). Whether several processes run and whether the blocks are compiled is read once,
        at the first call, and kept (both stay as they are for a run)."""
        if self._run_facts is None:
            several = torch.distributed.is_available() and torch.distributed.is_initialized()
            self._run_facts = several, train_compile.blocks_compiled(self.model)
        several, blocks_compiled = self._run_facts
        fits = self.recompute is False or kept_bytes <= KEEP_LOGITS_BYTES
        compiled = self.recompute is not True and fits and device.type == "cuda" and not several and blocks_compiled
        return (not compiled and self.recompute is not False), compiled

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, segment_ids=None, context=None,
                cu_seqlens=None, max_seqlen=None, target_index=None, targets=None) -> torch.Tensor:  # fmt: skip
        # attention_mask is not passed on: segment_ids carry the padding wherever a real token could see it
        h = self.model.hidden_states(input_ids, position_ids=position_ids, segment_ids=segment_ids,
                                     context=context, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # fmt: skip
        if target_index is None:
            target_index, targets = loss_targets(labels)
        out = self.model.output_embeddings()
        vocab = getattr(out, "out_features", None) or out.weight.shape[0]
        kept = target_index.numel() * vocab * h.element_size()  # (shapes: known without a sync)
        recompute, compiled = self.loss_kind(h.device, kept)
        chunk_loss = compiled_chunk_loss(train_compile.BACKEND) if compiled else None
        return indexed_lm_loss(h, target_index, targets, out, self.chunk_tokens, recompute, chunk_loss)


@dataclass
class StepOutput:
    """One optimizer step's numbers; tensors stay on the device until the trainer reads them."""

    loss_sum: torch.Tensor  # float64 (): summed token loss of the global batch
    targets: torch.Tensor | float  # target tokens of the global batch
    tokens: torch.Tensor | float  # real (non-padding) tokens of the global batch
    grad_norm: torch.Tensor  # float32 (): gradient norm before clipping
    bad: torch.Tensor  # bool (): non-finite loss or gradients; the update was skipped


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting: a copy to a GPU starts from pinned memory (from pageable memory the
    copy would wait for the GPU's queue to drain)."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def device_inputs(batch: dict[str, torch.Tensor | int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """The model inputs of a host batch on ``device`` (copies not waited for; host ints as they are), with the
    loss positions."""
    inputs = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
              if k in MODEL_INPUTS}  # fmt: skip
    index, targets = loss_targets(batch["labels"])
    inputs["target_index"] = to_device(index, device)
    inputs["targets"] = to_device(targets, device)
    return inputs


def reads_runs(model: nn.Module) -> bool:
    """Whether ``model``'s attention reads a batch's :data:`RUN_INPUTS`: the "varlen" backend on rows without a
    P-Tuning prefix (``masks.build_mask``); "sdpa", "flex" and prefixed rows build their masks from the segments."""
    n_prefix = model.n_prefix() if hasattr(model, "n_prefix") else 0
    return takes_runs(getattr(model, "attention_backend", ""), n_prefix=n_prefix)


def step_batch(batch: dict[str, torch.Tensor | int], model: nn.Module) -> dict[str, torch.Tensor | int]:
    """``batch`` as a step on ``model`` takes it: without the runs where the model's attention does not read them
    (the CUDA-graph step's key holds ``max_seqlen``: each new bound would cost a capture that buys nothing)."""
    if reads_runs(model) or not any(k in batch for k in RUN_INPUTS):
        return batch
    return {k: v for k, v in batch.items() if k not in RUN_INPUTS}


def host_counts(batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(target tokens, real tokens) of a step's micro-batches, counted from their host labels and masks."""
    return sum(count_targets(b["labels"]) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)


class TrainStep:
    """Forward, backward, clip and update for the micro-batches of one optimizer step (see the module docstring)."""

    def __init__(
        self,
        net: nn.Module,  # LMLoss, or the DDP wrapper around it
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        info: DistInfo,
        autocast: AbstractContextManager,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        self.net = net
        self.params = params
        self.optimizer = optimizer
        self.info = info
        self.autocast = autocast
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self.fused = bool(optimizer.defaults.get("fused"))

    def __call__(self, batches: list[dict[str, torch.Tensor]]) -> StepOutput:
        info, device = self.info, self.info.device
        targets, tokens, scale = self._global_counts(batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for k, batch in enumerate(batches):
            inputs = device_inputs(batch, device)
            with distributed.no_sync(self.net, sync=k == len(batches) - 1):
                with self.autocast:
                    s = self.net(**inputs)
                loss = s * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += s.detach()
        if info.enabled:
            distributed.all_reduce_(info, loss_sum)  # every rank takes the same decision below
        bad = ~torch.isfinite(loss_sum) | (targets == 0)  # no target in the whole batch: nothing to learn, skipped
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        if self.scaler is None:
            bad = bad | ~torch.isfinite(grad_norm)  # (fp16: the scaler skips non-finite gradients itself)
        self._update(bad)
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss_sum, targets, tokens, grad_norm, bad)

    def _global_counts(self, batches):
        """(targets, tokens, loss scale) of the global batch; the scale turns DDP's mean over ranks into the
        global token mean."""
        n_local, tokens_local = host_counts(batches)
        if not self.info.enabled:
            return float(n_local), float(tokens_local), 1.0 / max(float(n_local), 1.0)
        counts = to_device(torch.tensor([n_local, tokens_local], dtype=torch.float64), self.info.device)
        distributed.all_reduce_(self.info, counts)
        scale = (self.info.world_size / counts[0].clamp(min=1.0)).float()
        return counts[0], counts[1], scale

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.info.device)
        if self.max_grad_norm:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return torch.nn.utils.get_total_norm(grads)

    def _update(self, bad: torch.Tensor) -> None:
        opt = self.optimizer
        if self.scaler is not None:
            if not bool(bad):  # fp16 only: one read of the loss flag per step
                self.scaler.step(opt)
                self.scaler.update()
        elif self.fused:
            opt.found_inf = bad.float()  # the fused kernel leaves parameters and state as they are when set
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif not bool(bad):  # foreach AdamW (the CPU): the flag is on the host already
            opt.step()
