"""Open a model folder in its original layout: config, weights, tokenizer and the generation's template."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmtune.models import build_model
from glmtune.models.checkpoint import LocalShards, load_weights
from glmtune.models.config import GENERATIONS, GLMConfig
from glmtune.models.quant import SCHEMES, config_bits, quantize_model_, scheme_of, use_inference_layout
from glmtune.templates import Template, get_template
from glmtune.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def quantization(config: GLMConfig | dict, quantize: str | None, *, source: str | Path = "config.json") -> str:
    """The quantization to load with (``quant.SCHEMES``): the folder's ``quantization_bit`` (int4, int8; from a
    GLMConfig or config.json's raw dict), else ``quantize`` (none, int8, int4, nf4; None: none)."""
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(SCHEMES)}")
    stored = scheme_of(config_bits(config, source))
    wanted = quantize or "none"
    if stored != "none" and wanted not in ("none", stored):
        raise ValueError(
            f"{source}: the weights are quantized to {stored[3:]} bits already (quantization_bit); cannot load them "
            f"as {wanted}"
        )
    return stored if stored != "none" else wanted


def check_trainable_base(model_dir: str | Path, method: str, quantize: str | None = None) -> str:
    """Refuse a quantized base (a THUDM int4/int8 folder, or ``quantize``) for a method that trains base weights
    (full, freeze): its weights are frozen integers. Returns the quantization to load with."""
    path = Path(model_dir) / "config.json"
    scheme = quantization(GLMConfig.from_json(path), quantize, source=path)
    if scheme != "none" and method in ("full", "freeze"):
        where = f"{path}: quantization_bit {scheme[3:]}" if quantize in (None, "none") else f"quantize: {scheme}"
        raise ValueError(
            f"{where}: a quantized base is frozen; method {method!r} trains base weights. Use method lora or ptuning "
            "(QLoRA, P-Tuning v2 over int4/int8), or a full-precision base with quantize: none"
        )
    return scheme


@dataclass
class Pretrained:
    path: Path
    config: GLMConfig
    generation: str
    model: nn.Module
    tokenizer: Tokenizer
    template: Template


def load_pretrained(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    generation: str | None = None,
    quantize: str | None = None,
    int4_layout: str = "thudm",
) -> Pretrained:
    """Load config.json, the weight shards (streamed into ``dtype`` on ``device``), the tokenizer and template.

    ``generation`` (chatglm, chatglm2, chatglm3, glm4) overrides detection; v2 and v3 share one architecture and
    are told apart by their tokenizer files. ``quantize`` (none, int8, int4, nf4) quantizes the block linears as
    they load (int8/int4 in THUDM's format, nf4 through torchao); a folder whose config.json has
    ``quantization_bit`` loads quantized as it is.

    ``int4_layout`` (INT4 models): "thudm" (the default) keeps THUDM's bytes, which training needs and the Triton
    kernels read; "tinygemm" repacks the INT4 layers for PyTorch's tinygemm kernel, for generation only
    (``quant.use_inference_layout``; opt-in: slower than the default kernels on an H200).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a folder (expected a model folder with config.json)")
    if generation is not None and generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; choose one of {', '.join(GENERATIONS)}")
    config = GLMConfig.from_json(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir, generation)
    generation = generation or tokenizer.generation
    from glmtune.models.spec import get_spec

    if get_spec(generation).arch != config.arch:
        raise ValueError(
            f"{model_dir}: config.json describes a {'ChatGLM-6B (v1)' if config.arch == 'glm' else 'ChatGLM2+'} "
            f"model but the tokenizer/generation is {generation!r}"
        )
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    start = time.perf_counter()
    model = load_model(model_dir, config, dtype=dt, device=dev, generation=generation, quantize=quantize)
    if int4_layout != "thudm" and dev.type != "meta" and quantization(config, quantize) == "int4":
        repacked = use_inference_layout(model, int4_layout)
        log.info("INT4 layers in tinygemm's layout (inference): %d", repacked)
    log.info("loaded %s (%s) in %.1fs as %s on %s", model_dir, generation, time.perf_counter() - start, dt, dev)
    return Pretrained(model_dir, config, generation, model, tokenizer, get_template(generation))


def load_model(
    model_dir: str | Path,
    config: GLMConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generation: str | None = None,
    quantize: str | None = None,
) -> nn.Module:
    """Build the model on the meta device and stream the original shards into it (no fp32 copy of the whole).

    Quantized (config.json's ``quantization_bit``, or ``quantize`` int8/int4/nf4): the block linears become
    ``QuantizedLinear`` / ``NF4Linear`` on meta first, so int8 weights load as they are and full-precision ones are
    quantized one tensor at a time on ``device`` (neither the host nor the GPU ever holds the whole model unquantized).

    ``device`` "meta": the model is only built (its floating tensors in ``dtype``, as they would load); the caller
    streams the weights in later with :func:`fill_model` (FSDP: each process its shards).
    """
    scheme = quantization(config, quantize, source=Path(model_dir) / "config.json")
    model = build_model(config, device="meta", generation=generation)
    if scheme != "none":
        quantize_model_(model, scheme)
    if device.type == "meta":
        keep = [re.compile(r) for r in _rules(model, quantized=scheme != "none").get("keep_dtype", ())]
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.dtype != dtype and not any(r.search(name) for r in keep):
                t.data = t.data.to(dtype)
        return model
    fill_model(model, model_dir, dtype=dtype, device=device, quantized=scheme != "none")
    return model


def _rules(model: nn.Module, *, quantized: bool) -> dict:
    rules = model.checkpoint_rules()
    if quantized:
        rules["keep_dtype"] = [*rules.get("keep_dtype", ()), r"\.weight_scale$"]
    return rules


def fill_model(
    model: nn.Module,
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantized: bool,
    renamed: Mapping[str, str] | None = None,
    shards: LocalShards | None = None,
) -> None:
    """Stream the weights of ``model_dir`` into ``model`` (built by :func:`load_model` on meta), then initialise what
    the checkpoint lacks. ``renamed``: original tensor name -> the model's name now (a method wrapped modules:
    LoRA's ``base_layer``); ``shards``: each process keeps its piece of the sharded parameters (FSDP)."""
    rules = _rules(model, quantized=quantized)
    if renamed:
        aliases = {src: renamed.get(dst, dst) for src, dst in rules.get("aliases", {}).items()}
        rules["aliases"] = {**{old: new for old, new in renamed.items() if old not in aliases}, **aliases}
    report = load_weights(model, model_dir, dtype=dtype, device=device, shards=shards, **rules)
    model.init_missing(report.missing_optional, device=device, dtype=dtype)
    model.eval()
