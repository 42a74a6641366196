"""Ship a fine-tune: LoRA folded into a complete original-format checkpoint, or a P-Tuning prefix in the layout the
official demos load.

``merge_lora_to_checkpoint`` streams the base checkpoint tensor by tensor (``checkpoint.iter_checkpoint``): a weight
with a LoRA update becomes ``W + scale * B @ A`` (computed in float32, rounded once), every other tensor is copied,
and output shards of at most ``max_shard_bytes`` are written as soon as they fill. The host holds one output shard,
the reader's window of the input file and one float32 matrix, never the whole model. The folder gets
``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), the base's
``config.json`` (``torch_dtype`` updated when converting) and every other file of the base folder (tokenizer, the
original code files, generation_config.json), so it loads in glmtune and in the original code alike.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from glmtune.adapters.peft_format import AdapterError, LoraAdapter, read_lora_adapter
from glmtune.adapters.ptuning import CONFIG_NAME, EXPORT_INFO, PREFIX, WEIGHTS_NAME, read_prefix_checkpoint
from glmtune.io import atomic_write_dir
from glmtune.models.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    WEIGHT_FILE,
    ShardWriter,
    checkpoint_files,
    iter_checkpoint,
    read_tensor_infos,
)
from glmtune.pretrained import DTYPES

log = logging.getLogger(__name__)

_TRAINING_FILES = {"trainer_state.json", "training_args.bin", "all_results.json", "train_results.json"}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_out_dir(out_dir: Path, sources: list[Path], overwrite: bool) -> None:
    for src in sources:
        if out_dir.resolve() == src.resolve():
            raise ValueError(f"the output folder {out_dir} is an input folder; choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: folder exists and is not empty (use --overwrite to replace it)")


def _copy_side_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the files of a model folder that are not weights or training state (tokenizer, code, generation
    config); an official checkpoint-N folder's optimizer.pt, rng_state.pth, trainer_state.json stay behind."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in skip or p.name in _TRAINING_FILES:
            continue
        if WEIGHT_FILE.fullmatch(p.name) or p.suffix in (".pt", ".pth", ".bin", ".safetensors"):
            continue
        shutil.copy2(p, dst / p.name)


def _check_adapter_fits(adapter: LoraAdapter, base_dir: Path) -> dict[str, Any]:
    infos = read_tensor_infos(base_dir)
    for module, w in adapter.modules.items():
        info = infos.get(f"{module}.weight")
        if info is None:
            raise AdapterError(
                f"{adapter.weights_file}: the adapter has weights for module '{module}' but {base_dir} has no tensor "
                f"'{module}.weight'; was it trained on another model generation?"
            )
        expected = (w.b.shape[0], w.a.shape[1])
        if tuple(info.shape) != expected:
            raise AdapterError(
                f"{adapter.weights_file}: module '{module}' implies a weight of shape {expected}, but "
                f"'{module}.weight' in {info.file} has shape {tuple(info.shape)}"
            )
        if not info.dtype.startswith(("float", "bfloat")):
            raise AdapterError(
                f"{info.file}: '{module}.weight' is {info.dtype} (a quantized checkpoint?); merge into an unquantized "
                "base model"
            )
    return infos


def merge_lora_to_checkpoint(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir``: the base checkpoint with the PEFT LoRA adapter of ``adapter_dir`` folded in.

    ``dtype`` converts the floating tensors (None / "auto": keep each tensor's dtype; rotary ``inv_freq`` buffers
    always keep theirs). The folder is built aside and swapped in when complete."""
    start = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    out_dtype = _dtype(dtype)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    _check_out_dir(out_dir, [base_dir, adapter_dir], overwrite)
    config_path = base_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (the base model folder needs its config.json)")
    raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    checkpoint_files(base_dir)  # a clear error for a folder without weights
    adapter = read_lora_adapter(adapter_dir)
    _check_adapter_fits(adapter, base_dir)

    def fill(tmp: Path) -> None:
        merged: set[str] = set()
        seen: set[str] = set()
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for name, t, file in iter_checkpoint(base_dir):
                if name in seen:
                    raise AdapterError(f"{file}: tensor '{name}' appears twice in {base_dir}")
                seen.add(name)
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                target = out_dtype if (out_dtype is not None and t.is_floating_point() and
                                       not name.endswith("inv_freq")) else t.dtype  # fmt: skip
                if module is not None and module in adapter.modules:
                    out = (t.float() + adapter.modules[module].delta()).to(target)  # (out, in)
                    merged.add(module)
                else:
                    out = t.to(dtype=target, copy=True)
                del t
                writer.add(name, out)
            if missing := sorted(set(adapter.modules) - merged):
                raise AdapterError(f"{adapter.weights_file}: modules {missing[:5]} were not found in {base_dir}")
            writer.finish()
        config = dict(raw_config)
        if out_dtype is not None:
            config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _copy_side_files(base_dir, tmp, skip={CONFIG_NAME})

    atomic_write_dir(out_dir, fill)
    log.info("merged LoRA %s (%d modules) into %s -> %s in %.1fs", adapter_dir, len(adapter.modules), base_dir,
             out_dir, time.perf_counter() - start)  # fmt: skip
    return out_dir


def export_ptuning(
    run_or_prefix_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
    format: str = "official",
) -> Path:
    """Write the folder the official P-Tuning demos load as their checkpoint: the base model's config.json with
    ``pre_seq_len`` / ``prefix_projection`` set, ``pytorch_model.bin`` with only ``transformer.prefix_encoder.*``, and
    the base folder's other files (tokenizer, code) so it is complete on its own; ``glmtune.json`` names the base.

    ``format="peft"`` writes a PEFT PREFIX_TUNING adapter instead (adapter_config.json + adapter_model.safetensors,
    ``peft_prefix.py``), what GLM-4's official finetune and inference scripts use; ChatGLM2+ only.

    ``run_or_prefix_dir``: a P-Tuning run (base from run.json), one of its checkpoints, or a prefix folder (the base,
    from ``base``, is optional then: without it the prefix folder's own config and tokenizer files are used)."""
    if format not in ("official", "peft"):
        raise ValueError(f"format must be 'official' or 'peft', got {format!r}")
    from glmtune.runs import resolve

    src = Path(run_or_prefix_dir)
    out_dir = Path(out_dir)
    r = resolve(src, base=base, require_base=False)
    if r.kind != "ptuning":
        raise ValueError(f"{src}: holds a {'LoRA adapter' if r.kind == 'lora' else 'complete model'}, not a P-Tuning "
                         "prefix; `glmtune export` ships P-Tuning prefixes (`glmtune merge` folds LoRA)")  # fmt: skip
    prefix_dir, base_dir = r.result_dir, r.base_dir  # no base: the prefix folder's own config.json is the base's
    ckpt = read_prefix_checkpoint(prefix_dir)
    _check_out_dir(out_dir, [prefix_dir] + ([base_dir] if base_dir else []), overwrite)
    config_src = (base_dir or prefix_dir) / CONFIG_NAME
    if not config_src.is_file():
        raise FileNotFoundError(f"{config_src}: no such file; pass the base model folder with --base")
    config = json.loads(config_src.read_text(encoding="utf-8"))
    if base_dir is not None:
        from glmtune.adapters.ptuning import check_prefix_base
        from glmtune.models.config import GLMConfig

        check_prefix_base(ckpt, GLMConfig.from_dict(config, source=str(config_src)))
    if format == "peft":
        from glmtune.adapters.peft_prefix import peft_prefix_config, prefix_values, write_peft_prefix
        from glmtune.models.config import GLMConfig

        values = prefix_values(ckpt.tensors)
        base_name = str(base_dir.resolve()) if base_dir is not None else None
        peft_config = peft_prefix_config(GLMConfig.from_dict(config, source=str(config_src)), ckpt.pre_seq_len,
                                         base_model_name_or_path=base_name)  # fmt: skip
        atomic_write_dir(out_dir, lambda tmp: write_peft_prefix(tmp, values, peft_config))
        log.info("exported P-Tuning prefix (%d virtual tokens) from %s to %s as a PEFT adapter", ckpt.pre_seq_len,
                 prefix_dir, out_dir)  # fmt: skip
        return out_dir
    config["pre_seq_len"] = ckpt.pre_seq_len
    config["prefix_projection"] = ckpt.prefix_projection
    tensors = {PREFIX + k: v.to(torch.float32).contiguous() for k, v in ckpt.tensors.items()}

    # The official layout has no field for the base model: glmtune.json records it (null when not known).
    info = {"format": "glmtune-ptuning-export", "base_model": str(base_dir.resolve()) if base_dir else None,
            "source": str(prefix_dir.resolve())}  # fmt: skip

    def fill(tmp: Path) -> None:
        torch.save(tensors, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        skip = {CONFIG_NAME, WEIGHTS_NAME, EXPORT_INFO}
        if base_dir is not None:
            _copy_side_files(base_dir, tmp, skip)
        peft_files = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}  # a PEFT source's
        _copy_side_files(prefix_dir, tmp, skip | peft_files | {p.name for p in tmp.iterdir()})

    atomic_write_dir(out_dir, fill)
    log.info("exported P-Tuning prefix (pre_seq_len %d) from %s to %s", ckpt.pre_seq_len, prefix_dir, out_dir)
    return out_dir
