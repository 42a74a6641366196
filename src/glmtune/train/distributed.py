"""Several processes under torchrun (on one machine or several): NCCL on GPUs or gloo on the CPU; one process
otherwise. How they share the model (DDP or FSDP2) is ``train/fsdp.py``'s ``choose_mode``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1``
the process group is started here, with a timeout on every collective (``GLMTUNE_DIST_TIMEOUT`` seconds, default
600) so that ranks whose peer died stop with an error instead of waiting for NCCL's 30 minutes (torchrun, seeing a
worker exit, stops the others on its machine and names the rank that failed). The ranks then check that they run
the same config (:func:`check_same_config`). Rank 0 alone logs, shows progress and writes files; every decision
that changes the course of the run (skip a step, stop early) is taken from values all ranks share (all-reduced),
so the ranks never disagree.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

TIMEOUT_ENV = "GLMTUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # a checkpoint of a large model is written within it; a dead peer is noticed after it


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc-per-node)
    started_group: bool = False  # this code started the process group (and so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup(device: str = "auto", *, cpu_collectives: bool = False) -> DistInfo:
    """Read the torchrun environment, pick this process's device and start the process group when needed.
    ``cpu_collectives``: on GPUs, gloo beside NCCL for tensors kept on the CPU (FSDP's CPU offload)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device in ("auto", None):
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda" and cpu_collectives:
            backend = "cuda:nccl,cpu:gloo"
        timeout = timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None, timeout=timeout)
        started = True
        log.info("process group started: rank %d of %d, backend %s, device %s", rank, world, backend, dev)
    elif dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=dev,
        started_group=started,
        local_world_size=local_world,
    )


def teardown(info: DistInfo, *, together: bool = False) -> None:
    """End the process group we started. ``together``: every rank is known to get here (a finished or a Ctrl-C'd
    run, where the ranks agreed on the step), so wait for all of them first: a rank tearing down gloo while
    another still talks to it can abort. Drop the model (and anything else holding the group) before calling."""
    if info.started_group and dist.is_initialized():
        # Objects still holding the group (a DDP/FSDP model, its DTensors' device mesh) must be gone before it ends:
        # freed only at interpreter exit, a gloo group's threads abort the process ("terminate called without an
        # active exception", 4 of 25 two-rank FSDP runs; 0 of 25 with this collection). The caller drops its
        # references first.
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, on the process group's device)."""
    if not info.enabled:
        return list(values)
    dev = info.device if "nccl" in dist.get_backend() else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place, without reading it back (no host synchronisation on NCCL)."""
    if not info.enabled:
        return t
    if "nccl" in dist.get_backend() or t.device.type == "cpu":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    else:  # gloo with a GPU tensor: through the host
        host = t.cpu()
        dist.all_reduce(host, op=dist.ReduceOp.SUM)
        t.copy_(host)
    return t


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# What gloo and NCCL say when the process at the other end of a collective is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker", "remote process exited",
              "Broken pipe", "Timed out waiting", "Watchdog caught collective")  # fmt: skip


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process stopped (or stopped answering)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(text in str(e) for text in _PEER_GONE)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_same_config(info: DistInfo, text: str) -> None:
    """Every rank must train with the same config (``text``: the resolved config); a rank started with other
    arguments is an error on every rank, naming the ranks that differ from rank 0."""
    if not info.enabled:
        return
    hashes = gather_objects(info, config_hash(text))
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise ValueError(
            f"the processes were started with different configs: rank(s) {differ} differ from rank 0 (config hashes "
            f"{hashes}); start every process with the same config file and key=value overrides"
        )


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around ``module`` when several processes run (gradients of its trainable parameters averaged)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)


@contextmanager
def no_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for micro-batches that are not the last of an accumulation."""
    ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else nullcontext()
    with ctx:
        yield
