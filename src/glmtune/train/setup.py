"""The pieces a run is built from: precision, seeds, the template check, trainable parameters, the optimizer.

Each is a plain function of the config (and the model), so the trainer's setup reads as a list of calls and a
variant (a quantized base, FSDP2) replaces one piece without touching the others.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, is_dataclass

import numpy as np
import torch
from torch import nn

from glmtune.adapters.base import Method
from glmtune.pretrained import Pretrained
from glmtune.templates import EncodeOptions, Message, Template, get_template
from glmtune.train.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)


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
    from glmtune.models.spec import get_spec

    if get_spec(name).arch != pretrained.config.arch:
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


def build_optimizer(
    named: dict[str, nn.Parameter], cfg: OptimConfig, device: torch.device, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (every tensor of fewer than 2 dims).

    ``fused`` (default: every parameter a CUDA floating-point tensor): one fused kernel per step, which also skips
    a step on the device when the trainer sets ``optimizer.found_inf``; otherwise the foreach implementation.
    """
    decay = [p for n, p in named.items() if p.ndim >= 2 and not n.endswith(".bias") and "norm" not in n.lower()]
    ids = {id(p) for p in decay}
    no_decay = [p for p in named.values() if id(p) not in ids]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
    if fused is None:
        fused = all(p.is_cuda and p.is_floating_point() for p in named.values())
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=fused, foreach=None if fused else True)  # fmt: skip


def method_description(method: Method, cfg: TrainConfig) -> dict:
    opts = getattr(method, "options", None)
    values = asdict(opts) if is_dataclass(opts) and not isinstance(opts, type) else dict(cfg.method.options)
    return {"name": method.name, **values}


def count_parameters(model: nn.Module, named: dict[str, nn.Parameter]) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared tensors counted once."""
    n_train = sum(p.numel() for p in named.values())
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return n_train, n_all
