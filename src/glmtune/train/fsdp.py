"""FSDP2 (``torch.distributed.fsdp.fully_shard``): weights, gradients and optimizer state sharded over the processes.

``train.distributed`` picks how several processes train (:func:`choose_mode`): ``ddp`` keeps a whole copy of the
model, its gradients and its optimizer state on every GPU (right for adapters over a base that fits); ``fsdp`` gives
each of N processes 1/N of them and gathers one transformer block's weights at a time for its forward and backward
(full and freeze fine-tuning of models that do not fit one GPU, adapters over a base that does not). ``auto``: fsdp
for ``full``/``freeze``, ddp for adapters.

How the model is sharded (:func:`shard`): every transformer block is its own FSDP unit, then the loss module
(``LMLoss``: the model's embeddings, final norm, output layer, prefix encoder) is the root, so its forward gathers
what lies outside the blocks; the last block keeps its gathered weights from its forward to its backward, which
follows at once (no second all-gather; after a forward without backward, as in evaluation, :func:`reshard_all`
frees them). Parameter names do not change. Loading (:func:`load_shards`): the trainer builds the
model on meta and sets the method up there (its own tensors made on the device: :func:`new_tensors_on`), shards it,
and only then streams the model folder in, each rank reading only its rows of every parameter, so no GPU and no host
ever holds a whole copy of the base. Mixed precision: the sharded (master) parameters stay
as the trainer made them (float32 when trained), the blocks compute in the training precision (bf16) and gradients
are reduced in float32; the optimizer steps on the float32 shards. ``train.gradient_checkpointing`` and
``train.compile`` work per block as without FSDP (the FSDP hooks run outside the compiled code). ``train.fsdp_offload``
keeps the shards and the optimizer state on the CPU (GPU runs only).

Checkpoints (``state/dcp/``, :mod:`torch.distributed.checkpoint`): each rank writes its shard of the trainable
parameters and optimizer state; a resume with another number of processes reshards them. The method's output
(``model/`` and each checkpoint's ``model/``) is written in its usual format: adapters are small and are gathered
whole; full and freeze results are gathered one tensor at a time and streamed into the shard writer on rank 0
(:func:`write_gathered_model`), so no process ever holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from glmtune.adapters.full import WholeWeightsMethod, save_dtype
from glmtune.models.checkpoint import ShardWriter
from glmtune.models.config import GLMConfig
from glmtune.templates import IGNORE_INDEX
from glmtune.train.compile import transformer_blocks
from glmtune.train.config import OptimConfig
from glmtune.train.distributed import DistInfo
from glmtune.train.step import TrainStep

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

Mode = Literal["single", "ddp", "fsdp"]
WHOLE_WEIGHT_METHODS = ("full", "freeze")


def choose_mode(setting: str, method: str, world_size: int) -> Mode:
    """How this run's processes train together: one process alone, DDP or FSDP (see the module docstring)."""
    if setting not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"train.distributed must be auto, ddp or fsdp, got {setting!r}")
    if world_size == 1:
        return "single"
    if setting == "auto":
        return "fsdp" if method in WHOLE_WEIGHT_METHODS else "ddp"
    return setting  # type: ignore[return-value]


def check_supported(*, precision: str, offload: bool, device: torch.device) -> None:
    """Refuse what FSDP runs cannot do, naming the key to change."""
    if precision == "fp16":
        raise ValueError("train.precision fp16 does not go with FSDP (each rank would see the inf/nan of its own "
                         "shard only); use bf16 or fp32, or train.distributed=ddp")  # fmt: skip
    if offload and device.type != "cuda":
        raise ValueError("train.fsdp_offload keeps the shards on the CPU between GPU computations: it needs GPUs "
                         f"(this run is on {device})")  # fmt: skip


# last block units left gathered after the forward (their backward starts right after it): train.fsdp_keep_gathered's
# default, which config.py holds
KEEP_GATHERED = OptimConfig.fsdp_keep_gathered
PREFETCH = 1  # block units whose all-gather is in flight ahead of the one computing (1: FSDP's own prefetching)
BLOCKS_PER_UNIT = 1


def shard(net: nn.Module, model: nn.Module, info: DistInfo, *, compute_dtype: torch.dtype | None,
          offload: bool = False, keep_gathered: int = KEEP_GATHERED, prefetch: int = PREFETCH,
          blocks_per_unit: int = BLOCKS_PER_UNIT, mesh: DeviceMesh | None = None) -> None:  # fmt: skip
    """``fully_shard`` the transformer blocks of ``model`` (``blocks_per_unit`` consecutive blocks gathered
    together), then ``net`` (the module whose forward the step calls, holding ``model``) as the root.
    ``compute_dtype``: the dtype the blocks compute in (None: as the weights are).

    ``keep_gathered``: the last units keep their gathered weights from the forward to their backward (no second
    all-gather, one unit's bf16 weights more memory each; a forward without backward leaves them gathered:
    :func:`reshard_all`). ``prefetch`` > 1: each unit's forward (backward) gathers that many of the next (previous)
    units ahead. ``mesh``: the device mesh (default: every process, the default process group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if blocks_per_unit < 1 or prefetch < 1 or keep_gathered < 0:
        raise ValueError(f"blocks_per_unit and prefetch must be >= 1, keep_gathered >= 0 (got {blocks_per_unit}, "
                         f"{prefetch}, {keep_gathered})")  # fmt: skip
    mesh = mesh if mesh is not None else init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    policy = CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy()
    blocks = list(transformer_blocks(model))
    units = [blocks[i : i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    heads = []  # each unit's first block: the FSDPModule that stands for the unit
    for k, unit in enumerate(units):
        keep = k >= len(units) - keep_gathered
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=mp, offload_policy=policy,
                    reshard_after_forward=not keep)  # fmt: skip
        heads.append(unit[0])
    fully_shard(net, mesh=mesh, mp_policy=mp, offload_policy=policy)
    if prefetch > 1:
        for k, head in enumerate(heads):
            head.set_modules_to_forward_prefetch(heads[k + 1 : k + 1 + prefetch])
            head.set_modules_to_backward_prefetch(heads[max(k - prefetch, 0) : k][::-1])
    log.info("FSDP2: %d blocks in %d units + root sharded over %d processes (compute %s, gradients reduced in float32"
             "; last %d units kept gathered for the backward; prefetch %d%s)", len(blocks), len(units),
             info.world_size, str(compute_dtype or "as stored").removeprefix("torch."), min(keep_gathered, len(units)),
             prefetch, ", CPU offload" if offload else "")  # fmt: skip


def reshard_all(net: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit in ``net`` (a no-op without FSDP). After a forward without
    backward (evaluation), the root and the units kept gathered (``shard``'s ``keep_gathered``) still hold them:
    their registered parameters are then the whole tensors, which a checkpoint's state dict cannot take."""
    from torch.distributed.fsdp import FSDPModule

    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- loading onto the shards -----------------------------------------------------------------------------------
class _NewTensorsOn(TorchFunctionMode):
    """Tensors made for the meta device are made on ``device`` instead (see :func:`new_tensors_on`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Callable, types: Sequence[type], args: Sequence = (),
                           kwargs: dict | None = None) -> object:  # fmt: skip
        kwargs = kwargs or {}
        where = kwargs.get("device")
        if where is not None and torch.device(where).type == "meta":
            kwargs = {**kwargs, "device": self.device}
        return func(*args, **kwargs)


@contextlib.contextmanager
def new_tensors_on(device: torch.device) -> Iterator[None]:
    """Inside, what a method adds to a model still on meta (LoRA's A and B, a prefix encoder) is made on ``device``,
    initialised as it is over a loaded model: the same random numbers from the same seed, so a sharded run starts
    from the adapter values of a one-process run. The base stays on meta."""
    with _NewTensorsOn(device):
        yield


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter and buffer of ``model``, by tensor object (to follow renames: :func:`renamed`)."""
    out: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out.setdefault(id(t), []).append(name)
    return out


def renamed(before: dict[int, list[str]], model: nn.Module) -> dict[str, str]:
    """Old name -> new name of the tensors ``before`` (:func:`tensor_names`) that a method moved (LoRA wraps a linear
    layer: ``x.weight`` becomes ``x.base_layer.weight``), so that the checkpoint's names find them."""
    out: dict[str, str] = {}
    for key, names in tensor_names(model).items():
        old = before.get(key)
        if old is None or old == names:
            continue
        if len(old) != len(names):
            raise RuntimeError(f"the method renamed {old} to {names}: cannot tell which checkpoint tensor is which")
        out.update({o: n for o, n in zip(old, names, strict=True) if o != n})
    return out


class RowShards:
    """:class:`glmtune.models.checkpoint.LocalShards` for FSDP2's parameters: a DTensor sharded on dim 0 over a 1-D
    mesh (``fully_shard``'s layout: ``torch.chunk`` of the rows) is read only in this rank's rows, cast to the
    parameter's dtype (a trained weight of a bf16 load: bf16 values in float32, as a one-process run has them).
    ``device``: where the shards live when not where they are read (``train.fsdp_offload``: the CPU)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def rows(self, template: torch.Tensor) -> tuple[int, int] | None:
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(template, DTensor):
            return None
        mesh, placements = template.device_mesh, template.placements
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(f"cannot load a parameter sharded as {placements} over a {mesh.ndim}-D mesh "
                             "(fully_shard's layout is Shard(0) over one dimension)")  # fmt: skip
        n, world, rank = template.shape[0], mesh.size(), mesh.get_local_rank()
        per = -(-n // world)  # torch.chunk's rows per rank
        start = min(per * rank, n)
        return start, start + template.to_local().shape[0]

    def wrap(self, template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        local = local.to(device=self.device, dtype=template.dtype)
        return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False,
                                  shape=template.shape, stride=template.stride())  # fmt: skip


def load_shards(net: nn.Module, model: nn.Module, model_dir: str | Path, *, dtype: torch.dtype, device: torch.device,
                quantized: bool, renames: dict[str, str], offload: bool = False) -> None:  # fmt: skip
    """Stream the weights of ``model_dir`` into ``model`` (built on meta, its method set up, sharded by :func:`shard`
    with ``net`` as the root): each rank reads only the rows of its shards, one tensor at a time, straight onto
    ``device`` (``offload``: the shards then go to the CPU, where FSDP keeps them); buffers (rotary tables, the
    int8/int4 weights of a quantized base) are loaded whole on every rank. No rank ever holds a whole copy of the
    model's parameters."""
    from torch.distributed.fsdp import FSDPModule

    from glmtune.pretrained import fill_model

    fill_model(model, model_dir, dtype=dtype, device=device, quantized=quantized, renamed=renames,
               shards=RowShards(torch.device("cpu") if offload else None))  # fmt: skip
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise RuntimeError(f"{model_dir}: left on the meta device after loading under FSDP: {still[:5]}")
    with torch.no_grad():  # FSDP takes the new sharded parameters (as after ``model.to_empty``)
        for module in net.modules():
            if isinstance(module, FSDPModule):
                state = module._get_fsdp_state()
                groups = getattr(state, "_fsdp_param_groups", None)  # (torch < 2.9: one group per module)
                if groups is None:
                    groups = [g] if (g := getattr(state, "_fsdp_param_group", None)) is not None else []
                for group in groups:
                    for fsdp_param in group.fsdp_params:
                        fsdp_param.reset_sharded_param()


def sharded_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters called ``names`` after sharding (``fully_shard`` replaced them by DTensor parameters)."""
    now = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in now]
    if missing:
        raise RuntimeError(f"FSDP renamed or dropped trainable parameters: {missing[:5]}")
    return {n: now[n] for n in names}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class ShardedTrainStep(TrainStep):
    """The step under FSDP: the gradient norm of sharded gradients is a replicated DTensor; the step's bookkeeping
    takes it as a plain tensor on the device (the same value on every rank)."""

    def _grad_norm(self) -> torch.Tensor:
        return full_tensor(super()._grad_norm()).to(self.info.device)


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def checkpoint_state(model: nn.Module, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """What ``state/dcp/`` holds: the trainable parameters by name and the optimizer state keyed by parameter
    name (so that sharded and whole runs read each other's checkpoints)."""
    return {"trainable": dict(named), "optimizer": _optimizer_state(model, optimizer)}


def load_checkpoint_state(path: Path, model: nn.Module, named: dict[str, nn.Parameter],
                          optimizer: torch.optim.Optimizer | None = None) -> None:  # fmt: skip
    """Read ``state/dcp/`` of checkpoint ``path`` into the trainable parameters (and ``optimizer``), resharded for
    this run's processes (sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from glmtune.train.state import sharded_dir

    state: dict = {"trainable": dict(named)}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(sharded_dir(path)))
    except Exception as e:  # DCP's CheckpointException lists every rank's error
        raise ValueError(f"{path}: cannot read the sharded state (was the method or its options changed?): "
                         f"{str(e).splitlines()[0][:500]}") from e  # fmt: skip
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_whole_state(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    saved_optimizer: dict | None = None,
) -> None:
    """A checkpoint written without FSDP (whole tensors; the optimizer's state keyed by position) into this sharded
    run: each rank keeps its shards of them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, {n: trainable[n] for n in named}, options=whole)
    if optimizer is None or saved_optimizer is None:
        return
    name_of = {id(p): n for n, p in named.items()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[i]: v for i, v in saved_optimizer["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved_optimizer["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


# ---- the method's output --------------------------------------------------------------------------------------
@contextlib.contextmanager
def whole_parameters(model: nn.Module, named: dict[str, nn.Parameter]) -> Iterator[None]:
    """Inside, the (small) trainable parameters of ``model`` are whole tensors on every rank (gathered), so that a
    method's own save function reads them as without FSDP; the sharded ones are put back after."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, p in named.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            whole = full_tensor(p.detach())
            owner._parameters[attr] = nn.Parameter(whole, requires_grad=p.requires_grad)
            swapped.append((owner, attr, p))
        yield
    finally:
        for owner, attr, p in swapped:
            owner._parameters[attr] = p


def write_gathered_model(model: nn.Module, out_dir: Path, *, config: GLMConfig, tokenizer_files: Sequence[Path],
                         write: bool) -> None:  # fmt: skip
    """A sharded model as a complete folder in the original layout (as ``save_full_model`` writes it): every
    rank gathers one tensor at a time; rank 0 (``write``) converts it to the save dtype, on the host, and hands it
    to the shard writer, which keeps at most one shard in memory. Every rank must call this (collectives)."""
    dtype = save_dtype(model, config)
    writer = ShardWriter(out_dir) if write else None
    seen: set[int] = set()
    saved_dtypes: set[torch.dtype] = set()
    with writer if writer is not None else contextlib.nullcontext():
        for name, t in model.state_dict().items():
            if id(t) in seen:  # tied weights (v1's lm_head): saved once, under the first name
                continue
            seen.add(id(t))
            whole = full_tensor(t.detach())
            if writer is not None:
                out = whole.to(device="cpu", dtype=dtype if (dtype is not None and whole.is_floating_point())
                               else whole.dtype)  # fmt: skip
                if out.is_floating_point():
                    saved_dtypes.add(out.dtype)
                writer.add(name, out)
            del whole
        if writer is None:
            return
        writer.finish()
    cfg = config
    if len(saved_dtypes) == 1:
        cfg = dataclasses.replace(config, torch_dtype=str(saved_dtypes.pop()).removeprefix("torch."))
    cfg.to_json(out_dir / "config.json")
    copies = [Path(f) for f in tokenizer_files]
    if copies and (copies[0].parent / "tokenizer_config.json").is_file():
        copies.append(copies[0].parent / "tokenizer_config.json")
    for f in copies:
        if f.is_file() and not (out_dir / f.name).exists():
            shutil.copy2(f, out_dir / f.name)
    log.info("saved the gathered model (%.2f GB) to %s", writer.total_bytes / 1e9, out_dir)


def save_method_output(method, model: nn.Module, named: dict[str, nn.Parameter], out_dir: Path, *,
                       config: GLMConfig, tokenizer_files: Sequence[Path], write: bool) -> None:  # fmt: skip
    """What ``method.save`` writes, from a sharded model: every rank calls it, rank 0 (``write``) writes."""
    if isinstance(method, WholeWeightsMethod):
        write_gathered_model(model, out_dir, config=config, tokenizer_files=tokenizer_files, write=write)
        return
    with whole_parameters(model, named):
        if write:
            method.save(model, out_dir, config=config, tokenizer_files=tokenizer_files)


# ---- evaluation -----------------------------------------------------------------------------------------------
def even_batches(batches: list[dict[str, torch.Tensor]], per_rank: int,
                 spare: dict[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """This rank's dev batches made ``per_rank`` long: under FSDP every rank must run as many forward passes (each
    gathers weights with the others). The added batches take no loss (every label ignored)."""
    out = list(batches)
    template = out[0] if out else spare
    while len(out) < per_rank:
        if template is None:
            raise ValueError("no dev batch to pad this rank's evaluation with")
        out.append({**template, "labels": torch.full_like(template["labels"], IGNORE_INDEX)})
    return out
