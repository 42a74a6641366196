"""Evaluation during training: the dev loss, generation metrics (ROUGE/BLEU) and the best-so-far bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from glmtune.pretrained import Pretrained
from glmtune.templates import Template
from glmtune.train.config import TrainConfig
from glmtune.train.data import encode_options
from glmtune.train.distributed import DistInfo, all_reduce_sum
from glmtune.train.fsdp import reshard_all
from glmtune.train.loss import count_targets
from glmtune.train.state import Progress
from glmtune.train.step import device_inputs

EvalHook = Callable[[nn.Module], dict[str, float]]


@torch.no_grad()
def evaluate_loss(
    net: nn.Module, batches: list[dict[str, torch.Tensor]], info: DistInfo, autocast: AbstractContextManager
) -> float:
    """Mean token loss over the dev batches of every rank (``net(**batch)`` returns the summed token loss)."""
    was_training = net.training
    net.eval()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    n = 0
    for batch in batches:
        with autocast:
            total += net(**device_inputs(batch, info.device)).detach().double()
        n += count_targets(batch["labels"])
    net.train(was_training)
    reshard_all(net)  # FSDP: without a backward pass the root and the last block units keep their gathered weights
    total_sum, n_sum = all_reduce_sum(info, [float(total), float(n)])
    return total_sum / n_sum if n_sum else float("nan")


def improved(progress: Progress, results: dict[str, float], metric: str) -> bool:
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


def generation_hook(cfg: TrainConfig, pretrained: Pretrained, template: Template, dev_samples) -> EvalHook | None:
    """ROUGE/BLEU of greedy replies on the dev samples, when ``eval.generate_every_steps`` asks for them."""
    if not cfg.eval.generate_every_steps or not dev_samples:
        return None
    from glmtune.data.encode import eval_examples
    from glmtune.evaluate.hook import make_generation_eval_hook
    from glmtune.generate import GenerationConfig

    examples = eval_examples(pretrained.tokenizer, template, dev_samples, encode_options(cfg.data, template))
    gen = GenerationConfig(max_new_tokens=cfg.eval.max_new_tokens, do_sample=False)
    return make_generation_eval_hook(pretrained.tokenizer, template, examples, gen,
                                     max_examples=cfg.eval.generate_examples,
                                     batch_size=cfg.eval.generate_batch_size)  # fmt: skip
