"""P-Tuning v2: a trainable prefix encoder in front of a frozen model, saved in the official prefix-only format.

``setup`` gives a model built without ``pre_seq_len`` its prefix encoder (``models/prefix.py``) in float32, whatever
the base's precision: it sets ``model.config.pre_seq_len`` / ``prefix_projection``, which the model classes read at
forward time, and adds ``model.transformer.prefix_encoder`` (and ChatGLM-6B's ``prefix_dropout``).

The official format, as the THUDM P-Tuning scripts save and load it: a folder with ``pytorch_model.bin`` holding
only ``transformer.prefix_encoder.*`` tensors, and the base model's ``config.json`` carrying ``pre_seq_len`` and
``prefix_projection``. Loading checks the saved config against the tensors and against the model, so a different
``pre_seq_len`` or projection, or a prefix trained on another model size, is an error naming the file, not a
size-mismatch traceback. ``model.safetensors`` holding the same tensors is read as well, and so are PEFT
PREFIX_TUNING folders (``peft_prefix.py``; GLM-4's official P-Tuning saves those).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from glmtune.io import atomic_write_dir
from glmtune.models.checkpoint import BIN_INDEX, SAFE_INDEX, file_tensor_infos, read_tensor_file
from glmtune.models.config import ConfigError, GLMConfig
from glmtune.models.prefix import make_prefix_encoder

if TYPE_CHECKING:
    from glmtune.adapters import PTuningOptions

log = logging.getLogger(__name__)

PREFIX = "transformer.prefix_encoder."
WEIGHTS_NAME = "pytorch_model.bin"
EXPORT_INFO = "glmtune.json"  # what `glmtune export` records beside an official P-Tuning folder (its base)
SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREFIX_DROPOUT = 0.1  # the original models' dropout on the prefix keys/values (training only)


class PrefixError(ValueError):
    """A prefix checkpoint that does not fit the model or the method; the message names the file and field."""


def _model_device(model: nn.Module) -> torch.device:
    get_out = getattr(model, "output_embeddings", None)
    if callable(get_out):
        return get_out().weight.device
    return next(model.parameters()).device


def prefix_encoder(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(model, "transformer", None), "prefix_encoder", None)


def attach_prefix_encoder(
    model: nn.Module, pre_seq_len: int, prefix_projection: bool, *, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Give ``model`` a fresh prefix encoder in ``dtype`` (float32) on the model's device; returns it.

    A model that already has one keeps it when ``pre_seq_len`` / ``prefix_projection`` agree (cast to ``dtype``)."""
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len <= 0:
        raise ValueError(f"pre_seq_len must be a positive integer, got {pre_seq_len!r}")
    cfg = model.config
    existing = prefix_encoder(model)
    if existing is not None:
        if (cfg.pre_seq_len, bool(cfg.prefix_projection)) != (pre_seq_len, bool(prefix_projection)):
            raise PrefixError(
                f"the model already has a prefix encoder with pre_seq_len={cfg.pre_seq_len}, "
                f"prefix_projection={cfg.prefix_projection}; asked for pre_seq_len={pre_seq_len}, "
                f"prefix_projection={prefix_projection}"
            )
        return existing.to(dtype)
    cfg.pre_seq_len = pre_seq_len
    cfg.prefix_projection = bool(prefix_projection)
    tr = model.transformer
    tr.prefix_encoder = make_prefix_encoder(cfg, device=_model_device(model), dtype=dtype)
    if not isinstance(getattr(tr, "prefix_dropout", None), nn.Module):
        tr.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
    tr.prefix_encoder.train(model.training)  # new modules follow the model's train/eval mode
    tr.prefix_dropout.train(model.training)
    return tr.prefix_encoder


# ---- the checkpoint ----------------------------------------------------------------------------------------------
@dataclass
class PrefixCheckpoint:
    path: Path
    weights_file: Path
    config_file: Path | None
    pre_seq_len: int
    prefix_projection: bool
    tensors: dict[str, torch.Tensor]  # names inside the encoder: embedding.weight, trans.0.weight, ...
    config: GLMConfig | None  # the saved config.json (the base's, with pre_seq_len), when present
    peft_config: dict[str, Any] | None = None  # adapter_config.json of a PEFT PREFIX_TUNING folder

    @property
    def where(self) -> Path:
        return self.config_file or self.weights_file


def prefix_weights_file(src_dir: str | Path) -> Path | None:
    src_dir = Path(src_dir)
    for name in (WEIGHTS_NAME, SAFETENSORS_NAME):
        if (src_dir / name).is_file():
            return src_dir / name
    return None


def is_prefix_dir(path: str | Path) -> bool:
    """A folder in the official P-Tuning layout (its single weight file holds only ``transformer.prefix_encoder.*``)
    or a PEFT PREFIX_TUNING adapter folder."""
    from glmtune.adapters.peft_prefix import is_peft_prefix_dir

    path = Path(path)
    if is_peft_prefix_dir(path):
        return True
    weights = prefix_weights_file(path)
    if weights is None or (path / SAFE_INDEX).exists() or (path / BIN_INDEX).exists():
        return False
    try:
        names = [info.name for info in file_tensor_infos(weights)]
    except ValueError:
        return False
    return bool(names) and all(n.startswith(PREFIX) for n in names)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; PrefixError naming the file and line otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrefixError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise PrefixError(f"{path}: expected a JSON object")
    return raw


def _read_config(path: Path) -> tuple[dict[str, Any], GLMConfig | None]:
    raw = read_json_object(path)
    try:
        return raw, GLMConfig.from_dict(raw, source=str(path))
    except ConfigError:
        return raw, None


def read_prefix_checkpoint(src_dir: str | Path) -> PrefixCheckpoint:
    """Read an official P-Tuning v2 folder (checking config.json's pre_seq_len / prefix_projection against the
    tensors) or a PEFT PREFIX_TUNING folder (``peft_prefix.py``). PrefixError names the field or tensor that does
    not fit; CheckpointError an unreadable weights file."""
    src_dir = Path(src_dir)
    from glmtune.adapters.peft_prefix import is_peft_prefix_dir, read_peft_prefix

    if is_peft_prefix_dir(src_dir):
        return read_peft_prefix(src_dir)
    weights = prefix_weights_file(src_dir)
    if weights is None:
        raise PrefixError(f"{src_dir}: no P-Tuning checkpoint ({WEIGHTS_NAME} or {SAFETENSORS_NAME})")
    all_tensors = read_tensor_file(weights)
    tensors = {k[len(PREFIX) :]: v for k, v in all_tensors.items() if k.startswith(PREFIX)}
    if not tensors:
        raise PrefixError(f"{weights}: no '{PREFIX}*' tensors; not a P-Tuning v2 checkpoint")
    if len(tensors) != len(all_tensors):
        log.warning("%s: ignoring %d tensor(s) outside %s*", weights, len(all_tensors) - len(tensors), PREFIX)
    emb = tensors.get("embedding.weight")
    if emb is None or emb.ndim != 2:
        raise PrefixError(f"{weights}: missing the 2-D tensor '{PREFIX}embedding.weight'")
    pre_seq_len = emb.shape[0]
    projection = any(k.startswith("trans.") for k in tensors)

    config_file = src_dir / CONFIG_NAME
    config = None
    if config_file.is_file():
        raw, config = _read_config(config_file)
        saved_len = raw.get("pre_seq_len")
        if saved_len is None:
            log.warning("%s: no pre_seq_len; using %d from %s", config_file, pre_seq_len, weights.name)
        elif saved_len != pre_seq_len:
            raise PrefixError(
                f"{config_file}: field 'pre_seq_len' is {saved_len} but {weights.name} holds a prefix of "
                f"{pre_seq_len} positions ('{PREFIX}embedding.weight' has shape {tuple(emb.shape)})"
            )
        saved_proj = raw.get("prefix_projection")
        if saved_proj is not None and bool(saved_proj) != projection:
            raise PrefixError(
                f"{config_file}: field 'prefix_projection' is {saved_proj} but {weights.name} "
                + ("holds the projection's 'trans.*' tensors" if projection else "has no projection tensors")
            )
    else:
        config_file = None
        log.warning("%s: no %s beside the prefix; pre_seq_len %d read from the tensors", src_dir, CONFIG_NAME,
                    pre_seq_len)  # fmt: skip
    return PrefixCheckpoint(src_dir, weights, config_file, pre_seq_len, projection, tensors, config)


def check_prefix_base(ckpt: PrefixCheckpoint, model_cfg: GLMConfig) -> None:
    """PrefixError when the checkpoint's saved config describes another model than ``model_cfg``."""
    if ckpt.peft_config is not None:
        from glmtune.adapters.peft_prefix import check_peft_prefix_base

        check_peft_prefix_base(ckpt, model_cfg)
        return
    if ckpt.config is None:
        return
    if ckpt.config.arch != model_cfg.arch:
        raise PrefixError(
            f"{ckpt.config_file}: the prefix was trained on a "
            f"{'ChatGLM-6B (v1)' if ckpt.config.arch == 'glm' else 'ChatGLM2+'} model, the base model is not one"
        )
    for name in ("num_layers", "hidden_size", "num_attention_heads", "multi_query_group_num", "kv_channels"):
        saved, ours = getattr(ckpt.config, name), getattr(model_cfg, name)
        if saved != ours:
            raise PrefixError(
                f"{ckpt.config_file}: field '{name}' is {saved} but the base model has {ours}; "
                "the prefix was trained on another model"
            )


def load_prefix(model: nn.Module, src: str | Path | PrefixCheckpoint) -> nn.Module:
    """Put an official P-Tuning v2 prefix on ``model`` (attaching the encoder when it has none). Returns the encoder.

    Raises PrefixError naming the file when pre_seq_len / prefix_projection or a tensor shape does not fit."""
    ckpt = src if isinstance(src, PrefixCheckpoint) else read_prefix_checkpoint(src)
    cfg = model.config
    check_prefix_base(ckpt, cfg)
    encoder = prefix_encoder(model)
    if encoder is not None and (cfg.pre_seq_len, bool(cfg.prefix_projection)) != (
        ckpt.pre_seq_len, ckpt.prefix_projection,
    ):  # fmt: skip
        raise PrefixError(
            f"{ckpt.where}: the checkpoint has pre_seq_len={ckpt.pre_seq_len}, "
            f"prefix_projection={ckpt.prefix_projection}, but the model is set up with pre_seq_len={cfg.pre_seq_len}, "
            f"prefix_projection={cfg.prefix_projection}"
        )
    if encoder is None:
        encoder = attach_prefix_encoder(model, ckpt.pre_seq_len, ckpt.prefix_projection)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(own))
    if missing or unexpected:
        raise PrefixError(
            f"{ckpt.weights_file}: prefix tensors do not match the encoder (missing {[PREFIX + n for n in missing]}, "
            f"unexpected {[PREFIX + n for n in unexpected]})"
        )
    for name, t in ckpt.tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise PrefixError(
                f"{ckpt.weights_file}: tensor '{PREFIX}{name}' has shape {tuple(t.shape)}, this model's prefix "
                f"encoder expects {tuple(own[name].shape)} (num_layers={cfg.num_layers}, "
                f"kv width={cfg.num_kv_heads * cfg.head_dim}); was the prefix trained on another model?"
            )
    with torch.no_grad():
        for name, p in encoder.state_dict(keep_vars=True).items():
            p.copy_(ckpt.tensors[name].to(dtype=p.dtype, device=p.device))
    log.info("loaded P-Tuning prefix (pre_seq_len %d%s) from %s", ckpt.pre_seq_len,
             ", projection" if ckpt.prefix_projection else "", ckpt.weights_file)  # fmt: skip
    return encoder


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``transformer.prefix_encoder.*`` tensors, float32 on the CPU."""
    encoder = prefix_encoder(model)
    if encoder is None:
        raise ValueError("the model has no prefix encoder to save")
    return {PREFIX + k: v.detach().to("cpu", torch.float32).clone() for k, v in encoder.state_dict().items()}


def save_prefix(
    model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[str | Path] = ()
) -> Path:
    """Write the official layout atomically: pytorch_model.bin (prefix only) + config.json (``config`` with this
    prefix's pre_seq_len / prefix_projection) + copies of ``tokenizer_files``."""
    tensors = prefix_state_dict(model)
    encoder = prefix_encoder(model)
    cfg = dataclasses.replace(config, pre_seq_len=encoder.pre_seq_len, prefix_projection=encoder.prefix_projection)

    def fill(tmp: Path) -> None:
        torch.save(tensors, tmp / WEIGHTS_NAME)
        cfg.to_json(tmp / CONFIG_NAME)
        for f in tokenizer_files:
            f = Path(f)
            if f.name in (WEIGHTS_NAME, CONFIG_NAME):
                raise ValueError(f"{f}: a tokenizer file may not be named {f.name}")
            shutil.copy2(f, tmp / f.name)

    atomic_write_dir(Path(out_dir), fill)
    log.info("saved P-Tuning prefix (pre_seq_len %d) to %s", encoder.pre_seq_len, out_dir)
    return Path(out_dir)


# ---- the method --------------------------------------------------------------------------------------------------
class PTuningMethod:
    """``ptuning``: frozen base, a float32 prefix encoder of ``pre_seq_len`` positions (optionally projected)."""

    name = "ptuning"

    def __init__(self, options: PTuningOptions) -> None:
        self.options = options

    def setup(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        encoder = attach_prefix_encoder(model, self.options.pre_seq_len, self.options.prefix_projection)
        for p in encoder.parameters():
            p.requires_grad_(True)
        log.info("P-Tuning v2: pre_seq_len %d%s, encoder in float32", self.options.pre_seq_len,
                 ", prefix projection" if self.options.prefix_projection else "")  # fmt: skip

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if n.startswith(PREFIX)]

    def save(
        self, model: nn.Module, out_dir: str | Path, *, config: GLMConfig, tokenizer_files: Sequence[Path] = ()
    ) -> None:
        save_prefix(model, out_dir, config=config, tokenizer_files=tokenizer_files)

    def load(self, model: nn.Module, src_dir: str | Path) -> None:
        ckpt = read_prefix_checkpoint(src_dir)
        o = self.options
        if (ckpt.pre_seq_len, ckpt.prefix_projection) != (o.pre_seq_len, bool(o.prefix_projection)):
            raise PrefixError(
                f"{ckpt.where}: the checkpoint has pre_seq_len={ckpt.pre_seq_len}, "
                f"prefix_projection={ckpt.prefix_projection}; the method options say pre_seq_len={o.pre_seq_len}, "
                f"prefix_projection={o.prefix_projection}"
            )
        load_prefix(model, ckpt)

    def merge(self, model: nn.Module) -> None:
        raise ValueError("a P-Tuning prefix cannot be merged into the weights; use `glmtune export` to ship it")
