"""Helpers for the tests of Triton kernels. Importing a kernel module: compiled where CUDA is; on a CPU-only machine
imported with Triton's interpreter switched on (``TRITON_INTERPRET=1`` while the module is imported: the modules build
their kernels for the interpreter at import). A copy imported earlier without it (by another test) cannot run on the
CPU: the test is skipped then. ``assert_rounded``: a kernel's output against float64, within its dtype's rounding."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest
import torch

CUDA = torch.cuda.is_available()


def import_kernels(name: str) -> ModuleType:
    """The kernel module ``name`` (it defines ``INTERPRETED``), ready to run on this machine's tensors."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        if not (CUDA or loaded.INTERPRETED):
            pytest.skip(f"{name} was imported without TRITON_INTERPRET and there is no GPU")
        return loaded
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        return importlib.import_module(name)


# an output's rounding, relative; Triton's interpreter truncates to bfloat16 (the GPU rounds to nearest)
ROUNDING = {torch.float32: 1e-6, torch.bfloat16: 2**-8 if CUDA else 2**-7, torch.float16: 2**-10}


def assert_rounded(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, spread: float) -> None:
    """Every element of ``out`` within its ``dtype``'s rounding of the float64 ``ref``, plus ``spread`` x the largest
    |ref| (float32 arithmetic on the largest values)."""
    out = out.detach().cpu().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    tol = ROUNDING[dtype] * ref.abs() + spread * ref.abs().max()
    bad = (out - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {(out - ref).abs().max().item():.3g}"
