"""Command-line options shared by ``chat`` and ``eval`` (model, device, dtype, sampling), and the device check that
``train``, ``chat`` and ``eval`` run before loading anything.

torch is imported only inside the functions that need it, so building the parser stays instant.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from glmtune.generations import GENERATIONS as GENERATION_CHOICES  # torch-free

if TYPE_CHECKING:
    from glmtune.generate import GenerationConfig
    from glmtune.pretrained import Pretrained

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
QUANTIZE_CHOICES = ("none", "int8", "int4", "nf4")  # quant.SCHEMES (kept here: the parser imports no torch)


def add_model_path(p: argparse.ArgumentParser) -> None:
    """MODEL (any folder ``runs.resolve`` knows) and --base: the model of ``chat``, ``serve`` and ``web``."""
    p.add_argument(
        "model",
        help="a model folder in the original layout, a run folder, a checkpoint, a PEFT adapter or P-Tuning folder",
    )
    p.add_argument("--base", help="base model folder for an adapter or P-Tuning folder that does not name one")


def add_listen_options(p: argparse.ArgumentParser, *, port: int) -> None:
    """--host (this machine only by default) and --port, for ``serve`` and ``web``."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")


def add_out_dir(p: argparse.ArgumentParser) -> None:
    """OUT_DIR and --overwrite: the folder ``merge``, ``export`` and ``quantize`` write."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --generation and --quantize."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype (default auto: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on the "
                   "CPU)")  # fmt: skip
    p.add_argument("--generation", choices=GENERATION_CHOICES,
                   help="override the generation detected from the model folder (ChatGLM2 and 3 share one "
                   "architecture)")  # fmt: skip
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="quantize the block linears as they load: int8/int4 in THUDM's format, nf4 (QLoRA's "
                   "NormalFloat, needs torchao) (default none; a folder written by `glmtune quantize` loads quantized "
                   "as it is)")  # fmt: skip


def load_model_from_args(args: argparse.Namespace) -> Pretrained:
    """The model of ``chat``, ``eval`` and ``serve``: ``runs.load_for_inference`` on ``args.model`` with the
    ``add_model_options`` options and ``--base``."""
    from glmtune.runs import load_for_inference

    return load_for_inference(args.model, dtype=args.dtype, device=args.device, generation=args.generation,
                              base=args.base, quantize=args.quantize)  # fmt: skip


def add_adapter_option(p: argparse.ArgumentParser) -> None:
    """--adapter NAME=PATH (serve, web): LoRA adapters served beside the model, picked per request or conversation."""
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="also serve this LoRA adapter (PEFT folder or run) as the model NAME, in the same batch as "
                   "the others; repeatable. P-Tuning checkpoints: one per server, as PATH itself")  # fmt: skip


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``--adapter NAME=PATH`` values -> {name: path}; ValueError naming the bad one."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter {v!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"--adapter {v!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def load_model_with_adapters(args: argparse.Namespace, name: str,
                             adapters: dict[str, str]) -> tuple[Pretrained, dict[str, str], str]:  # fmt: skip
    """(model, adapters by name, the model's own name) for ``--adapter`` (serve, web; ``adapters`` from
    :func:`parse_adapters`). A LoRA PATH served beside other adapters stays unmerged: the base is served under its
    folder's name and PATH as the adapter ``name``."""
    from glmtune.runs import resolve

    resolved_adapters = {}
    for key, path in adapters.items():
        r = resolve(path, base=args.base, require_base=False)
        if r.kind == "ptuning":
            raise ValueError(f"--adapter {key}={path}: a P-Tuning checkpoint cannot share a batch with other "
                             "adapters (its prefix fills every row's KV cache); serve it alone as PATH")  # fmt: skip
        if r.kind != "lora":
            raise ValueError(f"--adapter {key}={path}: not a LoRA adapter (a PEFT folder or a LoRA run)")
        resolved_adapters[key] = str(r.result_dir)
    if not resolved_adapters:
        return load_model_from_args(args), {}, name
    resolved = resolve(args.model, base=args.base)
    if resolved.kind == "lora":
        assert resolved.base_dir is not None
        args.model, base_name = str(resolved.base_dir), resolved.base_dir.resolve().name
        if name in resolved_adapters:
            raise ValueError(f"--adapter {name}=...: the name {name!r} is the served model's")
        return load_model_from_args(args), {name: str(resolved.result_dir), **resolved_adapters}, base_name
    return load_model_from_args(args), resolved_adapters, name


def add_sampling_options(
    p: argparse.ArgumentParser, *, max_new_tokens: int, seed: int | None, greedy_help: str = ""
) -> None:
    """--max-new-tokens, --greedy, --temperature, --top-p, --top-k, --repetition-penalty and --seed."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens generated per reply at most (default {max_new_tokens})")  # fmt: skip
    p.add_argument("--greedy", action="store_true", help=greedy_help or "greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.95, help="sampling temperature; 0 means greedy (0.95)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling threshold (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats (default 1.0)")
    seed_help = "sampling seed" + (f" (default {seed})" if seed is not None else " (default: a random one)")
    p.add_argument("--seed", type=int, default=seed, help=seed_help)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the sampling options describe, checked. ``--temperature 0`` is greedy decoding."""
    from glmtune.generate import GenerationConfig

    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy and args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        gen.validate()
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    return gen


def check_device(name: str | None, option: str = "--device") -> None:
    """Raise ValueError with one clear sentence when ``name`` is not a device this machine has.

    ``option`` is how the user wrote it (``--device`` on the command line, ``train.device`` in a training config),
    so the message quotes their input and the fix in the same form.
    """
    if name in (None, "auto"):
        return
    import torch

    sep = " " if option.startswith("-") else "="
    given, fix = f"{option}{sep}{name}", f"use {option}{sep}cpu or {option}{sep}auto"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{given}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
                   else f"PyTorch (CUDA {torch.version.cuda}) sees no GPU or driver")  # fmt: skip
            raise ValueError(f"{given}: CUDA is not available ({why}); {fix}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{given}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{given}: Apple's MPS backend is not available on this machine; {fix}")
        return
    raise ValueError(f"{given}: glmtune runs on cpu, cuda or mps, not {dev.type}")
