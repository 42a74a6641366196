"""glmtune's side of the training benchmark: its model, method, optimizer, loss and step, from the pieces the
trainer is made of (``LMLoss``, ``trainable_parameters``, ``build_optimizer``, and the trainer's own step object
``glmtune.train.step.TrainStep`` where it exists; before it, a copy of the loop's step: autocast forward, backward
of the token-normalised loss, loss read back, clipping, AdamW, zero_grad). The learning-rate schedule is left out
(a host-side multiply per step).

Batches come from the trainer's own ``Batcher`` (``make_batcher``), so they have its padding side, bucketed
widths and fixed packed shapes, whatever those are when the benchmark runs. ``compile``: None follows the
trainer's default (``train.compile``), True/False force it; the trainer's ``compile_blocks`` where it exists,
else each transformer block wrapped in ``torch.compile`` here (``GlmtuneStep.compile_mode`` says which).

``cuda_graph``: None follows ``train.cuda_graph``'s default (on with compiled blocks on CUDA: the step replayed as
CUDA graphs, ``GraphedTrainStep``), True/False force it; ``prepare(batches)`` captures every batch key before timing.
``loss_recompute``: None follows ``train.loss_recompute``'s default, or forces it. ``fused_swiglu``: None follows
``compile_blocks``' default (ChatGLM's MLPs on glmtune's fused SwiGLU ops when compiled on CUDA), True/False force it.
``compile_options``: Inductor options for ``compile_blocks`` (None: its default). ``kv_repeat``: how ChatGLM's
attentions repeat K/V heads for flash varlen (``attention.KVRepeat``: ``recompute``, compiled backwards keep the
grouped heads and repeat them again instead of the copies; ``fused``, glmtune's Triton repeat ops); None follows
``compile_blocks``' default (fused on CUDA with Triton; uncompiled: the model as built), a value is set before
compiling (``compile_blocks(kv_repeat=...)``, else ``chatglm.set_kv_repeat``).

This is the one file to adapt when the trainer changes: ``GlmtuneStep.__call__`` must stay one optimizer step of
the real trainer on one micro-batch.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from benchlib import random_fill

from glmtune.adapters import build_method
from glmtune.models import build_model
from glmtune.models.config import GLMConfig
from glmtune.templates import Encoded, get_template
from glmtune.train.config import DataConfig, OptimConfig
from glmtune.train.data import Batcher, make_batcher
from glmtune.train.distributed import DistInfo
from glmtune.train.loop import LMLoss, build_optimizer, trainable_parameters
from glmtune.train.loss import count_targets
from glmtune.train.recompute import apply_checkpointing, reads_rng_state

try:
    from glmtune.train.step import TrainStep
except ImportError:  # the trainer before its step became an object
    TrainStep = None
try:
    from glmtune.train import compile as train_compile
except ImportError:  # before train.compile
    train_compile = None
try:
    from glmtune.train.graph_step import GraphedTrainStep, use_cuda_graph
except ImportError:  # before train.cuda_graph
    GraphedTrainStep = use_cuda_graph = None
try:
    from glmtune.models.chatglm import use_fused_swiglu
except ImportError:  # before the fused SwiGLU ops
    use_fused_swiglu = None
try:
    from glmtune.train.step import step_batch
except ImportError:  # before the trainer dropped the runs the attention does not read
    step_batch = None
try:
    from glmtune.models.attention import KVRepeat
    from glmtune.models.chatglm import set_kv_repeat
except ImportError:  # before the K/V repeat setting
    KVRepeat = set_kv_repeat = None


def default_compile(device: torch.device) -> bool:
    """Whether the trainer compiles by default on ``device``."""
    if train_compile is None:
        return False
    return train_compile.use_compile(OptimConfig().compile, device)


def glmtune_batcher(
    examples: list[Encoded], *, packing: bool, pack_length: int | None, batch_size: int, seed: int, fixed_shapes: bool
) -> Batcher:
    """The trainer's batcher over ``examples`` (ChatGLM3 template, pad id 0, one process, no accumulation)."""
    kw = {"fixed_shapes": fixed_shapes} if "fixed_shapes" in inspect.signature(make_batcher).parameters else {}
    return make_batcher(examples, cfg=DataConfig(packing=packing, pack_length=pack_length), batch_size=batch_size,
                        grad_accum=1, world_size=1, seed=seed, tokenizer=SimpleNamespace(pad_id=0),
                        template=get_template("chatglm3"), **kw)  # fmt: skip


def glmtune_model(cfg: GLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """glmtune's model for ``cfg`` (ChatGLM3 rotary), random weights drawn on ``device``, in ``dtype``."""
    model = build_model(cfg, device=device, dtype=dtype, generation="chatglm3")
    random_fill(model, device, dtype, seed=seed)
    return model


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.encoder.layers


class GlmtuneStep:
    """One optimizer step of glmtune on a collated batch (a dict from glmtune's collate functions)."""

    def __init__(
        self,
        cfg: GLMConfig,
        *,
        method: str,
        options: dict,
        device: torch.device,
        precision: torch.dtype,
        gradient_checkpointing: bool | str = False,
        recompute_layers: int | None = None,
        compile: bool | None = None,
        lr: float = 3e-4,
        max_grad_norm: float = 1.0,
        model: torch.nn.Module | None = None,
        cuda_graph: bool | None = None,
        loss_recompute: bool | str | None = None,
        fused_swiglu: bool | None = None,
        compile_options: dict | None = None,
        kv_repeat: KVRepeat | None = None,
        lora_input_saved: bool = False,
        recompute_kv: bool = False,
    ) -> None:
        self.device = device
        # as the loop: full fine-tuning keeps float32 weights (autocast computes in bf16), adapters a bf16 base;
        # ``model``: one built by the caller (a quantized base, bench/quant_train.py)
        self.model = model if model is not None else glmtune_model(cfg, device, torch.float32 if method == "full"
                                                                   else precision)  # fmt: skip
        self.method = build_method(method, dict(options))
        self.method.setup(self.model)
        if lora_input_saved:  # compiled LoRA keeps A's input for the backward, as before fd2374d
            for module in self.model.modules():
                if hasattr(module, "recompute_input"):
                    module.recompute_input = False
        named = trainable_parameters(self.method, self.model)
        self.params = list(named.values())
        # train.gradient_checkpointing as the trainer applies it (true, or the selective modes mlp / half)
        layers = {} if recompute_layers is None else {"layers": recompute_layers}  # train.recompute_layers
        apply_checkpointing(self.model, gradient_checkpointing, **layers)
        opt = OptimConfig(learning_rate=lr, max_grad_norm=max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)
        # train.loss_recompute: None = its default (the LMLoss of the day's), or forced
        kw = {} if loss_recompute is None else {"recompute": loss_recompute}
        self.net = LMLoss(self.model, opt.loss_chunk_tokens, **kw)
        self.inputs = set(inspect.signature(self.net.forward).parameters)
        if fused_swiglu and use_fused_swiglu is None:
            raise RuntimeError("this glmtune has no fused SwiGLU ops (chatglm.use_fused_swiglu)")
        if kv_repeat is not None and set_kv_repeat is None:
            raise RuntimeError("this glmtune has no K/V repeat setting (attention.KVRepeat, chatglm.set_kv_repeat)")
        self.compile_mode = None
        if default_compile(device) if compile is None else compile:
            if train_compile is not None:
                accepts = inspect.signature(train_compile.compile_blocks).parameters
                kw = {k: v for k, v in (("fused_swiglu", fused_swiglu), ("options", compile_options),
                                        ("kv_repeat", kv_repeat)) if v is not None and k in accepts}  # fmt: skip
                if recompute_kv:  # train.recompute_kv, as the trainer hands it to compile_blocks
                    if "recompute_kv" not in accepts:
                        raise RuntimeError("this glmtune has no train.recompute_kv (compile_blocks(recompute_kv=))")
                    kw["recompute_kv"] = True
                if fused_swiglu is not None and "fused_swiglu" not in accepts and use_fused_swiglu is not None:
                    use_fused_swiglu(self.model, fused_swiglu)
                train_compile.compile_blocks(self.model, **kw)
                self.compile_mode = "train.compile (compile_blocks)"
            else:
                for block in _blocks(self.model):
                    block.compile()
                self.compile_mode = "each transformer block torch.compile'd by the bench"
        else:
            if fused_swiglu:
                use_fused_swiglu(self.model)
            if kv_repeat is not None:
                set_kv_repeat(self.model, kv_repeat)
        # attentions with grouped K/V heads whose compiled backward repeats them again, and those repeating them with
        # glmtune's Triton ops (as set: by kv_repeat or compile_blocks' default)
        grouped = [m.kv_repeat for m in self.model.modules()
                   if hasattr(m, "kv_repeat") and getattr(m, "n_kv", 0) != getattr(m, "n_head", 0)]  # fmt: skip
        self.kv_recomputed_attentions = sum(r.recompute for r in grouped)
        self.kv_fused_repeats = sum(r.fused for r in grouped)
        # MLPs running the fused SwiGLU ops (0 without Triton, or switched off)
        self.fused_swiglu_mlps = sum(bool(getattr(m, "fused_swiglu", False)) for m in self.model.modules())
        # LoRA layers whose compiled backward recomputes A's input (glmtune from fd2374d on, unless lora_input_saved)
        self.lora_inputs_recomputed = sum(bool(getattr(m, "recompute_input", False)) for m in self.model.modules())
        # train.cuda_graph as the trainer decides it (auto: with compiled blocks on CUDA; a caller's model, e.g. a
        # quantized base, counts as quantized), or forced
        self.graphed = False
        if use_cuda_graph is not None:
            self.graphed = use_cuda_graph("auto" if cuda_graph is None else cuda_graph, device,
                                          compiled=self.compile_mode is not None, single=True,
                                          precision="fp32" if precision == torch.float32 else "bf16",
                                          recompute_reads_rng=reads_rng_state(self.model, gradient_checkpointing,
                                                                              **layers),
                                          quantized=model is not None)  # fmt: skip
        self.optimizer = build_optimizer(named, opt, device, **({"fused": True} if self.graphed else {}))
        self.train_step = None
        info = DistInfo(device=device)
        if self.graphed:
            self.train_step = GraphedTrainStep(self.net, self.params, self.optimizer, info=info,
                                               autocast=self.autocast, max_grad_norm=max_grad_norm)  # fmt: skip
        elif TrainStep is not None:
            self.train_step = TrainStep(self.net, self.params, self.optimizer, info=info, autocast=self.autocast,
                                        max_grad_norm=max_grad_norm)  # fmt: skip
        self.model.train()

    def trainer_batch(self, batch: dict[str, torch.Tensor | int]) -> dict[str, torch.Tensor | int]:
        """``batch`` as the trainer hands it to its step (``step.step_batch``: without the runs where this model's
        attention does not read them); call it after building (the attention backend is chosen when compiling)."""
        return batch if step_batch is None else step_batch(batch, self.model)

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """With CUDA graphs: steps on ``batches`` until a step on any of them only replays graphs (each batch
        key runs eagerly once and is captured at its second step), so no capture falls into the timed steps.
        Returns the steps it ran. ``pass_peaks_gib``: the peak allocated memory of each pass over ``batches``
        (first: the eager runs, with the compiles; then the captures), each measured from a reset."""
        done = 0
        self.pass_peaks_gib: list[float] = []
        self.call_peaks_gib: dict[str, float] = {}  # the largest peak of an eager call and of a capturing one
        # of the call with the largest peak: allocated at its start, at the end of the forward (the saved
        # activations on top), the forward's peak and the call's (GiB)
        self.peak_call_memory: dict[str, float] = {}
        if not self.graphed or not self.train_step.capture:
            return done
        gib = 2**30
        at_forward: dict[str, float] = {}

        def forward_memory(*_) -> None:
            at_forward["forward_end"] = torch.cuda.memory_allocated(self.device) / gib
            at_forward["forward_peak"] = torch.cuda.max_memory_allocated(self.device) / gib

        hook = self.net.register_forward_hook(forward_memory)
        for _ in range(3):
            torch.cuda.reset_peak_memory_stats(self.device)
            ran, peak = 0, 0.0
            for batch in batches:
                if not self.train_step.ready(batch):
                    graphs = self.train_step.graphs
                    torch.cuda.reset_peak_memory_stats(self.device)
                    start = torch.cuda.memory_allocated(self.device) / gib
                    self(batch)
                    call = torch.cuda.max_memory_allocated(self.device) / gib
                    kind = "capture" if self.train_step.graphs > graphs else "eager"
                    self.call_peaks_gib[kind] = max(self.call_peaks_gib.get(kind, 0.0), call)
                    if call > self.peak_call_memory.get("peak", 0.0):
                        self.peak_call_memory = {"kind": kind, "start": start, **at_forward, "peak": call}
                    peak = max(peak, call)
                    ran += 1
            if ran:
                self.pass_peaks_gib.append(peak)
            done += ran
        hook.remove()
        return done

    def __call__(self, batch: dict[str, torch.Tensor]):
        """One optimizer step on ``batch``; returns the mean token loss (a device tensor, or a float)."""
        if self.train_step is not None:
            out = self.train_step([batch])
            return out.loss_sum / max(float(out.targets), 1.0)
        n = count_targets(batch["labels"])
        inputs = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in batch.items() if k in self.inputs}  # fmt: skip
        with self.autocast:
            loss_sum = self.net(**inputs)
        (loss_sum / max(n, 1)).backward()
        loss = float(loss_sum.detach()) / max(n, 1)  # the loop read the loss back every step (non-finite check)
        float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss
