"""P-Tuning v2 prefixes in PEFT's ``PREFIX_TUNING`` format, both ways (GLM-4's official finetune script saves these).

A PEFT prefix folder holds ``adapter_config.json`` (``peft_type: PREFIX_TUNING``, ``num_virtual_tokens``,
``num_layers``, ``token_dim``, ``num_attention_heads``, ``prefix_projection``, ...) and ``adapter_model.safetensors``
(older PEFT: ``adapter_model.bin``) with one tensor, ``prompt_embeddings`` of shape
(num_virtual_tokens, num_layers * 2 * token_dim). PEFT saves the prefix encoder's *output* there, so with
``prefix_projection`` the MLP is already applied and the file never holds it.

PEFT reads the vector as (P, num_layers * 2, num_attention_heads, token_dim / num_attention_heads) and hands layer i
entries 2i (keys) and 2i + 1 (values) as (b, heads, P, d) tensors, which GLM-4's original attention concatenates in
front of its own keys/values. That is exactly the layout of the models' own prefix encoder without projection, so a
PEFT prefix becomes ``transformer.prefix_encoder.embedding.weight`` and loads through ``ptuning.load_prefix``. It fits
a model only when ``num_attention_heads`` is its number of key/value heads (``multi_query_group_num`` for GLM-4) and
``token_dim`` their total width; anything else could not have run on the original model and is an error naming the
field. ChatGLM-6B (v1) keeps its cache sequence-first, so PEFT prefixes are refused for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glmtune.adapters.ptuning import PREFIX, PrefixCheckpoint, PrefixError, read_json_object
from glmtune.io import atomic_write_dir
from glmtune.models.checkpoint import read_tensor_file
from glmtune.models.config import GLMConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TENSOR_NAME = "prompt_embeddings"
PEFT_TYPE = "PREFIX_TUNING"


def is_peft_prefix_dir(path: str | Path) -> bool:
    """A folder whose adapter_config.json says ``peft_type: PREFIX_TUNING``."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the LoRA reader reports the broken file
    return isinstance(raw, dict) and str(raw.get("peft_type", "")).upper() == PEFT_TYPE


def _positive_int(raw: dict[str, Any], name: str, path: Path) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PrefixError(f"{path}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _weights(adapter_dir: Path) -> tuple[Path, torch.Tensor]:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = adapter_dir / name
        if not path.is_file():
            continue
        tensors = read_tensor_file(path)
        # PEFT drops the adapter name on save; a hand-saved state dict may keep PEFT's in-memory name.
        for key in (TENSOR_NAME, "prompt_encoder.default.embedding.weight", "prompt_encoder.embedding.weight"):
            if key in tensors:
                return path, tensors[key]
        raise PrefixError(f"{path}: no '{TENSOR_NAME}' tensor (holds {sorted(tensors)[:5]}); not a PEFT prefix")
    raise PrefixError(f"{adapter_dir}: no adapter weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def read_peft_prefix(adapter_dir: str | Path) -> PrefixCheckpoint:
    """Read a PEFT PREFIX_TUNING folder as a prefix checkpoint without projection (``embedding.weight``).

    Checks the config against the tensor; ``check_peft_prefix_base`` checks it against a model."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / CONFIG_NAME
    if not config_file.is_file():
        raise PrefixError(f"{adapter_dir}: not a PEFT adapter folder (no {CONFIG_NAME})")
    raw = read_json_object(config_file)
    if str(raw.get("peft_type", "")).upper() != PEFT_TYPE:
        raise PrefixError(f"{config_file}: field 'peft_type' is {raw.get('peft_type')!r}, not {PEFT_TYPE!r}")
    n_sub = raw.get("num_transformer_submodules") or 1
    if n_sub != 1:
        raise PrefixError(f"{config_file}: field 'num_transformer_submodules' is {n_sub!r}: an encoder-decoder "
                          "prefix; ChatGLM models take 1")  # fmt: skip
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        log.warning("%s: task_type %r; reading the prefix as for CAUSAL_LM", config_file, task)
    virtual = _positive_int(raw, "num_virtual_tokens", config_file)
    layers = _positive_int(raw, "num_layers", config_file)
    token_dim = _positive_int(raw, "token_dim", config_file)
    heads = _positive_int(raw, "num_attention_heads", config_file)
    if token_dim % heads:
        raise PrefixError(f"{config_file}: field 'token_dim' ({token_dim}) is not a multiple of "
                          f"'num_attention_heads' ({heads})")  # fmt: skip
    weights_file, emb = _weights(adapter_dir)
    want = (virtual, layers * 2 * token_dim)
    if tuple(emb.shape) != want:
        raise PrefixError(
            f"{weights_file}: tensor '{TENSOR_NAME}' has shape {tuple(emb.shape)}, but {CONFIG_NAME} "
            f"(num_virtual_tokens={virtual}, num_layers={layers}, token_dim={token_dim}) implies {want}"
        )
    return PrefixCheckpoint(
        adapter_dir, weights_file, config_file, virtual, False, {"embedding.weight": emb}, None, peft_config=raw
    )


def check_peft_prefix_base(ckpt: PrefixCheckpoint, model_cfg: GLMConfig) -> None:
    """PrefixError naming the adapter_config.json field that does not fit ``model_cfg``."""
    raw, where = ckpt.peft_config or {}, ckpt.config_file
    if model_cfg.arch == "glm":
        raise PrefixError(f"{where}: a PEFT prefix (PREFIX_TUNING) cannot be used with ChatGLM-6B (v1), whose "
                          "original code keeps its cache sequence-first; use the official P-Tuning format")  # fmt: skip
    kv_width = model_cfg.num_kv_heads * model_cfg.head_dim
    for name, ours in (("num_layers", model_cfg.num_layers), ("num_attention_heads", model_cfg.num_kv_heads),
                       ("token_dim", kv_width)):  # fmt: skip
        if raw.get(name) != ours:
            hint = ""
            if name != "num_layers":
                hint = (f" (the model has {model_cfg.num_kv_heads} key/value heads of {model_cfg.head_dim}: "
                        f"num_attention_heads={model_cfg.num_kv_heads}, token_dim={kv_width})")  # fmt: skip
            raise PrefixError(f"{where}: field '{name}' is {raw.get(name)!r} but the base model needs {ours}{hint}; "
                              "the prefix was trained on another model")  # fmt: skip


def prefix_values(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prefix encoder's output (P, num_layers * 2 * kv_width) in float32 from its weights (names inside the
    encoder), applying the projection when there is one."""
    e = tensors["embedding.weight"].to(torch.float32)
    if "trans.0.weight" in tensors:
        t = {k: v.to(torch.float32) for k, v in tensors.items()}
        e = torch.tanh(e @ t["trans.0.weight"].T + t["trans.0.bias"]) @ t["trans.2.weight"].T + t["trans.2.bias"]
    return e.contiguous()


def peft_prefix_config(
    model_cfg: GLMConfig, pre_seq_len: int, *, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for this prefix on the original model (inference mode: the values are
    stored as they are used, so ``prefix_projection`` is false whatever the training used)."""
    if model_cfg.arch == "glm":
        raise PrefixError("ChatGLM-6B (v1) prefixes have no PEFT form; export them in the official format")
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": pre_seq_len,
        "num_layers": model_cfg.num_layers,
        "token_dim": model_cfg.num_kv_heads * model_cfg.head_dim,
        "num_attention_heads": model_cfg.num_kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": model_cfg.hidden_size,
        "prefix_projection": False,
        "auto_mapping": None,
        "modules_to_save": None,
    }


def write_peft_prefix(tmp: Path, values: torch.Tensor, config: dict[str, Any]) -> None:
    """Write adapter_config.json and adapter_model.safetensors into the (temporary) folder ``tmp``."""
    save_file({TENSOR_NAME: values.to(torch.float32).contiguous()}, str(tmp / SAFETENSORS_NAME))
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_peft_prefix(
    model: torch.nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``model``'s prefix as a PEFT PREFIX_TUNING adapter folder (atomically)."""
    from glmtune.adapters.ptuning import prefix_state_dict

    tensors = {k[len(PREFIX) :]: v for k, v in prefix_state_dict(model).items()}
    values = prefix_values(tensors)
    config = peft_prefix_config(model.config, values.shape[0], base_model_name_or_path=base_model_name_or_path)
    atomic_write_dir(Path(out_dir), lambda tmp: write_peft_prefix(tmp, values, config))
    log.info("saved PEFT prefix (%d virtual tokens) to %s", values.shape[0], out_dir)
    return Path(out_dir)
