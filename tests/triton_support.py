"""Importing a Triton kernel module for the tests: compiled where CUDA is; on a CPU-only machine imported with
Triton's interpreter switched on (``TRITON_INTERPRET=1`` while the module is imported: the modules build their
kernels for the interpreter at import). A copy imported earlier without it (by another test) cannot run on the CPU:
the test is skipped then."""

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
