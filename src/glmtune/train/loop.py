"""The training loop: a small ``Trainer`` whose pieces (setup, step, evaluation, save) are read top to bottom.

``train(config)`` loads the base model folder in the training precision, lets the method set itself up (frozen
weights stay in bf16/fp16, trainable parameters and their optimizer state are float32), encodes the data, and
runs optimizer steps. Each step takes its micro-batches from :class:`glmtune.train.data.Batcher` (a pure function
of the step number) and runs them through :class:`glmtune.train.step.TrainStep` (gradients accumulated, the loss
normalised by the target tokens of the whole global batch, clipping, AdamW). A non-finite loss or gradient skips
the step with a warning; ``train.max_bad_steps`` of them in a row stop the run, the last good checkpoint kept.

The step's numbers stay on the device: the trainer reads them back (all pending steps at once) only where it must
look at them: when it logs (every ``log.every_steps``), evaluates, may save, at the end, or for ``on_step``.

Every ``eval.every_steps`` the dev loss (and every ``eval.generate_every_steps`` the generation metrics) is
computed; a better value of ``eval.metric`` saves a checkpoint marked best, and ``eval.patience`` evaluations
without improvement stop the run. Checkpoints (every ``save.every_steps``, at the best, at the end) hold
everything an exact resume needs: ``train(config, resume=True)`` continues with the very loss sequence the run
would have had. At the end the run folder's ``model/`` gets the best (else the last) weights.

Several processes (torchrun) train as ``train.distributed`` says (``train/fsdp.py``): DDP wraps the loss module
(``wrap``); under FSDP2 the model is built on meta, sharded (``distribute``), and only then does each rank load
its shards of the weights, so no GPU holds a whole copy; its checkpoints keep the trainable state sharded
(``state/dcp/``); every rank then takes part in writing the method's output, which rank 0 writes.

Where a variant hooks in: ``load_model`` (a quantized base), ``distribute`` and ``wrap`` (DDP, FSDP2),
``TrainStep`` (the step), ``evaluate`` and ``save``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from glmtune.adapters.base import Method
from glmtune.io import NoSpaceError, writing
from glmtune.pretrained import load_pretrained
from glmtune.train import distributed, evaluation, fsdp
from glmtune.train.compile import compile_blocks, eager, use_compile
from glmtune.train.config import TrainConfig
from glmtune.train.data import dev_batches, load_datasets, make_batcher
from glmtune.train.distributed import DistInfo, barrier
from glmtune.train.evaluation import EvalHook
from glmtune.train.graph_step import GraphedTrainStep, use_cuda_graph
from glmtune.train.interrupt import (
    StopRequest,
    TrainInterrupted,
    lost_peer_message,
    no_space_message,
    resume_command,
)
from glmtune.train.metrics import MetricsWriter
from glmtune.train.recompute import apply_checkpointing, reads_rng_state
from glmtune.train.resume_check import check_same_data, data_fingerprint, data_record
from glmtune.train.run_folder import (
    check_output_dir,
    drop_previous,
    remove_leftovers,
    restore_previous,
    run_info,
    save_with_tokenizer,
    set_aside,
    write_run_files,
)
from glmtune.train.schedule import LRSchedule, build_scheduler, warmup_steps_for
from glmtune.train.setup import (
    build_optimizer,
    check_template,
    count_parameters,
    method_description,
    resolve_precision,
    seed_everything,
    trainable_parameters,
)
from glmtune.train.state import (
    Progress,
    check_trainable,
    checkpoint_dir,
    latest_checkpoint,
    load_trainable,
    prune_checkpoints,
    read_checkpoint,
    remove_stale,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_sharded_checkpoint,
)
from glmtune.train.step import LMLoss, StepOutput, TrainStep, step_batch

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
__all__ = ["LMLoss", "TrainError", "TrainResult", "Trainer", "build_optimizer", "train", "trainable_parameters"]


class TrainError(RuntimeError):
    """The run had to stop (out of memory, repeated non-finite losses); the message says what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps done in total
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the steps this call ran
    best_metric: float | None = None
    best_step: int | None = None
    stop_reason: str = "done"  # "done" | "early_stopping" (a Ctrl-C raises TrainInterrupted)
    model_dir: Path | None = None


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    method: Method | None = None,
    eval_hook: EvalHook | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train as ``cfg`` says, in ``cfg.output_dir``; ``resume=True`` continues the run from its last checkpoint
    (``force=True``: even when the training data changed since, with a warning).

    ``method``: a ready method object instead of ``build_method(cfg.method.name, cfg.method.options)``.
    ``eval_hook(model) -> {metric: value}``: generation metrics, run on rank 0 every ``eval.generate_every_steps``
    (default: ROUGE/BLEU on the dev set when that is set). ``on_step(step, {"loss", "lr"})`` runs on every rank
    after each step's bookkeeping (it makes the trainer read the loss back every step). A Ctrl-C stops the run
    after the current step with a checkpoint and raises :class:`TrainInterrupted`; a full disk is a ``TrainError``.
    """
    info = distributed.setup(cfg.train.device, cpu_collectives=cfg.train.fsdp_offload)
    together = False  # whether every rank reaches the teardown (then it waits for all of them)
    trainer = None
    try:
        distributed.check_same_config(info, cfg.to_yaml())
        trainer = Trainer(cfg, info, resume=resume, force=force, method=method, eval_hook=eval_hook, on_step=on_step)
        trainer.setup()
        result = trainer.run()
        together = True
        return result
    except TrainInterrupted:
        together = True  # the ranks stopped after the same step
        raise
    except torch.cuda.OutOfMemoryError as e:
        raise oom_error(e, cfg) from e
    except NoSpaceError as e:
        run_dir = Path(cfg.output_dir)
        raise TrainError(no_space_message(e, run_dir, latest_checkpoint(run_dir), info.world_size,
                                          info.local_world_size)) from e  # fmt: skip
    except RuntimeError as e:  # (torch.distributed's errors are RuntimeErrors)
        if isinstance(e, TrainError) or not (info.enabled and distributed.is_peer_failure(e)):
            raise
        run_dir = Path(cfg.output_dir)
        raise TrainError(lost_peer_message(e, info.rank, run_dir, latest_checkpoint(run_dir), info.world_size,
                                           info.local_world_size)) from e  # fmt: skip
    finally:
        trainer = None  # noqa: F841 (its model's DDP/FSDP state holds the process group: freed before the group ends)
        distributed.teardown(info, together=together)


def oom_error(e: BaseException, cfg: TrainConfig) -> TrainError:
    t, d = cfg.train, cfg.data
    return TrainError(
        f"out of GPU memory ({str(e).splitlines()[0]}). Lower train.batch_size (now {t.batch_size}; raise "
        f"train.grad_accum to keep the global batch), the lengths (data.max_source_length {d.max_source_length}, "
        f"data.max_target_length {d.max_target_length}, data.pack_length {d.pack_length}) or "
        f"train.loss_chunk_tokens ({t.loss_chunk_tokens}), or set train.gradient_checkpointing=true"
    )


class _Window:
    """Token-weighted train loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.targets, self.tokens, self.start = 0.0, 0.0, 0.0, time.perf_counter()

    def add(self, loss_sum: float, targets: float, tokens: float) -> None:
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / self.targets if self.targets else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def to_host(values: list[torch.Tensor | float]) -> list[float]:
    """Python floats of a mix of numbers and device scalars, with one read-back for all the tensors."""
    at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    out = [float(v) if not isinstance(v, torch.Tensor) else 0.0 for v in values]
    if at:
        got = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in at]).tolist()
        for i, v in zip(at, got, strict=True):
            out[i] = v
    return out


class Trainer:
    """One run. ``setup()`` builds everything (model, data, optimizer, resumed state), ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, *, resume: bool = False, force: bool = False,
                 method: Method | None = None, eval_hook: EvalHook | None = None,
                 on_step: StepCallback | None = None) -> None:  # fmt: skip
        self.cfg, self.info, self.resume, self.force = cfg, info, resume, force
        self.method, self.eval_hook, self.on_step = method, eval_hook, on_step
        self.run_dir = Path(cfg.output_dir)
        self.mode = fsdp.choose_mode(cfg.train.distributed, method.name if method else cfg.method.name, info.world_size)
        self.sharded = self.mode == "fsdp"
        self.progress = Progress()
        self._rng_to_restore: dict | None = None
        self._pending: list[tuple[int, StepOutput, float]] = []  # steps not yet read back: (step, numbers, lr)
        self._window = _Window()
        self._last: dict[str, float] = {}  # lr and grad_norm of the last step read back

    # ---- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that can fail on the user's files (model, data, checkpoint) runs before the run folder is
        touched: with ``overwrite`` the previous run is set aside only then, and put back if the start fails."""
        self.check_run_dir()
        self.load_model()
        self.distribute()
        self.compile()
        self.load_data()
        self.build_optimization()
        if self.resume:
            self.restore()
        self.replace_previous()
        try:
            self.write_run_files()
            self.start()
        except BaseException:
            if self.info.is_main and self.previous is not None:
                restore_previous(self.run_dir)
            raise

    def check_run_dir(self) -> None:
        """Refuse a folder that is not ours to write; remove what writes of a killed run left behind."""
        run_dir, info = self.run_dir, self.info
        check_output_dir(run_dir, resume=self.resume, overwrite=self.cfg.overwrite)
        barrier(info)
        if info.is_main:
            remove_leftovers(run_dir)
            remove_stale(run_dir)
        barrier(info)

    def replace_previous(self) -> None:
        """``overwrite``: the previous run's files into ``.previous-run/``, deleted once this run's model exists."""
        self.previous = None
        if not self.resume and self.cfg.overwrite and self.info.is_main:
            self.previous = set_aside(self.run_dir)
        barrier(self.info)

    def load_model(self) -> None:
        """The base model in the training precision, the method set up on it (same seed on every rank). Under FSDP
        the base stays on meta (``distribute`` loads each rank's shards); only the method's own tensors are real."""
        cfg = self.cfg
        self.precision, self.amp_dtype = resolve_precision(cfg.train.precision, self.info.device)
        seed_everything(cfg.seed)
        if self.method is None:
            from glmtune.adapters import build_method

            self.method = build_method(cfg.method.name, dict(cfg.method.options))
        method = self.method
        if getattr(method, "base_model_name_or_path", "") is None:
            method.base_model_name_or_path = cfg.model  # written into PEFT's adapter_config.json
        full = method.name == "full"  # every weight trained: load in float32 rather than upcast a bf16 copy
        weights_dtype = torch.float32 if (self.precision == "fp32" or full) else self.amp_dtype
        from glmtune.pretrained import check_trainable_base

        # a frozen quantized base (quantize int8/int4/nf4, or a THUDM int4/int8 folder): lora and ptuning only
        quantize = check_trainable_base(cfg.model, method.name, cfg.quantize)
        # FSDP: the model is built on meta and each rank loads only its shards after sharding (``distribute``);
        # an nf4 base (torchao's tensors) loads whole first, and so does train.fsdp_offload for now (on the GPU the
        # sharded load left the root's embedding shard on the device, which CPUOffloadPolicy refuses)
        self.load_sharded = self.sharded and quantize != "nf4" and not cfg.train.fsdp_offload
        self.weights_dtype, self.quantized = weights_dtype, quantize != "none"
        device = "meta" if self.load_sharded else str(self.info.device)
        self.pretrained = load_pretrained(cfg.model, dtype=weights_dtype, device=device, generation=cfg.generation,
                                          quantize=quantize)  # fmt: skip
        self.model, self.tokenizer = self.pretrained.model, self.pretrained.tokenizer
        self.template = check_template(self.pretrained, cfg.template)
        if self.load_sharded:
            before = fsdp.tensor_names(self.model)
            with fsdp.new_tensors_on(self.info.device):  # the method's own tensors initialised as without FSDP
                method.setup(self.model)
            self.renames = fsdp.renamed(before, self.model)
        else:
            method.setup(self.model)
        self.named = trainable_parameters(method, self.model)
        apply_checkpointing(self.model, cfg.train.gradient_checkpointing, cfg.train.recompute_layers)
        n_train, n_all = count_parameters(self.model, self.named)
        log.info("method %s: trainable parameters %s of %s (%.4f%%); precision %s", method.name, f"{n_train:,}",
                 f"{n_all:,}", 100.0 * n_train / max(n_all, 1), self.precision)  # fmt: skip

    def distribute(self) -> None:
        """The loss module the step runs; under FSDP the model sharded (blocks, then the loss module as the root),
        each rank's shards loaded into it (``load_model`` left the base on meta) and the trainable parameters taken
        anew (sharding replaces them)."""
        info, t = self.info, self.cfg.train
        self.net = LMLoss(self.model, t.loss_chunk_tokens, recompute=t.loss_recompute)
        if self.mode != "single":
            log.info("%d processes: %s (train.distributed %s)", info.world_size, self.mode, t.distributed)
        if not self.sharded:
            if t.fsdp_offload:
                log.warning("train.fsdp_offload is for FSDP runs (several processes); this run keeps everything on "
                            "%s", info.device)  # fmt: skip
            return
        fsdp.check_supported(precision=self.precision, offload=t.fsdp_offload, device=info.device)
        compute = None if self.precision == "fp32" else self.amp_dtype
        fsdp.shard(
            self.net,
            self.model,
            info,
            compute_dtype=compute,
            offload=t.fsdp_offload,
            keep_gathered=t.fsdp_keep_gathered,
        )
        if self.load_sharded:
            fsdp.load_shards(self.net, self.model, self.cfg.model, dtype=self.weights_dtype, device=info.device,
                             quantized=self.quantized, renames=self.renames, offload=t.fsdp_offload)  # fmt: skip
        self.named = fsdp.sharded_parameters(self.model, list(self.named))

    def compile(self) -> None:
        """``train.compile``: the transformer blocks compiled in place (names unchanged), fixed batch shapes;
        ``train.cuda_graph``: the step replayed as CUDA graphs (``graph_step.py``)."""
        t = self.cfg.train
        self.compiled = use_compile(t.compile, self.info.device)
        if self.compiled:
            compile_blocks(self.model, recompute_kv=t.recompute_kv)
        elif t.recompute_kv:
            log.info("train.recompute_kv: nothing to recompute without train.compile")
        reads_rng = reads_rng_state(self.model, t.gradient_checkpointing, t.recompute_layers)
        self.graphed = use_cuda_graph(t.cuda_graph, self.info.device, compiled=self.compiled,
                                      single=self.mode == "single" and not self.info.enabled,
                                      precision=self.precision, quantized=self.quantized,
                                      recompute_reads_rng=reads_rng)  # fmt: skip
        if self.graphed:
            log.info("train.cuda_graph: each step replayed as CUDA graphs (captured per batch shape)")

    def write_run_files(self) -> None:
        if self.info.is_main:
            desc = run_info(base_model=self.cfg.model, generation=self.pretrained.generation,
                            template=self.template.name, method=method_description(self.method, self.cfg),
                            dtype=self.precision)  # fmt: skip
            write_run_files(self.run_dir, desc, self.cfg.to_yaml())

    def load_data(self) -> None:
        """Encoded data (rank 0 fills the tokenized cache first), the training batcher and this rank's dev batches."""
        cfg, info, t = self.cfg, self.info, self.cfg.train
        cache_dir = cfg.data.cache_dir or str(self.run_dir / "tokenized")

        def load(run_dir: Path | None = None):  # rank 0 lists the left-out records in the run folder
            return load_datasets(cfg.data, self.tokenizer, self.template, seed=cfg.seed, cache_dir=cache_dir,
                                 max_length=self.pretrained.config.seq_length, run_dir=run_dir)  # fmt: skip

        datasets = load(self.run_dir) if info.is_main else None
        barrier(info)
        if not info.is_main:
            datasets = load()
        self.datasets = datasets
        self.batcher = make_batcher(datasets.train, cfg=cfg.data, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                    world_size=info.world_size, seed=cfg.seed, tokenizer=self.tokenizer,
                                    template=self.template, fixed_shapes=self.compiled or self.graphed)  # fmt: skip
        self.total = t.max_steps or t.epochs * self.batcher.steps_per_epoch
        self.dev = dev_batches(datasets.dev, batch_size=cfg.eval.batch_size, rank=info.rank, world_size=info.world_size,
                               tokenizer=self.tokenizer, template=self.template)  # fmt: skip
        if self.sharded and datasets.dev:  # every rank runs as many dev batches (each gathers weights with the others)
            per_rank = math.ceil(math.ceil(len(datasets.dev) / cfg.eval.batch_size) / info.world_size)
            spare = dev_batches(datasets.dev[:1], batch_size=1, rank=0, world_size=1, tokenizer=self.tokenizer,
                                template=self.template)[0]  # fmt: skip
            self.dev = fsdp.even_batches(self.dev, per_rank, spare)
        self.has_dev = bool(datasets.dev)
        self.fingerprint = data_fingerprint(datasets.train)
        log.info("%d steps (%d per epoch, global batch %d %s)", self.total, self.batcher.steps_per_epoch,
                 self.batcher.global_batch, "packed rows" if cfg.data.packing else "examples")  # fmt: skip

    def build_optimization(self) -> None:
        t, device = self.cfg.train, self.info.device
        self.optimizer = build_optimizer(self.named, t, device, fused=True if self.graphed else None)
        warmup = warmup_steps_for(self.total, t.warmup_steps, t.warmup_ratio)
        self.schedule = LRSchedule(t.scheduler, self.total, warmup, t.min_lr_ratio)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.autocast = torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.precision != "fp32")

    def restore(self) -> None:
        """The state of the run's last checkpoint: trainable weights, optimizer, schedule, scaler, counters, RNG."""
        run_dir, info = self.run_dir, self.info
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None:
            log.warning("%s has no complete checkpoint yet: starting from step 0", run_dir)
            return
        ck = read_checkpoint(ckpt_path)
        check_same_data(ck.trainer["data"], self.data_record(), ckpt_path, force=self.force)
        self.load_trainable(ck, optimizer=True)
        self.scheduler.load_state_dict(ck.trainer["scheduler"])
        self.scheduler.lr_lambdas[0] = self.schedule  # this run's schedule (max_steps may have been raised)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)
        if self.scaler is not None and ck.trainer.get("scaler"):
            self.scaler.load_state_dict(ck.trainer["scaler"])
        self.progress = ck.progress
        rngs = ck.trainer["rng"]
        if len(rngs) == info.world_size:
            self._rng_to_restore = rngs[info.rank]
        else:
            log.warning("checkpoint has RNG states of %d processes, this run has %d: dropout will differ", len(rngs),
                        info.world_size)  # fmt: skip
        log.info("resuming %s from step %d (%s)", run_dir, self.progress.step, ckpt_path.name)

    def load_trainable(self, ck, *, optimizer: bool) -> None:
        """A checkpoint's trainable weights (and optimizer state) into this run, sharded or not: a sharded
        checkpoint is resharded for this run's processes."""
        if ck.sharded:
            fsdp.load_checkpoint_state(ck.path, self.model, self.named, self.optimizer if optimizer else None)
            return
        if self.sharded:  # a checkpoint of one process or of DDP, resumed sharded
            check_trainable(self.named, ck.trainable, ck.path)
            saved = ck.trainer["optimizer"] if optimizer else None
            fsdp.load_whole_state(self.model, self.named, ck.trainable, self.optimizer if optimizer else None, saved)
            return
        load_trainable(self.named, ck.trainable, ck.path)
        if optimizer:
            self.optimizer.load_state_dict(ck.trainer["optimizer"])

    def wrap(self) -> nn.Module:
        """The module the step runs: DDP around the model + loss (FSDP: already sharded, ``distribute``)."""
        return distributed.wrap(self.net, self.info) if self.mode == "ddp" else self.net

    def start(self) -> None:
        """Last things before the first step: the wrapped step, the metrics writer, the eval hook, the RNG."""
        cfg, info = self.cfg, self.info
        params = list(self.named.values())
        if self.graphed:
            self.step_fn = GraphedTrainStep(self.net, params, self.optimizer, info=info, autocast=self.autocast,
                                            max_grad_norm=cfg.train.max_grad_norm)  # fmt: skip
        else:
            step_class = fsdp.ShardedTrainStep if self.sharded else TrainStep
            self.step_fn = step_class(self.wrap(), params, self.optimizer, info=info, autocast=self.autocast,
                                      scaler=self.scaler, max_grad_norm=cfg.train.max_grad_norm)  # fmt: skip
        resume_step = self.progress.step if self.resume else None
        self.writer = MetricsWriter(self.run_dir, enabled=info.is_main, tensorboard=cfg.log.tensorboard,
                                    plot=cfg.log.plot, resume_step=resume_step)  # fmt: skip
        if self.sharded and (self.eval_hook is not None or cfg.eval.generate_every_steps):
            log.warning("generation metrics during training are not computed under FSDP (rank 0 cannot generate "
                        "alone from a sharded model); evaluate model/ after the run with glmtune eval")  # fmt: skip
            self.eval_hook = None
        elif self.eval_hook is None and info.is_main:
            self.eval_hook = evaluation.generation_hook(cfg, self.pretrained, self.template, self.datasets.dev_samples)
            if self.eval_hook is None and cfg.eval.generate_every_steps:
                log.warning("eval.generate_every_steps is set but there is no dev set: no generation metrics")
        gen_every = cfg.eval.generate_every_steps if (self.eval_hook is not None or not info.is_main) else None
        gen_every = None if self.sharded else gen_every
        self.gen_every = distributed.broadcast_object(info, gen_every) if info.enabled else gen_every
        seed_everything(cfg.seed + info.rank)  # training randomness (dropout) differs between ranks
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with StopRequest(self.info) as stop:
            self.loop(stop)
        return self.finish()

    def loop(self, stop: StopRequest) -> None:
        """The steps; a first Ctrl-C (``stop``) ends them after the current one with a checkpoint."""
        cfg, info, progress = self.cfg, self.info, self.progress
        self.model.train()
        self.result = TrainResult(run_dir=self.run_dir, steps=progress.step)
        self.bar = tqdm(total=self.total, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (info.is_main and cfg.log.progress))  # fmt: skip
        self._window.reset()
        while progress.step < self.total:
            self.train_step()
            step, is_last = progress.step, progress.step == self.total
            due_eval = self._eval_due(step, is_last)
            every = cfg.save.every_steps
            may_save = bool(every) and step % every == 0
            due_log = step % cfg.log.every_steps == 0 or is_last
            synced = due_log or due_eval or may_save or is_last or self.on_step is not None
            if synced:
                self.read_back()
            if due_log:
                self.log_train()
            self.bar.update(1)

            # evaluate, keep the best, stop early (time spent here does not count in tokens/s)
            paused = time.perf_counter()
            results = self.evaluate(is_last) if due_eval else {}
            improved = False
            if results:
                self.writer.log(step, "eval", results)
                improved = evaluation.improved(progress, results, cfg.eval.metric)
                if info.is_main:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                    log.info("step %d eval: %s%s", step, shown, " (best)" if improved else "")
            stop_early = bool(cfg.eval.patience) and progress.evals_without_improvement >= cfg.eval.patience
            periodic = may_save and progress.bad_steps == 0  # never mid-streak
            saved = improved or is_last or stop_early or periodic
            if saved:
                self.save(step)
            if results or is_last:
                self.writer.plot()
            self._window.start += time.perf_counter() - paused
            if self.on_step is not None:
                self.on_step(step, {"loss": self.result.losses[-1][1], "lr": self._last["lr"]})
            if stop_early:
                self.result.stop_reason = "early_stopping"
                log.info("early stopping at step %d: no improvement of eval %s in %d evaluations", step,
                         cfg.eval.metric, cfg.eval.patience)  # fmt: skip
                break
            if not is_last and stop.due(synced):
                self.stop_interrupted(saved)
        self.bar.close()

    def stop_interrupted(self, saved: bool) -> None:
        """Ctrl-C: a checkpoint of the step just done (unless one was written), then :class:`TrainInterrupted`."""
        step = self.progress.step
        self.read_back()
        if not saved:
            self.save(step)
        self.writer.plot()
        self.bar.close()
        self.writer.close()
        ckpt = checkpoint_dir(self.run_dir, step)
        raise TrainInterrupted(step, ckpt if ckpt.is_dir() else latest_checkpoint(self.run_dir),
                               resume_command(self.run_dir, self.info.world_size,
                                              self.info.local_world_size))  # fmt: skip

    def train_step(self) -> None:
        """One optimizer step on the batches of step ``progress.step``; its numbers are kept for ``read_back``."""
        progress, batcher = self.progress, self.batcher
        step = progress.step
        batches = [step_batch(batcher.collate(units), self.model)
                   for units in batcher.step_units(step, self.info.rank)]  # fmt: skip
        lr = self.optimizer.param_groups[0]["lr"]
        out = self.step_fn(batches)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        progress.step += 1
        progress.epoch, progress.position = batcher.position(progress.step)
        self._pending.append((progress.step, out, lr))

    def read_back(self) -> None:
        """Read the pending steps' numbers from the device (one synchronisation), update the counters, and stop the
        run when ``train.max_bad_steps`` non-finite steps came in a row."""
        if not self._pending:
            return
        flat: list[torch.Tensor | float] = []
        for _, out, _ in self._pending:
            flat += [out.loss_sum, out.targets, out.tokens, out.grad_norm, out.bad]
        values = to_host(flat)
        pending, self._pending = self._pending, []
        progress = self.progress
        for i, (step, _, lr) in enumerate(pending):
            loss_sum, targets, tokens, grad_norm, bad = values[5 * i : 5 * i + 5]
            loss = loss_sum / targets if targets else float("nan")
            self.result.losses.append((step, loss))
            self._window.add(loss_sum, targets, tokens)
            progress.tokens += int(tokens)
            self._last = {"lr": lr, "grad_norm": grad_norm}
            if not bad:
                progress.bad_steps = 0
                continue
            progress.bad_steps += 1
            log.warning("step %d: non-finite %s; step skipped (%d in a row)", step,
                        "loss" if not math.isfinite(loss) else "gradients", progress.bad_steps)  # fmt: skip
            if progress.bad_steps >= self.cfg.train.max_bad_steps:
                last = latest_checkpoint(self.run_dir)
                self.bar.close()
                self.writer.close()
                raise TrainError(
                    f"stopped at step {step}: {progress.bad_steps} non-finite losses in a row "
                    f"(train.max_bad_steps). The last good checkpoint is {last or 'none (no checkpoint yet)'}. "
                    "Lower train.learning_rate, use train.precision=bf16 or fp32, or check the data."
                )

    def log_train(self) -> None:
        cfg, info, w, step = self.cfg, self.info, self._window, self.progress.step
        lr = self._last["lr"]
        values = {"loss": w.loss, "lr": lr, "tokens_per_s": w.tokens_per_s,
                  "epoch": step / self.batcher.steps_per_epoch, "grad_norm": self._last["grad_norm"]}  # fmt: skip
        self.writer.log(step, "train", values)
        self.bar.set_postfix_str(f"loss {w.loss:.4f} lr {lr:.2e} tok/s {w.tokens_per_s:,.0f}", refresh=False)
        if not cfg.log.progress and info.is_main:
            log.info("step %d/%d loss %.4f lr %.3e tok/s %.0f", step, self.total, w.loss, lr, w.tokens_per_s)
        w.reset()

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _eval_due(self, step: int, is_last: bool) -> bool:
        every = self.cfg.eval.every_steps
        loss_due = self.has_dev and ((every and step % every == 0) or is_last)
        gen_due = bool(self.gen_every) and (step % self.gen_every == 0 or is_last)
        return bool(loss_due or gen_due)

    def evaluate(self, is_last: bool) -> dict[str, float]:
        """The dev loss and (rank 0's) generation metrics due at this step, shared by every rank."""
        results: dict[str, float] = {}
        with eager():  # shapes vary from batch to batch: the compiled blocks run eagerly
            self._evaluate(results, is_last)  # (under FSDP evaluate_loss reshards every unit after its forwards)
        return results

    def _evaluate(self, results: dict[str, float], is_last: bool) -> None:
        cfg, info, step = self.cfg, self.info, self.progress.step
        if self.has_dev and ((cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or is_last):
            results["loss"] = evaluation.evaluate_loss(self.net, self.dev, info, self.autocast)
        if self.gen_every and (step % self.gen_every == 0 or is_last):
            scores = None
            if info.is_main:
                self.model.eval()
                with self.autocast, torch.no_grad():
                    scores = {k: float(v) for k, v in self.eval_hook(self.model).items()}
                self.model.train()
            results.update(distributed.broadcast_object(info, scores) if info.enabled else scores)

    # ---- saving -----------------------------------------------------------------------------------------------
    def save_model(self, out_dir: Path) -> None:
        """What the method saves (an adapter, a prefix, or the whole model) into ``out_dir``. Sharded: every rank
        calls it (the weights are gathered) and rank 0 writes."""
        model, files = self.model, self.tokenizer.files
        if self.sharded:
            fsdp.save_method_output(self.method, model, self.named, out_dir, config=model.config,
                                    tokenizer_files=files, write=self.info.is_main)  # fmt: skip
            return
        self.method.save(model, out_dir, config=model.config, tokenizer_files=files)

    def save(self, step: int) -> None:
        """A checkpoint of this step (rank 0 writes it, with every rank's RNG state; sharded: every rank writes its
        shard); older ones pruned."""
        info, progress = self.info, self.progress
        rngs = distributed.gather_objects(info, rng_state())
        trainer = None
        if info.is_main:
            trainer = {
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rngs,
                "data": self.data_record(),
            }
        path = checkpoint_dir(self.run_dir, step)
        if self.sharded:
            sharded = fsdp.checkpoint_state(self.model, self.named, self.optimizer)
            with writing(path):
                write_sharded_checkpoint(path, info=info, save_model=self.save_model, sharded=sharded, trainer=trainer,
                                         progress=progress)  # fmt: skip
        elif info.is_main:
            trainer["optimizer"] = self.optimizer.state_dict()
            with writing(path):
                write_checkpoint(path, save_model=self.save_model, trainable=dict(self.named), trainer=trainer,
                                 progress=progress)  # fmt: skip
        if info.is_main:
            keep = {progress.best_step} if progress.best_step is not None else set()
            prune_checkpoints(self.run_dir, self.cfg.save.keep_last, keep)
        barrier(info)

    def data_record(self) -> dict:
        """What a checkpoint records of the training data (checked on resume)."""
        b = self.batcher
        return data_record(units=len(b.units), global_batch=b.global_batch, steps_per_epoch=b.steps_per_epoch,
                           world_size=self.info.world_size, fingerprint=self.fingerprint)  # fmt: skip

    def finish(self) -> TrainResult:
        """The best weights (else the last) into ``<run>/model``; the result."""
        cfg, info, progress, run_dir = self.cfg, self.info, self.progress, self.run_dir
        if progress.best_step is not None and progress.best_step != progress.step:
            best_dir = checkpoint_dir(run_dir, progress.best_step)
            if best_dir.is_dir():
                self.load_trainable(read_checkpoint(best_dir), optimizer=False)
            else:
                log.warning("best checkpoint %s is missing; the final model is the last state", best_dir)
        model_dir = run_dir / "model"
        if info.is_main:
            with writing(model_dir):
                save_with_tokenizer(self.save_model, model_dir, self.tokenizer.files)
        elif self.sharded:
            self.save_model(model_dir)  # this rank's part of the gathering (rank 0 writes)
        if info.is_main:
            drop_previous(run_dir)  # an overwritten run's files, kept until now
            self.writer.plot()
            log.info("run folder %s: final model in %s%s", run_dir, model_dir,
                     f" (best eval {cfg.eval.metric} {progress.best_metric:.4f} at step {progress.best_step})"
                     if progress.best_step is not None else "")  # fmt: skip
        self.writer.close()
        barrier(info)
        result = self.result
        result.steps = progress.step
        result.best_metric, result.best_step = progress.best_metric, progress.best_step
        result.model_dir = model_dir
        return result
