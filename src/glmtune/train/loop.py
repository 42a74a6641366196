"""The training loop: one function, read top to bottom.

``train(config)`` loads the base model folder in the training precision, lets the method set itself up (frozen
weights stay in bf16/fp16, trainable parameters and their optimizer state are float32), encodes the data, and
runs optimizer steps. Each step takes its micro-batches from :class:`glmtune.train.data.Batcher` (a pure function
of the step number), accumulates gradients over them (DDP all-reduces only on the last one), normalises the loss
by the number of target tokens of the whole global batch (so one process and N processes, or any split into
micro-batches, compute the same gradient), clips, and steps AdamW and the schedule. A non-finite loss skips the
step with a warning; ``train.max_bad_steps`` of them in a row stop the run, the last good checkpoint kept.

Every ``eval.every_steps`` the dev loss (and every ``eval.generate_every_steps`` the generation metrics) is
computed; a better value of ``eval.metric`` saves a checkpoint marked best, and ``eval.patience`` evaluations
without improvement stop the run. Checkpoints (every ``save.every_steps``, at the best, at the end) hold
everything an exact resume needs: ``train(config, resume=True)`` continues with the very loss sequence the run
would have had. At the end the run folder's ``model/`` gets the best (else the last) weights.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from glmtune.adapters.base import Method
from glmtune.pretrained import Pretrained, load_pretrained
from glmtune.templates import EncodeOptions, Message, Template, get_template
from glmtune.train import distributed
from glmtune.train.config import TrainConfig
from glmtune.train.data import dev_batches, encode_options, load_datasets, make_batcher
from glmtune.train.distributed import DistInfo, all_reduce_sum, barrier
from glmtune.train.loss import chunked_lm_loss, count_targets
from glmtune.train.metrics import MetricsWriter
from glmtune.train.run_folder import check_output_dir, clear_run, run_info, save_with_tokenizer, write_run_files
from glmtune.train.schedule import LRSchedule, build_scheduler, warmup_steps_for
from glmtune.train.state import (
    Progress,
    checkpoint_dir,
    latest_checkpoint,
    load_trainable,
    prune_checkpoints,
    read_checkpoint,
    remove_stale,
    rng_state,
    set_rng_state,
    write_checkpoint,
)

log = logging.getLogger(__name__)

EvalHook = Callable[[nn.Module], dict[str, float]]
StepCallback = Callable[[int, dict[str, float]], None]
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "attn_mask")


class TrainError(RuntimeError):
    """The run had to stop (out of memory, repeated non-finite losses); the message says what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps done in total
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the steps this call ran
    best_metric: float | None = None
    best_step: int | None = None
    stop_reason: str = "done"  # "done" | "early_stopping"
    model_dir: Path | None = None


class LMLoss(nn.Module):
    """model + chunked loss in one module, so that DDP sees a forward pass: returns the summed token loss."""

    def __init__(self, model: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, attn_mask=None) -> torch.Tensor:
        h = self.model.hidden_states(input_ids, attention_mask, position_ids, None, attn_mask)  # (b, s, H)
        loss_sum, _ = chunked_lm_loss(h, labels, self.model.output_embeddings(), self.chunk_tokens)
        return loss_sum


# ---- setup helpers --------------------------------------------------------------------------------------------
def resolve_precision(name: str, device: torch.device) -> tuple[str, torch.dtype]:
    """("bf16" | "fp16" | "fp32", compute dtype). auto: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got {name!r}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 but this GPU has no bfloat16; use precision=fp16 (or auto)")
    return name, dtypes[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_template(pretrained: Pretrained, name: str | None) -> Template:
    """The template to train with; one that does not fit the model folder is an error naming both."""
    name = name or pretrained.generation
    template = get_template(name)
    where = f"{pretrained.path} ({pretrained.generation})"
    if (name == "chatglm") != (pretrained.config.arch == "glm"):
        raise ValueError(f"template {name!r} does not fit the model folder {where}; leave `template` unset")
    try:
        template.encode_example(pretrained.tokenizer, [Message("user", "hi"), Message("assistant", "ok")],
                                EncodeOptions())  # fmt: skip
    except (KeyError, ValueError) as e:
        raise ValueError(f"template {name!r} cannot be used with the tokenizer of {where}: {e}") from None
    return template


def trainable_parameters(method: Method, model: nn.Module) -> dict[str, nn.Parameter]:
    """The method's trainable parameters (each once), in float32; anything else is frozen."""
    named: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in method.trainable_parameters(model):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            raise ValueError(f"method {method.name!r} lists {name!r} as trainable but it does not require grad")
        if p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (and so their optimizer state) in float32
        named[name] = p
    if not named:
        raise ValueError(f"method {method.name!r} left no trainable parameters")
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            log.debug("freezing %s (not listed by the method)", name)
            p.requires_grad_(False)
    return named


def build_optimizer(named: dict[str, nn.Parameter], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (every tensor of fewer than 2 dims)."""
    decay = [p for n, p in named.items() if p.ndim >= 2 and not n.endswith(".bias") and "norm" not in n.lower()]
    ids = {id(p) for p in decay}
    no_decay = [p for p in named.values() if id(p) not in ids]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")  # fmt: skip


def method_description(method: Method, cfg: TrainConfig) -> dict:
    opts = getattr(method, "options", None)
    values = asdict(opts) if is_dataclass(opts) and not isinstance(opts, type) else dict(cfg.method.options)
    return {"name": method.name, **values}


def _oom_error(e: BaseException, cfg: TrainConfig) -> TrainError:
    t, d = cfg.train, cfg.data
    return TrainError(
        f"out of GPU memory ({str(e).splitlines()[0]}). Lower train.batch_size (now {t.batch_size}; raise "
        f"train.grad_accum to keep the global batch), the lengths (data.max_source_length {d.max_source_length}, "
        f"data.max_target_length {d.max_target_length}, data.pack_length {d.pack_length}) or "
        f"train.loss_chunk_tokens ({t.loss_chunk_tokens}), or set train.gradient_checkpointing=true"
    )


# ---- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(net: LMLoss, batches: list[dict[str, torch.Tensor]], info: DistInfo, autocast) -> float:
    """Mean token loss over the dev batches of every rank."""
    was_training = net.training
    net.eval()
    total, n = 0.0, 0
    for batch in batches:
        inputs = {k: v.to(info.device) for k, v in batch.items() if k in MODEL_INPUTS}
        with autocast:
            total += float(net(**inputs))
        n += count_targets(batch["labels"])
    net.train(was_training)
    total, n = all_reduce_sum(info, [total, float(n)])
    return total / n if n else float("nan")


def _improved(progress: Progress, results: dict[str, float], metric: str) -> bool:
    """Update the best value and the early-stopping counter when ``metric`` was measured; True if it improved."""
    if metric not in results:
        return False
    value = results[metric]
    lower = metric == "loss" or metric.endswith("loss")
    best = progress.best_metric
    better = math.isfinite(value) and (best is None or (value < best if lower else value > best))
    if better:
        progress.best_metric, progress.best_step = value, progress.step
        progress.evals_without_improvement = 0
    else:
        progress.evals_without_improvement += 1
    return better


def _generation_hook(cfg: TrainConfig, pretrained: Pretrained, template: Template, dev_samples) -> EvalHook | None:
    if not cfg.eval.generate_every_steps or not dev_samples:
        return None
    from glmtune.data.encode import eval_examples
    from glmtune.evaluate.hook import make_generation_eval_hook
    from glmtune.generate import GenerationConfig

    examples = eval_examples(pretrained.tokenizer, template, dev_samples, encode_options(cfg.data))
    gen = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens, do_sample=False)
    return make_generation_eval_hook(pretrained.tokenizer, template, examples, gen,
                                     max_examples=cfg.eval.generate_examples,
                                     batch_size=cfg.eval.generate_batch_size)  # fmt: skip


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


# ---- the loop -------------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    method: Method | None = None,
    eval_hook: EvalHook | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train as ``cfg`` says, in ``cfg.output_dir``; ``resume=True`` continues the run from its last checkpoint.

    ``method``: a ready method object instead of ``build_method(cfg.method.name, cfg.method.options)``.
    ``eval_hook(model) -> {metric: value}``: generation metrics, run on rank 0 every ``eval.generate_every_steps``
    (default: ROUGE/BLEU on the dev set when that is set). ``on_step(step, {"loss", "lr"})`` runs on every rank
    after each step's bookkeeping.
    """
    info = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, info, resume=resume, method=method, eval_hook=eval_hook, on_step=on_step)
    except torch.cuda.OutOfMemoryError as e:
        raise _oom_error(e, cfg) from e
    finally:
        distributed.teardown(info)


def _train(cfg: TrainConfig, info: DistInfo, *, resume: bool, method: Method | None, eval_hook: EvalHook | None,
           on_step: StepCallback | None) -> TrainResult:  # fmt: skip
    run_dir = Path(cfg.output_dir)
    check_output_dir(run_dir, resume=resume, overwrite=cfg.overwrite)
    barrier(info)
    if info.is_main:
        if not resume and run_dir.is_dir() and cfg.overwrite:
            clear_run(run_dir)
        if resume:
            remove_stale(run_dir)
    barrier(info)

    # ---- model and method (same seed on every rank: identical initial adapters) ----
    precision, amp_dtype = resolve_precision(cfg.train.precision, info.device)
    seed_everything(cfg.seed)
    if method is None:
        from glmtune.adapters import build_method

        method = build_method(cfg.method.name, dict(cfg.method.options))
    if getattr(method, "base_model_name_or_path", "") is None:
        method.base_model_name_or_path = cfg.model  # written into PEFT's adapter_config.json
    full = method.name == "full"  # every weight trained: load in float32 rather than upcast a bf16 copy
    weights_dtype = torch.float32 if (precision == "fp32" or full) else amp_dtype
    pretrained = load_pretrained(cfg.model, dtype=weights_dtype, device=str(info.device), generation=cfg.generation)
    model, tokenizer = pretrained.model, pretrained.tokenizer
    template = check_template(pretrained, cfg.template)
    method.setup(model)
    named = trainable_parameters(method, model)
    if hasattr(model.transformer, "gradient_checkpointing"):
        model.transformer.gradient_checkpointing = cfg.train.gradient_checkpointing
    n_train = sum(p.numel() for p in named.values())
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log.info("method %s: trainable parameters %s of %s (%.4f%%); precision %s", method.name, f"{n_train:,}",
             f"{n_all:,}", 100.0 * n_train / max(n_all, 1), precision)  # fmt: skip

    if info.is_main:
        desc = run_info(base_model=cfg.model, generation=pretrained.generation, template=template.name,
                        method=method_description(method, cfg), dtype=precision)  # fmt: skip
        write_run_files(run_dir, desc, cfg.to_yaml())

    # ---- data (rank 0 fills the tokenized cache first) ----
    cache_dir = cfg.data.cache_dir or str(run_dir / "tokenized")
    datasets = None
    if info.is_main:
        datasets = load_datasets(cfg.data, tokenizer, template, seed=cfg.seed, cache_dir=cache_dir)
    barrier(info)
    if not info.is_main:
        datasets = load_datasets(cfg.data, tokenizer, template, seed=cfg.seed, cache_dir=cache_dir)
    t = cfg.train
    batcher = make_batcher(
        datasets.train,
        cfg=cfg.data,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        world_size=info.world_size,
        seed=cfg.seed,
        tokenizer=tokenizer,
        template=template,
    )
    total = t.max_steps or t.epochs * batcher.steps_per_epoch
    dev = dev_batches(datasets.dev, batch_size=cfg.eval.batch_size, rank=info.rank, world_size=info.world_size,
                      tokenizer=tokenizer, template=template)  # fmt: skip
    has_dev = bool(datasets.dev)
    log.info("%d steps (%d per epoch, global batch %d %s)", total, batcher.steps_per_epoch, batcher.global_batch,
             "packed rows" if cfg.data.packing else "examples")  # fmt: skip

    # ---- optimisation ----
    optimizer = build_optimizer(named, t, info.device)
    schedule = LRSchedule(t.scheduler, total, warmup_steps_for(total, t.warmup_steps, t.warmup_ratio), t.min_lr_ratio)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler(info.device.type) if precision == "fp16" else None
    autocast = torch.autocast(info.device.type, dtype=amp_dtype, enabled=precision != "fp32")
    net = LMLoss(model, t.loss_chunk_tokens)
    params = list(named.values())

    # ---- resume ----
    progress = Progress()
    rng_to_restore = None
    if resume:
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None:
            log.warning("%s has no complete checkpoint yet: starting from step 0", run_dir)
        else:
            ck = read_checkpoint(ckpt_path)
            saved = ck.trainer["data"]
            if (saved["units"], saved["global_batch"]) != (len(batcher.units), batcher.global_batch):
                raise ValueError(
                    f"{ckpt_path}: the checkpoint was written with {saved['units']} training units in global batches "
                    f"of {saved['global_batch']}, this run has {len(batcher.units)} and {batcher.global_batch}; "
                    "resume with the same data and batch settings (or the same number of processes)"
                )
            load_trainable(named, ck.trainable, ckpt_path)
            optimizer.load_state_dict(ck.trainer["optimizer"])
            scheduler.load_state_dict(ck.trainer["scheduler"])
            scheduler.lr_lambdas[0] = schedule  # this run's schedule (max_steps may have been raised)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * schedule(scheduler.last_epoch)
            if scaler is not None and ck.trainer.get("scaler"):
                scaler.load_state_dict(ck.trainer["scaler"])
            progress = ck.progress
            rngs = ck.trainer["rng"]
            if len(rngs) == info.world_size:
                rng_to_restore = rngs[info.rank]
            else:
                log.warning("checkpoint has RNG states of %d processes, this run has %d: dropout will differ",
                            len(rngs), info.world_size)  # fmt: skip
            log.info("resuming %s from step %d (%s)", run_dir, progress.step, ckpt_path.name)

    ddp = distributed.wrap(net, info)
    writer = MetricsWriter(run_dir, enabled=info.is_main, tensorboard=cfg.log.tensorboard, plot=cfg.log.plot,
                           resume_step=progress.step if resume else None)  # fmt: skip
    if eval_hook is None and info.is_main:
        eval_hook = _generation_hook(cfg, pretrained, template, datasets.dev_samples)
        if eval_hook is None and cfg.eval.generate_every_steps:
            log.warning("eval.generate_every_steps is set but there is no dev set: no generation metrics")
    gen_every = cfg.eval.generate_every_steps if (eval_hook is not None or not info.is_main) else None
    if info.enabled:
        gen_every = distributed.broadcast_object(info, gen_every)
    seed_everything(cfg.seed + info.rank)  # training randomness (dropout) differs between ranks
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)

    def save(step: int) -> None:
        rngs = distributed.gather_objects(info, rng_state())
        if info.is_main:
            trainer = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "data": {
                    "units": len(batcher.units),
                    "global_batch": batcher.global_batch,
                    "steps_per_epoch": batcher.steps_per_epoch,
                    "world_size": info.world_size,
                },  # fmt: skip
            }
            write_checkpoint(
                checkpoint_dir(run_dir, step),
                save_model=lambda d: method.save(model, d, config=model.config, tokenizer_files=tokenizer.files),
                trainable=dict(named),
                trainer=trainer,
                progress=progress,
            )
            keep = {progress.best_step} if progress.best_step is not None else set()
            prune_checkpoints(run_dir, cfg.save.keep_last, keep)
        barrier(info)

    # ---- steps ----
    model.train()
    result = TrainResult(run_dir=run_dir, steps=progress.step)
    bar = tqdm(total=total, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (info.is_main and cfg.log.progress))  # fmt: skip
    window = _Window()
    while progress.step < total:
        step = progress.step
        batches = [batcher.collate(units) for units in batcher.step_units(step, info.rank)]
        n_local = sum(count_targets(b["labels"]) for b in batches)
        tokens_local = sum(int(b["attention_mask"].sum()) for b in batches)
        n_global, tokens_global = all_reduce_sum(info, [float(n_local), float(tokens_local)])
        scale = info.world_size / max(n_global, 1.0)  # DDP averages over ranks; we want the global token mean
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        for k, batch in enumerate(batches):
            inputs = {key: v.to(info.device, non_blocking=True) for key, v in batch.items() if key in MODEL_INPUTS}
            with distributed.no_sync(ddp, sync=k == len(batches) - 1):
                with autocast:
                    s = ddp(**inputs)
                loss = s * scale
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += s.detach()
        (step_sum,) = all_reduce_sum(info, [float(loss_sum)])
        step_loss = step_sum / n_global if n_global else float("nan")
        lr = optimizer.param_groups[0]["lr"]

        ok = math.isfinite(step_loss)
        grad_norm = None
        if ok:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if t.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                if scaler is None and not math.isfinite(grad_norm):
                    ok = False  # bf16/fp32: non-finite gradients (fp16: the scaler skips the step itself)
        if ok:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            progress.bad_steps = 0
        else:
            progress.bad_steps += 1
            log.warning("step %d: non-finite %s; step skipped (%d in a row)", step + 1,
                        "loss" if not math.isfinite(step_loss) else "gradients", progress.bad_steps)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        progress.step += 1
        progress.tokens += int(tokens_global)
        progress.epoch, progress.position = batcher.position(progress.step)
        result.losses.append((progress.step, step_loss))
        if progress.bad_steps >= t.max_bad_steps:
            last = latest_checkpoint(run_dir)
            bar.close()
            writer.close()
            raise TrainError(
                f"stopped at step {progress.step}: {progress.bad_steps} non-finite losses in a row "
                f"(train.max_bad_steps). The last good checkpoint is {last or 'none (no checkpoint yet)'}. "
                "Lower train.learning_rate, use train.precision=bf16 or fp32, or check the data."
            )

        # ---- log ----
        window.add(step_sum, n_global, tokens_global)
        is_last = progress.step == total
        if progress.step % cfg.log.every_steps == 0 or is_last:
            values = {"loss": window.loss, "lr": lr, "tokens_per_s": window.tokens_per_s,
                      "epoch": progress.step / batcher.steps_per_epoch}  # fmt: skip
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            writer.log(progress.step, "train", values)
            bar.set_postfix_str(f"loss {window.loss:.4f} lr {lr:.2e} tok/s {window.tokens_per_s:,.0f}", refresh=False)
            if not cfg.log.progress and info.is_main:
                log.info("step %d/%d loss %.4f lr %.3e tok/s %.0f", progress.step, total, window.loss, lr,
                         window.tokens_per_s)  # fmt: skip
            window.reset()
        bar.update(1)

        # ---- evaluate, keep the best, stop early (time spent here does not count in tokens/s) ----
        paused = time.perf_counter()
        results: dict[str, float] = {}
        if has_dev and ((cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0) or is_last):
            results["loss"] = evaluate_loss(net, dev, info, autocast)
        if gen_every and (progress.step % gen_every == 0 or is_last):
            scores = None
            if info.is_main:
                model.eval()
                with autocast, torch.no_grad():
                    scores = {k: float(v) for k, v in eval_hook(model).items()}
                model.train()
            results.update(distributed.broadcast_object(info, scores) if info.enabled else scores)
        improved = False
        if results:
            writer.log(progress.step, "eval", results)
            improved = _improved(progress, results, cfg.eval.metric)
            if info.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                log.info("step %d eval: %s%s", progress.step, shown, " (best)" if improved else "")
        stop_early = bool(cfg.eval.patience) and progress.evals_without_improvement >= cfg.eval.patience
        every = cfg.save.every_steps
        periodic = bool(every) and progress.step % every == 0 and progress.bad_steps == 0  # never mid-streak
        if improved or is_last or stop_early or periodic:
            save(progress.step)
        if results or is_last:
            writer.plot()
        window.start += time.perf_counter() - paused
        if on_step is not None:
            on_step(progress.step, {"loss": step_loss, "lr": lr})
        if stop_early:
            result.stop_reason = "early_stopping"
            log.info("early stopping at step %d: no improvement of eval %s in %d evaluations", progress.step,
                     cfg.eval.metric, cfg.eval.patience)  # fmt: skip
            break
    bar.close()

    # ---- the result: the best weights (else the last) in <run>/model ----
    if progress.best_step is not None and progress.best_step != progress.step:
        best_dir = checkpoint_dir(run_dir, progress.best_step)
        if best_dir.is_dir():
            load_trainable(named, read_checkpoint(best_dir).trainable, best_dir)
        else:
            log.warning("best checkpoint %s is missing; the final model is the last state", best_dir)
    model_dir = run_dir / "model"
    if info.is_main:
        save_with_tokenizer(
            lambda d: method.save(model, d, config=model.config, tokenizer_files=tokenizer.files),
            model_dir,
            tokenizer.files,
        )
        writer.plot()
        log.info("run folder %s: final model in %s%s", run_dir, model_dir,
                 f" (best eval {cfg.eval.metric} {progress.best_metric:.4f} at step {progress.best_step})"
                 if progress.best_step is not None else "")  # fmt: skip
    writer.close()
    barrier(info)
    result.steps = progress.step
    result.best_metric, result.best_step = progress.best_metric, progress.best_step
    result.model_dir = model_dir
    return result
