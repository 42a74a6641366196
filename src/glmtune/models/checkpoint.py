"""Original-format checkpoints: stream the shards into a model built on "meta", and write them back.

A model folder holds its weights in one of these layouts (the first one found wins):

- ``model.safetensors.index.json`` + the shards its ``weight_map`` names (GLM-4, ChatGLM3)
- ``model.safetensors``
- ``pytorch_model.bin.index.json`` + shards such as ``pytorch_model-00001-of-00008.bin`` (ChatGLM-6B, ChatGLM2/3)
- ``pytorch_model.bin``
- shards named ``model-0000i-of-0000n.safetensors`` / ``pytorch_model-0000i-of-0000n.bin`` without an index

Loading goes tensor by tensor: each tensor is read from its shard, converted straight into the target dtype on the
target device, and set into the module in place of its meta tensor. The shard's memory map is dropped every few
hundred MiB, so the host holds the loaded model plus a small window of the file, never an fp32 copy of the whole.
Names are the original ones (``transformer.encoder.layers.0.self_attention.query_key_value.weight``, ...); the model
passes regexes for names that may be missing or should be skipped, and aliases for checkpoint names it stores under
another name (ChatGLM-6B ships ``lm_head.weight`` as a copy of ``transformer.word_embeddings.weight``).

Reading uses only ``safetensors.safe_open`` and ``torch.load(weights_only=True)``; no code from a model folder runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glmtune.io import atomic_write_dir, atomic_write_text
from glmtune.models.config import GLMConfig
from glmtune.models.nf4 import NF4Linear
from glmtune.models.quant import QuantizedLinear, quantize_weight

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_SAFE_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
_BIN_SHARD = re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin")
# Any weight file or index of a model folder (what a save replaces, what a copy of the folder leaves out).
WEIGHT_FILE = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)(\.index\.json)?")
# Drop a shard's memory map after this many bytes were read from it, so its touched pages leave the RSS.
_WINDOW_BYTES = 128 * 2**20
# Tensors larger than this are read and converted in row ranges of about this size.
_CHUNK_BYTES = 32 * 2**20
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

_SAFE_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class LocalShards(Protocol):
    """How a process keeps only its piece of sharded parameters as they load (FSDP: ``train/fsdp.py``)."""

    def rows(self, template: torch.Tensor) -> tuple[int, int] | None:
        """The rows (dim 0) of the model's tensor ``template`` this process keeps; None: the whole tensor."""
        ...

    def wrap(self, template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The tensor to put in the model in place of ``template``, made of this process's rows ``local``."""
        ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor's name, shape and dtype, read without loading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch name: "float16", "bfloat16", ...
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class LoadReport:
    """What ``load_weights`` did."""

    loaded: list[str] = field(default_factory=list)  # model names that received a checkpoint tensor
    missing_optional: list[str] = field(default_factory=list)  # optional model names left on meta: initialise these
    skipped: list[str] = field(default_factory=list)  # checkpoint names matched by ``ignore``
    tied: list[str] = field(default_factory=list)  # checkpoint names that landed on an already loaded shared tensor
    files: list[Path] = field(default_factory=list)
    num_bytes: int = 0  # bytes of the loaded tensors in their target dtype
    seconds: float = 0.0


# ---- finding the files -------------------------------------------------------------------------------------------
def _read_index(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the index ({e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: field 'weight_map' must be an object mapping tensor names to file names")
    return weight_map


def read_weight_map(model_dir: str | Path) -> dict[str, Path] | None:
    """The index's tensor name -> shard path (None when the folder has no index)."""
    model_dir = Path(model_dir)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            return {name: model_dir / file for name, file in _read_index(index).items()}
    return None


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model folder, in load order (see the module docstring for the layouts)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder (expected a model folder with weight files)")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if not index.is_file():
            continue
        weight_map = _read_index(index)
        if not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is empty")
        files: dict[str, str] = {}
        for name, file in weight_map.items():
            files.setdefault(file, name)
        for file, name in files.items():
            if Path(file).name != file:
                raise CheckpointError(f"{index}: shard '{file}' (tensor '{name}') must be a file name in the folder")
            if not (model_dir / file).is_file():
                raise CheckpointError(
                    f"{index}: shard file '{file}' (holding tensor '{name}') is missing from {model_dir}"
                )
        return [model_dir / f for f in sorted(files)]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (model_dir / single).is_file():
            return [model_dir / single]
    for pattern in (_SAFE_SHARD, _BIN_SHARD):
        shards = sorted(p for p in model_dir.iterdir() if pattern.fullmatch(p.name))
        if shards:
            total = int(pattern.fullmatch(shards[0].name).group(2))  # type: ignore[union-attr]
            if len(shards) != total:
                raise CheckpointError(
                    f"{model_dir}: found {len(shards)} of {total} shards ({', '.join(p.name for p in shards)}) "
                    "and no index file"
                )
            log.warning("%s: no index file; reading the %d shards %s...", model_dir, total, shards[0].name)
            return shards
    raise CheckpointError(
        f"{model_dir}: no weight files (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}, "
        "model-*-of-*.safetensors, pytorch_model-*-of-*.bin)"
    )


# ---- reading one file --------------------------------------------------------------------------------------------
def _safe_open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    with _safe_open(path) as f:
        yield f


def _torch_load(path: Path, *, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # corrupt zip, truncated pickle, a pickle that is not plain tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({first})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors, got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor")
    return dict(obj)


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one weight file (safetensors, or a PyTorch file read with ``torch.load(weights_only=True)``),
    on the CPU. Raises CheckpointError naming the file when it is missing, damaged or holds anything but tensors.

    The one reader for small weight files (adapters, prefixes); model folders stream through ``load_weights``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    if _is_safetensors(path):
        with _open_safetensors(path) as f:
            try:
                return {name: f.get_tensor(name) for name in f.keys()}
            except Exception as e:  # a header that promises more bytes than the file has
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return _torch_load(path, mmap=False)


def file_tensor_infos(path: str | Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of one weight file. Reads only headers (a legacy non-zip .bin is loaded whole)."""
    path = Path(path)
    if _is_safetensors(path):
        with _open_safetensors(path) as f:
            out = []
            for name in f.keys():
                s = f.get_slice(name)
                dtype = s.get_dtype()
                out.append(TensorInfo(name, tuple(s.get_shape()), _SAFE_DTYPES.get(dtype, dtype.lower()), path))
            return out
    sd = _torch_load(path, mmap=zipfile.is_zipfile(path))
    return [TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), path) for n, t in sd.items()]


def read_tensor_infos(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every checkpoint tensor's name, shape, dtype and file, without loading tensor data."""
    out: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        for info in file_tensor_infos(path):
            if info.name in out:
                raise CheckpointError(f"{path}: tensor '{info.name}' also appears in {out[info.name].file.name}")
            out[info.name] = info
    return out


def read_tensors(infos: Iterable[TensorInfo]) -> dict[str, torch.Tensor]:
    """The named tensors (from ``read_tensor_infos``), read one by one from their files onto the CPU: a few small
    tensors of a large checkpoint (the ``weight_scale`` rows of a quantized folder)."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info.name)
    for path, names in by_file.items():
        reader = _ShardReader(path)
        try:
            for name in names:
                out[name] = reader.tensor(name).clone()
                reader.done(name, out[name].nbytes)
        finally:
            reader.close()
    return out


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unsupported tensor dtype {name!r}")
    return dtype


class _ShardReader:
    """Tensors, or row ranges of them, from one weight file through a memory map that is dropped and reopened after
    every ``_WINDOW_BYTES`` read: the pages a map has touched count in the RSS until it is closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._safe = _is_safetensors(path)
        self._legacy = not self._safe and not zipfile.is_zipfile(path)
        self._handle: Any = None
        self._sd: dict[str, torch.Tensor] = {}
        self._read = 0
        self._open()
        if self._safe:
            self.names = list(self._handle.keys())
        else:
            self.names = list(self._sd)

    def _open(self) -> None:
        if self._safe:
            self._handle = _safe_open(self.path).__enter__()
        else:  # legacy (pre-1.6, non-zip) files cannot be mapped: read whole, entries freed as they are used
            self._sd = _torch_load(self.path, mmap=not self._legacy)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = None
        self._sd = {}

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self._safe:
            s = self._handle.get_slice(name)
            dtype = s.get_dtype()
            return tuple(s.get_shape()), _torch_dtype(_SAFE_DTYPES.get(dtype, dtype.lower()))
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name) if self._safe else self._sd[name]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e})") from e

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        try:
            return self._handle.get_slice(name)[start:stop] if self._safe else self._sd[name][start:stop]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e})") from e

    def done(self, name: str, nbytes: int, *, last: bool = True) -> None:
        """Account for ``nbytes`` read (hold no reference to them any more); reopen the map when the window is full.
        ``last``: the whole of ``name`` has been read."""
        if self._legacy:
            if last:
                self._sd.pop(name, None)
            return
        self._read += nbytes
        if self._read >= _WINDOW_BYTES:
            self.close()
            self._open()
            self._read = 0


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    reader = _ShardReader(path)
    try:
        for name in reader.names:
            t = reader.tensor(name)
            nbytes = t.nbytes
            yield name, t
            del t
            reader.done(name, nbytes)
    finally:
        reader.close()


def _read_converted(reader: _ShardReader, name: str, device: torch.device, dtype: torch.dtype,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """One tensor (``rows``: only its rows ``start:stop``) converted into ``dtype`` on ``device``; a large one goes in
    row chunks, so the host never holds more than a chunk of its source bytes."""
    shape, src_dtype = reader.shape_dtype(name)
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * src_dtype.itemsize
    if rows is None and (nbytes <= _CHUNK_BYTES or len(shape) == 0 or shape[0] <= 1):
        t = reader.tensor(name)
        out = t.to(device=device, dtype=dtype, copy=True)
        del t
        reader.done(name, nbytes)
        return out
    first, end = rows if rows is not None else (0, shape[0])
    if len(shape) == 0 or not 0 <= first <= end <= shape[0]:
        raise CheckpointError(f"{reader.path}: cannot read rows {first}:{end} of tensor '{name}' {_shape(shape)}")
    out = torch.empty((end - first, *shape[1:]), dtype=dtype, device=device)
    step = max(1, _CHUNK_BYTES // max(nbytes // shape[0], 1))
    for start in range(first, end, step):
        stop = min(start + step, end)
        part = reader.rows(name, start, stop)
        out[start - first : stop - first].copy_(part)
        n = part.nbytes
        del part
        reader.done(name, n, last=stop == end)
    if first == end:
        reader.done(name, 0)
    return out


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(name, tensor, file)`` for every checkpoint tensor, shard by shard, as stored (CPU, file dtype).

    Tensors may be views of the file's memory map; clone one to keep it beyond the loop without pinning the map.
    """
    for path in checkpoint_files(model_dir):
        for name, t in _iter_file(path):
            yield name, t, path


# ---- the model's side ----------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One tensor object of the model, possibly registered under several names (tied weights)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    is_param: bool
    template: torch.Tensor  # the tensor found in the model (usually on meta): shape, dtype, requires_grad
    loaded_from: str | None = None
    value: torch.Tensor | None = None


def _model_slots(model: nn.Module) -> tuple[dict[str, _Slot], list[_Slot]]:
    by_id: dict[int, _Slot] = {}
    by_name: dict[str, _Slot] = {}
    seen_owner: set[tuple[int, str]] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                slot = by_id.get(id(t))
                if slot is None:
                    slot = by_id[id(t)] = _Slot([], [], is_param, t)
                if name not in by_name:
                    slot.names.append(name)
                    by_name[name] = slot
                if (id(mod), attr) not in seen_owner:
                    seen_owner.add((id(mod), attr))
                    slot.owners.append((mod, attr))
    return by_name, list(by_id.values())


def _matches(patterns: Sequence[re.Pattern[str]], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: invalid regex {p!r} ({e})") from e
    return out


def _shape(s: Iterable[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _target_dtype(
    slot: _Slot, name: str, dtype: torch.dtype | None, src: torch.dtype, keep: list[re.Pattern[str]]
) -> torch.dtype:
    if not slot.template.is_floating_point() or _matches(keep, name):
        return slot.template.dtype
    return dtype if dtype is not None else src


def _quantized_owner(slot: _Slot) -> QuantizedLinear | None:
    """The QuantizedLinear whose int8 ``weight`` this slot is, if any."""
    mod, attr = slot.owners[0]
    return mod if isinstance(mod, QuantizedLinear) and attr == "weight" else None


def _quantize_on_load(slot: _Slot, src_float: bool) -> QuantizedLinear | None:
    """The QuantizedLinear to quantize a full-precision checkpoint weight into as it loads, if any."""
    return _quantized_owner(slot) if src_float else None


def _nf4_owner(slot: _Slot) -> NF4Linear | None:
    """The NF4Linear whose placeholder ``weight`` this slot is, if any (quantized by torchao as it loads)."""
    mod, attr = slot.owners[0]
    return mod if isinstance(mod, NF4Linear) and attr == "weight" else None


def _check_tensor(slot: _Slot, ckpt_name: str, shape: tuple[int, ...], src_float: bool, file: Path) -> None:
    expected = tuple(slot.template.shape)
    qlinear = _quantized_owner(slot)
    if qlinear is not None and src_float:  # a full-precision weight, quantized as it loads
        expected = (qlinear.out_features, qlinear.in_features)
    if shape != expected:
        hint = ""
        if qlinear is not None:
            hint = (
                f" (INT{qlinear.bits}: an int8 weight of shape {_shape(tuple(slot.template.shape))}; does config.json's"
                " quantization_bit match the weights?)"
            )
        raise CheckpointError(
            f"{file}: tensor '{ckpt_name}' has shape {_shape(shape)}, the model expects {_shape(expected)}"
            + (f" for '{slot.names[0]}'" if slot.names[0] != ckpt_name else "")
            + hint
        )
    if qlinear is not None and not src_float and slot.template.dtype != torch.int8:
        raise CheckpointError(f"{file}: tensor '{ckpt_name}' must be int8 (a quantized weight)")
    if slot.template.is_floating_point() and not src_float:
        raise CheckpointError(
            f"{file}: tensor '{ckpt_name}' is not floating point but the model's '{slot.names[0]}' is "
            "(a quantized checkpoint whose config.json lacks quantization_bit: 4 or 8?)"
        )


def _unexpected_error(items: list[tuple[str, Path]], model_names: Iterable[str]) -> CheckpointError:
    names = list(model_names)
    lines = []
    for name, file in items[:10]:
        close = difflib.get_close_matches(name, names, n=1)
        lines.append(f"  '{name}' in {file}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    more = f"\n  ... and {len(items) - 10} more" if len(items) > 10 else ""
    return CheckpointError(
        f"{len(items)} checkpoint tensor(s) not in the model:\n" + "\n".join(lines) + more + "\n(is this checkpoint "
        "for another model generation, or does it need ignore=/aliases=?)"
    )


def _prescan(
    files: list[Path],
    by_name: dict[str, _Slot],
    ignore: list[re.Pattern[str]],
    aliases: Mapping[str, str],
) -> set[str] | None:
    """Check names and shapes from headers before any data is read. Returns the model names the checkpoint covers
    (None when a legacy file could not be scanned cheaply)."""
    unexpected: list[tuple[str, Path]] = []
    covered: set[str] = set()
    seen: dict[str, Path] = {}
    complete = True
    for path in files:
        if not _is_safetensors(path) and not zipfile.is_zipfile(path):
            complete = False  # legacy .bin: checked while loading
            continue
        for info in file_tensor_infos(path):
            if info.name in seen:
                raise CheckpointError(f"{path}: tensor '{info.name}' also appears in {seen[info.name]}")
            seen[info.name] = path
            if _matches(ignore, info.name):
                continue
            model_name = aliases.get(info.name, info.name)
            slot = by_name.get(model_name)
            if slot is None:
                unexpected.append((info.name, path))
                continue
            src_float = info.dtype.startswith(("float", "bfloat"))
            _check_tensor(slot, info.name, info.shape, src_float, path)
            covered.add(model_name)
            if _quantize_on_load(slot, src_float) is not None:
                covered.add(model_name + "_scale")  # made from the weight as it loads
    if unexpected:
        raise _unexpected_error(unexpected, by_name)
    return covered if complete else None


def _missing_error(
    missing: list[str], model_dir: Path, files: list[Path], weight_map: dict[str, Path] | None
) -> CheckpointError:
    lines = []
    for name in missing[:20]:
        where = weight_map.get(name) if weight_map else None
        lines.append(f"  '{name}'" + (f" (the index places it in {where.name}, which lacks it)" if where else ""))
    more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
    return CheckpointError(
        f"{model_dir}: {len(missing)} model tensor(s) missing from the checkpoint "
        f"(read {', '.join(f.name for f in files)}):\n" + "\n".join(lines) + more
    )


def _install(slot: _Slot, value: torch.Tensor) -> None:
    if slot.is_param:
        value = nn.Parameter(value, requires_grad=slot.template.requires_grad and value.is_floating_point())
    for mod, attr in slot.owners:
        (mod._parameters if slot.is_param else mod._buffers)[attr] = value
    slot.value = value


def _put(slot: _Slot, ckpt_name: str, value: torch.Tensor, report: LoadReport, path: Path) -> None:
    if slot.loaded_from is None:
        _install(slot, value)
        slot.loaded_from = ckpt_name
        report.loaded.append(slot.names[0])
        report.num_bytes += value.nbytes
        return
    # A second checkpoint tensor for a tensor the model shares between names (v1: lm_head / word_embeddings).
    report.tied.append(ckpt_name)
    assert slot.value is not None
    if torch.equal(slot.value, value):
        return
    winner = ckpt_name if ckpt_name == slot.names[0] else slot.loaded_from
    log.warning(
        "%s: tensors '%s' and '%s' share '%s' in the model but differ in the checkpoint; using '%s'",
        path, slot.loaded_from, ckpt_name, slot.names[0], winner,
    )  # fmt: skip
    if winner == ckpt_name:
        with torch.no_grad():
            slot.value.copy_(value)
        slot.loaded_from = ckpt_name


def load_weights(
    model: nn.Module,
    model_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    optional: Sequence[str] = (),
    ignore: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    keep_dtype: Sequence[str] = (),
    shards: LocalShards | None = None,
) -> LoadReport:
    """Stream a model folder's weights into ``model`` (built on device "meta"), shard by shard.

    dtype: floating tensors are converted to it (None: keep the checkpoint's dtype); non-floating tensors keep the
        model's dtype, and so do names matched by a ``keep_dtype`` regex (e.g. an fp32 ``inv_freq``).
    optional: regexes (searched in the model name) of tensors the checkpoint may lack; those left on meta are listed
        in ``LoadReport.missing_optional`` (one name per shared tensor) for the caller to initialise.
    ignore: regexes of checkpoint names to skip.
    aliases: checkpoint name -> model name, for tensors the model keeps under another name.
    shards: for a model whose parameters are sharded over processes (still on meta): each tensor ``shards.rows``
        names is read only in those rows (straight into ``device``) and put in as ``shards.wrap`` makes it.

    Parameters become ``nn.Parameter`` with the meta parameter's ``requires_grad``; tensors shared by several names
    stay shared. A checkpoint tensor that lands on an already loaded shared tensor is checked for equality; on a
    difference the one stored under the model's first name wins (with a warning). Raises ``CheckpointError`` on an
    unexpected or mis-shaped tensor, a missing required tensor, or an unreadable file.
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    device = torch.device(device)
    aliases = dict(aliases or {})
    optional_re, ignore_re, keep_re = (
        _compile(optional, "optional"), _compile(ignore, "ignore"), _compile(keep_dtype, "keep_dtype")
    )  # fmt: skip
    by_name, slots = _model_slots(model)
    for src, dst in aliases.items():
        if dst not in by_name:
            raise ValueError(f"aliases: '{src}' maps to '{dst}', which is not a tensor of the model")
    files = checkpoint_files(model_dir)
    weight_map = read_weight_map(model_dir)

    def required_missing(covered: Iterable[str]) -> list[str]:
        got = set(covered)
        return [
            s.names[0]
            for s in slots
            if s.template.is_meta
            and not any(n in got for n in s.names)
            and not any(_matches(optional_re, n) for n in s.names)
        ]

    covered = _prescan(files, by_name, ignore_re, aliases)
    if covered is not None and (missing := required_missing(covered)):
        raise _missing_error(missing, model_dir, files, weight_map)

    report = LoadReport(files=files)
    for path in files:
        log.debug("reading %s", path)
        reader = _ShardReader(path)
        try:
            for ckpt_name in reader.names:
                if _matches(ignore_re, ckpt_name):
                    report.skipped.append(ckpt_name)
                    reader.done(ckpt_name, 0)
                    continue
                model_name = aliases.get(ckpt_name, ckpt_name)
                slot = by_name.get(model_name)
                if slot is None:
                    raise _unexpected_error([(ckpt_name, path)], by_name)
                shape, src_dtype = reader.shape_dtype(ckpt_name)
                _check_tensor(slot, ckpt_name, shape, src_dtype.is_floating_point, path)
                qlinear = _quantize_on_load(slot, src_dtype.is_floating_point)
                if qlinear is not None:  # one full-precision weight at a time becomes int8 + scale
                    full = _read_converted(reader, ckpt_name, device, torch.float32)
                    q, scale = quantize_weight(full, qlinear.bits)
                    del full
                    scale_slot = by_name[model_name + "_scale"]
                    _put(slot, ckpt_name, q, report, path)
                    _put(scale_slot, ckpt_name + "_scale", scale.to(scale_slot.template.dtype), report, path)
                    continue
                target = _target_dtype(slot, model_name, dtype, src_dtype, keep_re)
                rows = shards.rows(slot.template) if shards is not None else None
                if rows is not None:  # this process's piece only
                    local = _read_converted(reader, ckpt_name, device, target, rows=rows)
                    _put(slot, ckpt_name, shards.wrap(slot.template, local), report, path)
                    continue
                nf4 = _nf4_owner(slot)
                if nf4 is not None:  # one weight at a time, in the load dtype on the device, becomes NF4
                    nf4.load_float_weight_(_read_converted(reader, ckpt_name, device, target))
                    slot.loaded_from = ckpt_name
                    report.loaded.append(slot.names[0])
                    report.num_bytes += sum(b.nbytes for b in nf4.buffers())
                    continue
                _put(slot, ckpt_name, _read_converted(reader, ckpt_name, device, target), report, path)
        finally:
            reader.close()
    loaded = {s.names[0] for s in slots if s.loaded_from is not None}
    if missing := required_missing(loaded):
        raise _missing_error(missing, model_dir, files, weight_map)
    report.missing_optional = [s.names[0] for s in slots if s.template.is_meta and s.loaded_from is None]
    report.seconds = time.perf_counter() - start
    log.info(
        "loaded %d tensors (%.2f GB) from %d file(s) in %s in %.1fs",
        len(report.loaded), report.num_bytes / 1e9, len(files), model_dir, report.seconds,
    )  # fmt: skip
    return report


# ---- saving --------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _unique_tensors(
    weights: nn.Module | Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    out: dict[str, torch.Tensor] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save '{name}': a {type(t).__name__}, not a tensor")
        if t.is_meta:
            raise CheckpointError(f"cannot save '{name}': it is still on the meta device (never loaded or initialised)")
        key = _storage_key(t)
        if key in first_name:
            log.debug("'%s' shares its tensor with '%s'; saved once", name, first_name[key])
            continue
        first_name[key] = name
        out_name = aliases.get(name, name)
        if out_name in out:
            raise CheckpointError(f"cannot save: two tensors would be stored as '{out_name}'")
        out[out_name] = t.detach()
    return out


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


class ShardWriter:
    """Write tensors, as they come, into safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own) in ``out_dir``; ``finish`` names them in the original layout: ``model.safetensors`` when one
    shard was written, else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.

    The one shard writer (``save_weights``, the LoRA merge): the host holds one shard at a time. Shards are written as
    hidden part files and renamed into place by ``finish``; used as a context manager, an error removes them."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.total_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._chunk: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()
        self._size = 0
        self._names: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (moved to the CPU as it is); the current shard is written first when this one would overflow
        it."""
        if name in self._names:
            raise CheckpointError(f"cannot save: two tensors would be stored as '{name}'")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._chunk and self._size + nbytes > self.max_shard_bytes:
            self._flush()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in self._storages or nbytes != storage[1]:
            t = t.clone()  # safetensors refuses tensors that share or partly cover a storage
        self._storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        self._chunk[name] = t
        self._size += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._chunk:
            return
        part = self.out_dir / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._chunk, str(part), metadata={"format": "pt"})
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        self._parts.append((part, list(self._chunk)))
        self._chunk, self._storages, self._size = {}, set(), 0

    def finish(self) -> list[Path]:
        """Write the last shard, rename the shards to their final names, write the index; returns the files."""
        self._flush()
        n = len(self._parts)
        if n == 0:
            raise CheckpointError("nothing to save: no tensors")
        names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        written: list[Path] = []
        weight_map: dict[str, str] = {}
        for (part, tensor_names), final in zip(self._parts, names, strict=True):
            os.replace(part, self.out_dir / final)
            written.append(self.out_dir / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
        self._parts = []
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(self.out_dir / SAFE_INDEX, json.dumps(index, indent=2) + "\n")
            written.append(self.out_dir / SAFE_INDEX)
        return written

    def abort(self) -> None:
        """Remove the part files written so far."""
        for part, _ in self._parts:
            part.unlink(missing_ok=True)
        self._parts, self._chunk = [], {}


def save_weights(
    weights: nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    aliases: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write safetensors shards in the original layout (``ShardWriter``): ``model.safetensors`` when everything fits
    one shard, else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``. Returns the files written.

    Tensors shared by several names (tied weights) are written once, under the first name in state_dict order;
    ``aliases`` (model name -> checkpoint name) renames on the way out. ``dtype`` converts floating tensors. One shard
    at a time is gathered on the host. Weight files of an earlier save in ``out_dir`` that this save does not
    rewrite (other shard counts, .bin files, indexes) are removed afterwards, so the folder holds one set of weights.
    """
    out_dir = Path(out_dir)
    tensors = _unique_tensors(weights, aliases or {})
    if not tensors:
        raise CheckpointError("nothing to save: no tensors")
    with ShardWriter(out_dir, max_shard_bytes) as writer:
        for name, t in tensors.items():
            writer.add(name, t.to(device="cpu", dtype=_out_dtype(t, dtype)))
        written = writer.finish()
    keep = {p.name for p in written}
    for p in out_dir.iterdir():
        if p.is_file() and WEIGHT_FILE.fullmatch(p.name) and p.name not in keep:
            log.info("removing %s from an earlier save", p)
            p.unlink()
    n = len(written) - (len(written) > 1)
    log.info("saved %d tensors (%.2f GB) in %d file(s) to %s", len(tensors), writer.total_bytes / 1e9, n, out_dir)
    return written


def save_pretrained(
    model: nn.Module | Mapping[str, torch.Tensor],
    config: GLMConfig,
    out_dir: str | Path,
    tokenizer_files: Sequence[str | Path] = (),
    *,
    source_dir: str | Path | None = None,
    extra_files: Sequence[str | Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Write a complete model folder atomically: weights (``save_weights``), config.json, tokenizer files.

    ``config`` is a GLMConfig; its ``torch_dtype`` is set to the saved dtype when all floating tensors share one.
    ``tokenizer_config.json`` is copied from ``source_dir`` (default: the first tokenizer file's folder) when present;
    ``extra_files`` are copied as they are. The folder is built aside and swapped in, so an existing ``out_dir`` is
    only replaced once the new one is complete.
    """
    out_dir = Path(out_dir)
    copies = [Path(p) for p in (*tokenizer_files, *extra_files)]
    src = Path(source_dir) if source_dir is not None else (copies[0].parent if tokenizer_files else None)
    if src is not None and (src / "tokenizer_config.json").is_file():
        if all(p.name != "tokenizer_config.json" for p in copies):
            copies.append(src / "tokenizer_config.json")

    def fill(tmp: Path) -> None:
        written = save_weights(model, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype, aliases=aliases)
        reserved = {p.name for p in written} | {"config.json"}
        cfg = config
        saved = {
            str(_out_dtype(t, dtype)).removeprefix("torch.")
            for t in _unique_tensors(model, {}).values()
            if t.is_floating_point()
        }
        if len(saved) == 1:
            cfg = dataclasses.replace(cfg, torch_dtype=saved.pop())
        cfg.to_json(tmp / "config.json")
        for p in copies:
            if not p.is_file():
                raise CheckpointError(f"{p}: no such file to copy into {out_dir}")
            if p.name in reserved:
                raise CheckpointError(f"{p}: would overwrite '{p.name}' written by save_pretrained")
            reserved.add(p.name)
            shutil.copy2(p, tmp / p.name)

    atomic_write_dir(out_dir, fill)
    log.info("saved model folder %s", out_dir)
    return out_dir
