"""Open whatever a user points at for inference: a model folder, a run, a checkpoint, a PEFT adapter or a P-Tuning
prefix, and get back a ready ``Pretrained`` (model, tokenizer, template).

``resolve`` works out what a path is and where its base model lives, without loading anything; ``chat``, ``eval``,
``merge`` and ``export`` share it. What counts:

- a run folder (``run.json``): its ``model/`` (or, when the run never finished, its latest checkpoint's ``model/``);
  the base model and generation come from ``run.json``;
- a checkpoint ``<run>/checkpoints/step-N`` or its ``model/``, and a run's ``model/``: the same, from that folder;
- a PEFT adapter folder (``adapter_config.json``; LoRA, or PREFIX_TUNING as GLM-4's official P-Tuning saves it):
  base from ``base``, else ``base_model_name_or_path`` when that is an existing local folder;
- an official P-Tuning folder (only ``transformer.prefix_encoder.*`` in its weights): base from ``base``;
- anything else: a model folder in the original layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from glmtune.models.quant import is_quantized
from glmtune.pretrained import Pretrained, load_pretrained
from glmtune.train.run_folder import RUN_FILE, RUN_FORMAT
from glmtune.train.state import checkpoint_step, latest_checkpoint

log = logging.getLogger(__name__)

Kind = Literal["model", "lora", "ptuning"]


@dataclass
class Resolved:
    """What a path holds: ``kind`` of result in ``result_dir``, the base model it applies to (None for a complete
    model), and the run it belongs to (if any)."""

    path: Path
    kind: Kind
    result_dir: Path
    base_dir: Path | None
    generation: str | None
    run_dir: Path | None
    run: dict[str, Any] | None

    @property
    def method(self) -> dict[str, Any] | None:
        return self.run.get("method") if self.run else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """run.json, checked; raises ValueError naming the file and field."""
    path = Path(run_dir) / RUN_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(raw, dict) or raw.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: field 'format' should be {RUN_FORMAT!r}; not a glmtune run file")
    if not isinstance(raw.get("base_model"), str):
        raise ValueError(f"{path}: field 'base_model' is missing")
    method = raw.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ValueError(f"{path}: field 'method' should be an object with a 'name'")
    return raw


def _run_of(path: Path) -> tuple[Path | None, Path]:
    """(run folder or None, result folder) for a run, a run's model/, a checkpoint or a checkpoint's model/."""
    if (path / RUN_FILE).is_file():
        result = path / "model"
        if not result.is_dir():
            latest = latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f"{path}: the run has no model/ folder and no checkpoint yet")
            log.warning("%s has no final model/ (an unfinished run?); using %s", path, latest)
            result = latest / "model"
        return path, result
    if path.name == "model" and (path.parent / RUN_FILE).is_file():
        return path.parent, path
    if checkpoint_step(path) is not None and (path / "model").is_dir():
        run = path.parent.parent
        return (run if (run / RUN_FILE).is_file() else None), path / "model"
    if path.name == "model" and checkpoint_step(path.parent) is not None:
        run = path.parent.parent.parent
        return (run if (run / RUN_FILE).is_file() else None), path
    return None, path


def _kind(result: Path) -> Kind:
    from glmtune.adapters.peft_format import is_peft_adapter_dir
    from glmtune.adapters.ptuning import is_prefix_dir

    if is_prefix_dir(result):  # first: a PEFT PREFIX_TUNING folder is a PEFT adapter folder too
        return "ptuning"
    if is_peft_adapter_dir(result):
        return "lora"
    return "model"


def resolve(path: str | Path, *, base: str | Path | None = None, require_base: bool = True) -> Resolved:
    """Work out what ``path`` is (see the module docstring) and its base model folder; loads nothing.

    ``require_base=False``: an adapter or prefix whose base cannot be found gets ``base_dir=None`` instead of an
    error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a run, checkpoint, adapter or model folder)")
    run_dir, result = _run_of(path)
    run = read_run(run_dir) if run_dir is not None else None
    kind = _kind(result)
    method_name = run["method"]["name"] if run else None
    expected = {"lora": "lora", "ptuning": "ptuning"}.get(method_name or "", "model")
    if run is not None and kind != expected:
        raise ValueError(
            f"{run_dir / RUN_FILE}: field 'method' says {method_name!r} but {result} holds a "
            f"{'PEFT adapter' if kind == 'lora' else 'P-Tuning prefix' if kind == 'ptuning' else 'complete model'}"
        )
    base_dir: Path | None = None
    if kind != "model":
        base_dir = _base_dir(kind, result, run_dir, run, base, require_base)
    generation = run.get("generation") if run else None
    return Resolved(path, kind, result, base_dir, generation, run_dir, run)


def _base_dir(kind: Kind, result: Path, run_dir: Path | None, run: dict[str, Any] | None,
              base: str | Path | None, required: bool) -> Path | None:  # fmt: skip
    if base is not None:
        b = Path(base)
        if not b.is_dir():
            raise FileNotFoundError(f"--base {b}: not a folder")
        return b
    if run is not None:
        b = Path(run["base_model"])
        if not b.is_dir():
            if not required:
                return None
            raise FileNotFoundError(
                f"{run_dir / RUN_FILE}: field 'base_model' names {b}, which is not a folder here; pass the base model "
                "folder with --base"
            )
        return b
    what = "PEFT adapter" if kind == "lora" else "P-Tuning prefix"
    from glmtune.adapters.peft_format import CONFIG_NAME, read_adapter_config

    if (result / CONFIG_NAME).is_file():  # PEFT (LoRA or prefix) records its base
        if kind == "lora":
            name = read_adapter_config(result).get("base_model_name_or_path")
        else:  # is_peft_prefix_dir has parsed it already
            name = json.loads((result / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
        if isinstance(name, str) and name and Path(name).is_dir():
            return Path(name)
        if not required:
            return None
        hint = f" (its 'base_model_name_or_path' {name!r} is not a local folder)" if name else ""
        raise ValueError(f"{result / CONFIG_NAME}: a {what} needs its base model{hint}; pass the folder with --base")
    from glmtune.adapters.ptuning import EXPORT_INFO

    if kind == "ptuning" and (result / EXPORT_INFO).is_file():  # `glmtune export` recorded the base
        try:
            name = json.loads((result / EXPORT_INFO).read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{result / EXPORT_INFO}: not the JSON object glmtune export writes ({e})") from e
        if isinstance(name, str) and name and Path(name).is_dir():
            return Path(name)
    if not required:
        return None
    raise ValueError(f"{result}: a {what} needs its base model; pass the base model folder with --base")


def load_for_inference(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    generation: str | None = None,
    base: str | Path | None = None,
    merge: bool = True,
    quantize: str | None = None,
) -> Pretrained:
    """Load a model folder, run, checkpoint, PEFT adapter or P-Tuning folder, ready for generation (eval mode).

    A LoRA adapter is merged into the weights unless ``merge=False`` or the base is quantized (then it stays beside
    the frozen quantized layers); a P-Tuning prefix keeps its encoder in float32. ``generation`` overrides the run's
    (and the detection from the tokenizer files); ``quantize`` (none, int8, int4) quantizes the base's block linears
    as they load (``load_pretrained``)."""
    r = resolve(path, base=base)
    generation = generation or r.generation
    if r.kind == "model":
        pre = load_pretrained(r.result_dir, dtype=dtype, device=device, generation=generation, quantize=quantize)
    else:
        assert r.base_dir is not None
        pre = load_pretrained(r.base_dir, dtype=dtype, device=device, generation=generation, quantize=quantize)
        if r.kind == "lora":
            from glmtune.adapters.lora import merge_lora
            from glmtune.adapters.peft_format import load_lora_adapter

            load_lora_adapter(pre.model, r.result_dir)
            if merge and any(is_quantized(m) for m in pre.model.modules()):
                log.info("keeping the LoRA adapter beside the quantized base (it cannot be folded into int weights)")
            elif merge:
                merge_lora(pre.model)
        else:
            from glmtune.adapters.ptuning import load_prefix

            load_prefix(pre.model, r.result_dir)
        for p in pre.model.parameters():
            p.requires_grad_(False)
        pre.model.eval()
    log.info("loaded %s (%s%s)", path, r.kind, f" on {r.base_dir}" if r.base_dir else "")
    return dataclasses.replace(pre, path=Path(path))
