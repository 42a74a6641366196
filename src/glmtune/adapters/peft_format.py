"""LoRA adapters in PEFT's on-disk format, both ways.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (older tools:
``adapter_model.bin``, read with ``torch.load(weights_only=True)``). Tensor names are the base model's module names
under PEFT's wrapper prefix, e.g.
``base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight``. PEFT drops the
adapter name when saving (``lora_A.default.weight`` in memory, ``lora_A.weight`` on disk) and puts it back
when loading; we read both spellings, with or without the ``base_model.model.`` prefix.

What a module gets is decided by the tensors themselves: rank from the shapes (checked against ``r`` /
``rank_pattern``), ``alpha`` from ``lora_alpha`` / ``alpha_pattern`` (PEFT's pattern rule: a key matches a module
name when the name ends with it after a dot), scale ``alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``.
Features that change what the tensors mean and that we do not implement (DoRA, LoRA biases, extra trainable modules,
layer replication, embedding adapters, non-LoRA PEFT types) are refused with the field's name.

When writing we produce what PEFT's ``save_pretrained`` writes for a LoRA on the original ChatGLM model: the
``base_model.model.`` names without adapter name, float32 tensors, and a config PEFT reads back to the same modules
(``target_modules`` as the requested names when PEFT's suffix matching finds exactly the wrapped modules with them,
else the full module names).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from glmtune.adapters.lora import (
    ALL_LINEAR,
    LoraLinear,
    LoraSpec,
    inject_lora,
    lora_layers,
    lora_scale,
    lora_state_dict,
    matches_target,
    parse_targets,
)
from glmtune.io import atomic_write_dir
from glmtune.models.checkpoint import read_tensor_file

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# adapter_config.json fields whose non-default values change what the weights mean; we refuse them.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora=true)",
    "modules_to_save": "adapters that also save whole modules (modules_to_save)",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "target_parameters": "adapters on parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


class AdapterError(ValueError):
    """An adapter folder we cannot read or apply; the message names the file and the field or tensor."""


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    spec: LoraSpec

    @property
    def scale(self) -> float:
        return lora_scale(self.spec.rank, self.spec.alpha, self.spec.use_rslora)

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` (out, in) in float32."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk: module name (the base model's) -> weights."""

    path: Path
    weights_file: Path
    config: dict[str, Any]
    modules: dict[str, LoraModuleWeights] = field(default_factory=dict)

    @property
    def dropout(self) -> float:
        return float(self.config.get("lora_dropout") or 0.0)

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None


# ---- reading ---------------------------------------------------------------------------------------------------------
def is_peft_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def pattern_key(patterns: Sequence[str], module_name: str) -> str | None:
    """The first key of ``rank_pattern`` / ``alpha_pattern`` that matches ``module_name`` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked for what we support; raises AdapterError naming the field."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: not a PEFT adapter folder (no {CONFIG_NAME})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")

    def bad(name: str, why: str) -> AdapterError:
        return AdapterError(f"{path}: field '{name}' {why}")

    peft_type = raw.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise bad("peft_type", f"is {peft_type!r}; glmtune reads LoRA adapters (peft_type 'LORA')")
    for name, what in _UNSUPPORTED.items():
        if raw.get(name):
            raise bad(name, f"is {raw[name]!r}: {what} is not supported; use a plain LoRA adapter")
    if raw.get("bias", "none") != "none":
        raise bad("bias", f"is {raw['bias']!r}: only bias 'none' is supported (LoRA adapters without bias tensors)")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        raise bad(
            "init_lora_weights",
            f"is {init!r}: this initialisation changes the base weights, so the adapter only works on a converted "
            "base model; save it from PEFT as a plain LoRA (path_initial_model_for_weight_conversion) first",
        )
    r = raw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad("r", f"must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise bad(name, f"must be an object mapping module names to values, got {value!r}")
    if raw.get("fan_in_fan_out"):
        # PEFT itself resets it for nn.Linear (the ChatGLM layers) and loads the weights as (out, in).
        log.warning("%s: fan_in_fan_out=true does not apply to the ChatGLM linear layers; ignored as PEFT does", path)
    return raw


def _weights_file(adapter_dir: Path) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdapterError(f"{adapter_dir}: no adapter weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def _module_of(key: str, path: Path) -> tuple[str, str, str | None]:
    """(module name, "lora_A"/"lora_B", adapter name or None) for one tensor name; AdapterError for anything else."""
    name = key.removeprefix(PEFT_PREFIX)
    if ".lora_embedding_" in name:
        raise AdapterError(f"{path}: tensor '{key}' is an embedding LoRA; only linear layers are supported")
    if ".lora_magnitude_vector" in name:
        raise AdapterError(f"{path}: tensor '{key}' belongs to a DoRA adapter (use_dora), which is not supported")
    m = _KEY.match(name)
    if m is None:
        raise AdapterError(
            f"{path}: tensor '{key}' is not a LoRA weight (expected '<module>.lora_A.weight' / '.lora_B.weight'; "
            "biases, modules_to_save and other PEFT methods are not supported)"
        )
    return m.group("module"), m.group("part"), m.group("adapter")


def read_lora_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder (config checked, tensors grouped per module, ranks and alphas resolved).

    AdapterError names the config field or tensor that does not fit; CheckpointError an unreadable weights file."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    path = _weights_file(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for key, t in read_tensor_file(path).items():
        module, part, adapter_name = _module_of(key, path)
        if adapter_name:
            adapter_names.add(adapter_name)
        if part in pairs.setdefault(module, {}):
            raise AdapterError(f"{path}: module '{module}' has two {part} tensors (several adapters in one file?)")
        if t.ndim != 2 or not t.is_floating_point():
            raise AdapterError(
                f"{path}: tensor '{key}' should be a floating-point matrix, got {t.dtype} {tuple(t.shape)}"
            )
        pairs[module][part] = t
    if len(adapter_names) > 1:
        raise AdapterError(f"{path}: holds several adapters ({', '.join(sorted(adapter_names))}); keep one")
    if not pairs:
        raise AdapterError(f"{path}: no LoRA tensors")
    r = config.get("r", 8)
    alpha = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    adapter = LoraAdapter(adapter_dir, path, config)
    for module, parts in pairs.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise AdapterError(f"{path}: module '{module}' has no {part} tensor")
        a, b = parts["lora_A"], parts["lora_B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise AdapterError(
                f"{path}: module '{module}': lora_A has rank {rank} (shape {tuple(a.shape)}) but lora_B has shape "
                f"{tuple(b.shape)}"
            )
        rkey = pattern_key(list(rank_pattern), module)
        expected = rank_pattern[rkey] if rkey is not None else r
        if rank != expected:
            field_name = f"rank_pattern['{rkey}']" if rkey is not None else "r"
            raise AdapterError(
                f"{cfg_path}: field '{field_name}' is {expected} but tensor '{module}.lora_A' in {path.name} has rank "
                f"{rank}"
            )
        akey = pattern_key(list(alpha_pattern), module)
        mod_alpha = float(alpha_pattern[akey]) if akey is not None else alpha
        adapter.modules[module] = LoraModuleWeights(a, b, LoraSpec(rank, mod_alpha, use_rslora))
    log.info("read LoRA adapter %s: %d module(s)", adapter_dir, len(adapter.modules))
    return adapter


# ---- applying --------------------------------------------------------------------------------------------------------
def _check_target(model: nn.Module, name: str, w: LoraModuleWeights, path: Path) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        linear = [n for n, m in model.named_modules() if isinstance(getattr(m, "in_features", None), int)]
        close = difflib.get_close_matches(name, linear, n=1)
        raise AdapterError(
            f"{path}: the adapter has weights for module '{name}', which this model does not have"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + "; was it trained on another model generation?"
        ) from None
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise AdapterError(f"{path}: module '{name}' is a {type(module).__name__}, not a linear layer")
    if w.a.shape[1] != in_f or w.b.shape[0] != out_f:
        raise AdapterError(
            f"{path}: module '{name}' is ({out_f} out, {in_f} in) in this model, but its LoRA tensors have shapes "
            f"lora_A {tuple(w.a.shape)} and lora_B {tuple(w.b.shape)}; was the adapter trained on another model size?"
        )


def load_lora_adapter(model: nn.Module, adapter: str | Path | LoraAdapter) -> dict[str, LoraLinear]:
    """Put a PEFT LoRA adapter on ``model``: wraps the modules it names (when the model has no LoRA yet) or fills the
    model's existing LoRA layers (which must be the same modules with the same ranks). Returns name -> layer."""
    if not isinstance(adapter, LoraAdapter):
        adapter = read_lora_adapter(adapter)
    path = adapter.weights_file
    for name, w in adapter.modules.items():
        _check_target(model, name, w, path)
    layers = lora_layers(model)
    if not layers:
        layers = inject_lora(model, {n: w.spec for n, w in adapter.modules.items()}, dropout=adapter.dropout)
    elif set(layers) != set(adapter.modules):
        only_model = sorted(set(layers) - set(adapter.modules))
        only_adapter = sorted(set(adapter.modules) - set(layers))
        raise AdapterError(
            f"{path}: the adapter's modules differ from the model's LoRA layers (only in the model: "
            f"{only_model[:3]}, only in the adapter: {only_adapter[:3]}); check target_modules"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            w = adapter.modules[name]
            if layer.rank != w.spec.rank:
                raise AdapterError(
                    f"{path}: module '{name}' has rank {w.spec.rank} in the adapter, {layer.rank} in the model"
                )
            if layer.merged:
                raise AdapterError(f"cannot load {path} into '{name}': its current LoRA is merged")
            layer.lora_A.weight.copy_(w.a.to(layer.lora_A.weight.dtype))
            layer.lora_B.weight.copy_(w.b.to(layer.lora_B.weight.dtype))
            layer.alpha, layer.use_rslora = w.spec.alpha, w.spec.use_rslora
            layer.scaling = w.scale
    log.info("loaded LoRA adapter %s onto %d module(s)", adapter.path, len(layers))
    return layers


# ---- writing ---------------------------------------------------------------------------------------------------------
def _original_module_names(model: nn.Module, wrapped: Sequence[str]) -> list[str]:
    """The module names the model had before LoRA wrapped ``wrapped`` (their insides left out)."""
    inside = tuple(f"{w}." for w in wrapped)
    return [n for n, _ in model.named_modules() if n and not n.startswith(inside)]


def peft_target_modules(model: nn.Module, wrapped: Sequence[str], requested: str | Sequence[str]) -> list[str]:
    """``target_modules`` for adapter_config.json that makes PEFT wrap exactly ``wrapped``: the requested names (or,
    for ``all``, the wrapped layers' last names) when PEFT's suffix rule finds exactly those modules, else the full
    names."""
    targets = parse_targets(requested)
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped}) if targets == ALL_LINEAR else list(targets)
    found = {n for n in _original_module_names(model, wrapped) if matches_target(n, short)}
    return short if found == set(wrapped) else sorted(wrapped)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def adapter_config(
    model: nn.Module,
    layers: dict[str, LoraLinear],
    *,
    target_modules: str | Sequence[str],
    dropout: float,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for these layers (rank/alpha patterns for layers off the common value)."""
    ranks = [layer.rank for layer in layers.values()]
    alphas = [layer.alpha for layer in layers.values()]
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) != 1:
        raise ValueError("cannot save LoRA layers that mix rsLoRA and plain scaling in one PEFT adapter")
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    rank_pattern = {n: layer.rank for n, layer in layers.items() if layer.rank != r}
    alpha_pattern = {n: _number(layer.alpha) for n, layer in layers.items() if layer.alpha != alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(dropout),
        "target_modules": peft_target_modules(model, list(layers), target_modules),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def save_lora_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    target_modules: str | Sequence[str],
    dropout: float,
    base_model_name_or_path: str | None = None,
    tokenizer_files: Sequence[str | Path] = (),
) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder, atomically: adapter_config.json,
    adapter_model.safetensors (float32) and copies of ``tokenizer_files``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("cannot save a LoRA adapter after merging it into the base weights")
    config = adapter_config(
        model, layers, target_modules=target_modules, dropout=dropout, base_model_name_or_path=base_model_name_or_path
    )
    tensors = {PEFT_PREFIX + k: t.to("cpu", torch.float32).clone() for k, t in lora_state_dict(model).items()}
    out_dir = Path(out_dir)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in tokenizer_files:
            f = Path(f)
            if f.name in (SAFETENSORS_NAME, CONFIG_NAME, BIN_NAME):
                raise ValueError(f"{f}: a tokenizer file may not be named {f.name}")
            shutil.copy2(f, tmp / f.name)

    atomic_write_dir(out_dir, fill)
    log.info("saved LoRA adapter (%d modules) to %s", len(layers), out_dir)
    return out_dir
