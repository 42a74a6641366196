"""``train.compile``: each transformer block compiled in place with ``torch.compile`` (``dynamic=False``).

Compiling a block fuses its elementwise work (norms, rotary, the SwiGLU/GeLU, the LoRA path, the dtype casts)
into a few kernels. ``nn.Module.compile`` compiles in place, so parameter and state-dict names stay the original
ones and checkpoints are the same files. Every block shares one compiled graph per input shape; the trainer keeps
the shapes few (packed rows padded to ``pack_length``, padded batches rounded up to ``train.data.bucket_width``).
Evaluation and generation run the blocks eagerly (:func:`eager`): their shapes change at every call.

On CUDA, compiling also switches ChatGLM2/3 and GLM-4's MLPs to glmtune's fused SwiGLU ops (``models/swiglu.py``:
their backward 1.5x Inductor's, 2.8 ms less a packed 4 x 1024 LoRA step on ChatGLM3-6B, bench/RESULTS.md), and, with
Triton, the K/V heads repeated for flash varlen (torch < 2.13) to glmtune's fused repeat ops (``models/repeat_kv.py``,
``attention.KVRepeat(fused=True)``: a packed 4 x 1024 LoRA step 1.6 % faster); ``options`` are Inductor's
(``torch.compile(options=...)``), per compiled block, never set globally.

``auto`` compiles on CUDA, not on the CPU (where compiling costs more than it saves on small runs).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from glmtune.models.attention import KVRepeat, repeats_kv_for_flash, varlen_supported

log = logging.getLogger(__name__)

BACKEND: str | Callable[..., Any] = "inductor"  # the tests use "aot_eager" (same graphs, no code generation)
INDUCTOR_OPTIONS: Mapping[str, Any] = MappingProxyType({})  # torch.compile(options=...) of every block (none)
RECOMPILE_LIMIT = 32  # compiled variants of the block's code kept (shapes x mask kinds); dynamo's default is 8


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """``train.compile`` (auto, true, false) on ``device``."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"train.compile must be auto, true or false, got {setting!r}")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    blocks = getattr(model, "_blocks", None)
    if callable(blocks):
        return blocks()
    tr = model.transformer
    return tr.encoder.layers if hasattr(tr, "encoder") else tr.layers


def fuses_kv_repeat(device: torch.device) -> bool:
    """:func:`compile_blocks`' default K/V repeat on ``device``: glmtune's fused ops on CUDA with Triton (one A/B: a
    packed 4x1024 LoRA step 1.6 % faster than expand + reshape); elsewhere the model's setting stays."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_blocks(
    model: nn.Module,
    *,
    backend: str | Callable[..., Any] | None = None,
    options: Mapping[str, Any] | None = None,
    fused_swiglu: bool | None = None,
    kv_repeat: KVRepeat | None = None,
    recompute_kv: bool = False,
) -> int:
    """Compile every transformer block in place (names unchanged); returns how many. ``options``: Inductor's
    (default :data:`INDUCTOR_OPTIONS`); ``fused_swiglu``: the MLPs' SwiGLU as glmtune's fused ops (default: on
    CUDA; False switches them back to PyTorch's); ``kv_repeat``: how the attentions repeat K/V heads for flash
    varlen (``chatglm.set_kv_repeat``; default: on CUDA with Triton each attention's repeat switched to the fused
    ops, its ``recompute`` kept; elsewhere the model's setting unchanged); ``recompute_kv`` (``train.recompute_kv``):
    the default repeat with the copies recomputed in the backward (logged where there is nothing to recompute)."""
    if kv_repeat is not None and recompute_kv:
        raise ValueError("compile_blocks takes kv_repeat or recompute_kv, not both")
    blocks = transformer_blocks(model)
    device = next(model.parameters()).device
    from glmtune.models.chatglm import set_kv_repeat, use_fused_swiglu

    # (before compiling: compiled code keeps the path it traced; v1 models have no such MLPs or attentions: 0)
    fused = use_fused_swiglu(model, on=device.type == "cuda" if fused_swiglu is None else fused_swiglu)
    grouped = set_kv_repeat(model, KVRepeat(recompute=True)) if recompute_kv else 0
    if kv_repeat is not None:
        grouped = set_kv_repeat(model, kv_repeat)
    elif fuses_kv_repeat(device):  # the default switches only the repeat to the fused ops: a recompute set stays
        grouped = set_kv_repeat(model, fused=True)
    if recompute_kv and not (grouped and repeats_kv_for_flash(device)):
        log.info("train.recompute_kv: nothing to recompute here (it needs CUDA (sm80+), a model with grouped K/V heads "
                 "(ChatGLM2/3, GLM-4) and torch < 2.13, whose flash varlen takes no grouped heads)")  # fmt: skip
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    options = INDUCTOR_OPTIONS if options is None else options
    backend = backend or BACKEND
    kw = {"options": dict(options)} if options and backend == "inductor" else {}
    for block in blocks:
        block.compile(backend=backend, dynamic=False, **kw)
    # Masked attention on CUDA: packed causal rows as flash attention over variable-length runs where torch has it,
    # the rest (P-Tuning prefixes, v1 prompts) as FlexAttention, compiled inside the blocks, its kernels skipping the
    # blocks the mask hides. Unpadded causal batches keep SDPA's flash path either way.
    if device.type == "cuda" and hasattr(model, "set_attention_backend"):
        model.set_attention_backend("varlen" if varlen_supported(device) else "flex")
    fused_note = f"; {fused} MLPs with the fused SwiGLU ops" if fused else ""
    if grouped and repeats_kv_for_flash(device):
        repeats = {a.kv_repeat for a in model.modules() if isinstance(getattr(a, "kv_repeat", None), KVRepeat)}
        fused_note += f"; {grouped} attentions repeating K/V heads for flash as {', '.join(map(str, repeats))}"
    log.info("compiled %d transformer blocks (torch.compile, backend %s%s)", len(blocks), backend, fused_note)
    return len(blocks)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_blocks` compiled ``model``'s blocks (``nn.Module.compile`` keeps the compiled call)."""
    try:
        blocks = transformer_blocks(model)
    except AttributeError:  # not one of the model families (a test's toy)
        return False
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside (evaluation, generation: shapes vary from call to call)."""
    with torch.compiler.set_stance("force_eager"):
        yield
