"""Several LoRA adapters of one base served together in one batch: each row of a forward picks its adapter.

At serve time every linear layer that some adapter targets is wrapped in a :class:`MultiLoraLinear` holding the
adapters' A and B matrices side by side (float32, as ``adapters.lora.LoraLinear`` keeps them):
``A_all`` (n * r, in) and ``B_all`` (out, n * r), r = the largest rank (smaller ranks and adapters without the layer
are zero-padded, which adds exact zeros). A row using adapter k keeps only its own r columns, scaled by that
adapter's ``alpha / r``::

    y = base(x) + ((x @ A_all.T) * gate[row]) @ B_all.T        gate[row] = scale_k on adapter k's columns, else 0

which is ``base(x) + scale_k * B_k(A_k(x))``, LoRA's forward, for every row at once in two matrix products. Adapter 0
is the base itself (an all-zero gate). The row's adapter index is a device tensor (the decode state's
``adapter``), so one captured decode step serves every mix of adapters.

Adapters are read with ``adapters.peft_format.read_lora_adapter`` (PEFT's format, ranks/alphas/rsLoRA resolved).
P-Tuning prefixes cannot mix in one batch (they occupy the KV cache of every row): one per server, as its model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.adapters.peft_format import AdapterError, LoraAdapter, read_lora_adapter

log = logging.getLogger(__name__)


class _Selection:
    """The adapter index of each row of the forward about to run, (b,) long on the model's device."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the LoRA updates of several adapters, picked per row (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, a_all: torch.Tensor, b_all: torch.Tensor, gates: torch.Tensor,
                 selection: _Selection) -> None:  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("a_all", a_all, persistent=False)  # (n * r, in) float32
        self.register_buffer("b_all", b_all, persistent=False)  # (out, n * r) float32
        self.register_buffer("gates", gates, persistent=False)  # (n + 1, n * r): row 0 the base (zeros)
        self._selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, s, in)
        result = self.base_layer(x)
        index = self._selection.index
        if index is None:
            return result
        gate = self.gates[index]  # (b, n * r)
        a = (x.to(self.a_all.dtype) @ self.a_all.T) * gate[:, None, :]  # (b, s, n * r)
        return result + (a @ self.b_all.T).to(result.dtype)


class MultiLora:
    """The adapters put on a model (``load``) and the per-row selection their layers read."""

    def __init__(self, model: nn.Module, names: list[str], layers: dict[str, MultiLoraLinear],
                 selection: _Selection) -> None:  # fmt: skip
        self.model, self.names, self.layers, self._selection = model, names, layers, selection

    @classmethod
    def load(cls, model: nn.Module, adapters: Mapping[str, str | Path | LoraAdapter]) -> MultiLora:
        """Read every adapter (name -> PEFT LoRA folder) and wrap the layers they target. Adapter k (from 1) is the
        k-th of ``adapters``. AdapterError names the folder and what does not fit."""
        from glmtune.adapters.ptuning import is_prefix_dir

        read: list[LoraAdapter] = []
        for name, src in adapters.items():
            if isinstance(src, LoraAdapter):
                read.append(src)
                continue
            if is_prefix_dir(src):
                raise AdapterError(f"--adapter {name}={src}: a P-Tuning checkpoint cannot share a batch with other "
                                   "adapters (its prefix fills every row's KV cache); serve it as the model itself, "
                                   "one per server: glmtune serve PATH")  # fmt: skip
            read.append(read_lora_adapter(src))
        device = next(model.parameters()).device
        rank = max(w.spec.rank for ad in read for w in ad.modules.values())
        n = len(read)
        targets = sorted({m for ad in read for m in ad.modules})
        selection = _Selection()
        layers: dict[str, MultiLoraLinear] = {}
        for target in targets:
            base = _linear(model, target, read)
            a_all = torch.zeros((n * rank, base.in_features), dtype=torch.float32)
            b_all = torch.zeros((base.out_features, n * rank), dtype=torch.float32)
            gates = torch.zeros((n + 1, n * rank), dtype=torch.float32)
            for k, ad in enumerate(read):
                w = ad.modules.get(target)
                if w is None:
                    continue
                if tuple(w.a.shape) != (w.spec.rank, base.in_features) or w.b.shape[0] != base.out_features:
                    raise AdapterError(f"{ad.weights_file}: module '{target}' is ({base.out_features} out, "
                                       f"{base.in_features} in) in this model, but its LoRA tensors have shapes "
                                       f"lora_A {tuple(w.a.shape)} and lora_B {tuple(w.b.shape)}; was the adapter "
                                       "trained on another model?")  # fmt: skip
                cols = slice(k * rank, k * rank + w.spec.rank)
                a_all[cols] = w.a.float()
                b_all[:, cols] = w.b.float()
                gates[k + 1, cols] = w.scale
            layer = MultiLoraLinear(base, a_all.to(device), b_all.to(device), gates.to(device), selection)
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            layers[target] = layer
        log.info("serving %d LoRA adapter(s) together on %d layer(s), rank up to %d", n, len(layers), rank)
        return cls(model, list(adapters), layers, selection)

    def select(self, index: torch.Tensor | None) -> None:
        """The adapter index per row, (b,) long, of the forwards that follow (None: the base for every row)."""
        self._selection.index = index

    def attach(self, batch: Any) -> None:
        """Make a :class:`~glmtune.generate.DecodeBatch` select its rows' adapters (``state.adapter``)."""
        adapter = batch.state.adapter

        def before_forward(rows: torch.Tensor | None) -> None:
            self.select(adapter if rows is None else adapter[rows])

        batch.before_forward = before_forward


def _linear(model: nn.Module, target: str, read: list[LoraAdapter]) -> nn.Module:
    try:
        module = model.get_submodule(target)
    except AttributeError:
        src = next(ad.weights_file for ad in read if target in ad.modules)
        raise AdapterError(f"{src}: the adapter has weights for module '{target}', which this model does not have; "
                           "was it trained on another model generation?") from None  # fmt: skip
    if not isinstance(getattr(module, "in_features", None), int) or isinstance(module, MultiLoraLinear):
        raise AdapterError(f"module '{target}' is a {type(module).__name__}, not a plain linear layer")
    return module
