"""Ship a fine-tune: LoRA folded into a complete original-format checkpoint, or a P-Tuning prefix in the layout the
official demos load.

``merge_lora_to_checkpoint`` streams the base checkpoint tensor by tensor (``checkpoint.iter_checkpoint``): a weight
with a LoRA update becomes ``W + scale * B @ A`` (computed in float32, rounded once), every other tensor is copied,
and output shards of at most ``max_shard_bytes`` are written as soon as they fill. The host holds one output shard,
the reader's window of the input file and one float32 matrix, never the whole model. The folder gets
``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), the base's
``config.json`` (``torch_dtype`` updated when converting) and every other file of the base folder (tokenizer, the
original code files, generation_config.json), so it loads in glmtune and in the original code alike.

A quantized base: the block linears the adapter was trained over are the dequantized ones. A THUDM int4/int8 folder
is dequantized (integer x row scale); an adapter trained with ``quantize: int8|int4|nf4`` over a full-precision
folder (QLoRA) is merged into the round trip of each block linear through that quantization, so the merged model is
the one the adapter was trained with. ``bits`` 4/8 writes the merged block linears in THUDM's format instead.
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
    read_tensors,
)
from glmtune.models.quant import QUANTIZED_WEIGHT, check_bits, dequantize_weight, quantize_weight
from glmtune.pretrained import DTYPES, quantization

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


def _check_adapter_fits(adapter: LoraAdapter, base_dir: Path, stored_bits: int) -> dict[str, Any]:
    infos = read_tensor_infos(base_dir)
    for module, w in adapter.modules.items():
        info = infos.get(f"{module}.weight")
        if info is None:
            raise AdapterError(
                f"{adapter.weights_file}: the adapter has weights for module '{module}' but {base_dir} has no tensor "
                f"'{module}.weight'; was it trained on another model generation?"
            )
        expected = (w.b.shape[0], w.a.shape[1])
        quantized = stored_bits and QUANTIZED_WEIGHT.match(f"{module}.weight")
        stored = (expected[0], expected[1] // 2) if quantized and stored_bits == 4 else expected
        if tuple(info.shape) != stored:
            raise AdapterError(
                f"{adapter.weights_file}: module '{module}' implies a weight of shape {expected}, but "
                f"'{module}.weight' in {info.file} has shape {tuple(info.shape)}"
                + (f" (INT{stored_bits}: expected {stored})" if quantized else "")
            )
        if not quantized and not info.dtype.startswith(("float", "bfloat")):
            raise AdapterError(
                f"{info.file}: '{module}.weight' is {info.dtype}, but config.json declares no quantization_bit: "
                "a quantized checkpoint whose config.json lost the field?"
            )
        if quantized and f"{module}.weight_scale" not in infos:
            raise AdapterError(f"{base_dir}: INT{stored_bits} weight '{module}.weight' has no "
                               f"'{module}.weight_scale' (fp16, shape ({expected[0]},))")  # fmt: skip
    return infos


def _base_linear(
    name: str,
    t: torch.Tensor,
    stored_bits: int,
    scales: dict[str, torch.Tensor],
    trained_on: str,
    quant_dtype: torch.dtype,
) -> torch.Tensor:
    """A block linear's weight (out, in) in float32 as the adapter saw it (see the module docstring)."""
    if stored_bits:
        scale = scales.get(name + "_scale")
        if scale is None:
            raise AdapterError(f"INT{stored_bits} weight '{name}' has no '{name}_scale' in the base folder")
        if scale.shape != (t.shape[0],):
            raise AdapterError(f"'{name}_scale' has shape {tuple(scale.shape)}, expected ({t.shape[0]},) (one fp16 "
                               f"scale per row of '{name}')")  # fmt: skip
        return dequantize_weight(t, scale, stored_bits, torch.float32)
    if trained_on == "nf4":
        from glmtune.models.nf4 import nf4_round_trip

        return nf4_round_trip(t.to(quant_dtype)).float()
    if trained_on in ("int8", "int4"):
        bits = int(trained_on[3:])
        return dequantize_weight(*quantize_weight(t.float(), bits), bits, torch.float32)
    return t.float()


def merge_lora_to_checkpoint(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    trained_on: str = "none",
    quant_dtype: torch.dtype = torch.float32,
    bits: int | None = None,
) -> Path:
    """Write ``out_dir``: the base checkpoint with the PEFT LoRA adapter of ``adapter_dir`` folded in.

    ``dtype`` converts the floating tensors (None / "auto": keep each tensor's dtype, the base's ``torch_dtype`` for
    dequantized ones; rotary ``inv_freq`` buffers always keep theirs). ``trained_on`` (none, int8, int4, nf4): the
    ``quantize`` the adapter was trained with (nf4 quantizes from ``quant_dtype``, the training's load dtype);
    ``bits`` 4/8: the block linears written in THUDM's format. The folder is built aside and swapped in when
    complete."""
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
    if bits is not None:
        check_bits(bits)
    scheme = quantization(raw_config, trained_on, source=config_path)  # the folder's int4/int8, or what training used
    stored_bits = int(scheme[3:]) if raw_config.get("quantization_bit") else 0
    checkpoint_files(base_dir)  # a clear error for a folder without weights
    adapter = read_lora_adapter(adapter_dir)
    infos = _check_adapter_fits(adapter, base_dir, stored_bits)
    scales = read_tensors(i for n, i in infos.items() if n.endswith(".weight_scale")) if stored_bits else {}
    dequantized_dtype = out_dtype or DTYPES.get(str(raw_config.get("torch_dtype")), torch.float16)

    def fill(tmp: Path) -> None:
        merged: set[str] = set()
        seen: set[str] = set()
        with ShardWriter(tmp, max_shard_bytes) as writer:
            for name, t, file in iter_checkpoint(base_dir):
                if name in seen:
                    raise AdapterError(f"{file}: tensor '{name}' appears twice in {base_dir}")
                seen.add(name)
                if stored_bits and name.endswith(".weight_scale"):
                    continue  # used with its weight
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                target = out_dtype if (out_dtype is not None and t.is_floating_point() and
                                       not name.endswith("inv_freq")) else t.dtype  # fmt: skip
                if QUANTIZED_WEIGHT.match(name) and (scheme != "none" or bits):
                    w = _base_linear(name, t, stored_bits, scales, scheme, quant_dtype)  # float32
                    del t
                    if module in adapter.modules:
                        w += adapter.modules[module].delta()
                        merged.add(module)
                    if bits:
                        q, scale = quantize_weight(w, bits)
                        writer.add(name, q)
                        writer.add(name + "_scale", scale)
                    else:
                        writer.add(name, w.to(target if target.is_floating_point else dequantized_dtype))
                    continue
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
        if bits or config.get("quantization_bit"):
            config["quantization_bit"] = bits or 0  # 0: as the full-precision originals (v1) say it
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
