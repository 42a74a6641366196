"""glmtune's training Triton kernels (``swiglu``, ``repeat_kv``) on either device: compiled on CUDA, and on CPU
tensors the same kernel function in Triton's interpreter (the CPU tests' path), whatever ``TRITON_INTERPRET`` was
when Triton was imported. Imported only where Triton is."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def runnable(kernel, t: torch.Tensor):
    """``kernel`` for ``t``'s device: compiled on CUDA; on the CPU the same function in Triton's interpreter."""
    return kernel if t.is_cuda or isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
