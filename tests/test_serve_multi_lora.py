"""serve/multi_lora.py: rows of one forward, each with its own LoRA adapter (or none), give what LoraLinear gives each
row alone with that adapter (the reference: adapters/lora.py), on random inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmtune.adapters.lora import LoraLinear, LoraSpec
from glmtune.adapters.peft_format import AdapterError, LoraAdapter, LoraModuleWeights
from glmtune.serve.multi_lora import MultiLora


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20, bias=True, dtype=torch.float64)
        self.down = nn.Linear(20, 12, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def adapter(g: torch.Generator, modules: dict[str, tuple[int, int, int]], alpha: float, rslora: bool) -> LoraAdapter:
    out = LoraAdapter(path=None, weights_file="mem", config={})  # type: ignore[arg-type]
    for name, (rank, n_in, n_out) in modules.items():
        a = torch.randn(rank, n_in, generator=g, dtype=torch.float64)
        b = torch.randn(n_out, rank, generator=g, dtype=torch.float64)
        out.modules[name] = LoraModuleWeights(a, b, LoraSpec(rank, alpha, rslora))
    return out


def reference(model: Two, ad: LoraAdapter | None, x: torch.Tensor) -> torch.Tensor:
    """One row through LoraLinear wrappers (float64 adapters) carrying ``ad``'s weights."""
    up, down = model.up, model.down
    if ad is not None:
        wrapped = {}
        for name, layer in (("up", up), ("down", down)):
            w = ad.modules.get(name)
            if w is None:
                wrapped[name] = layer
                continue
            lora = LoraLinear(layer, rank=w.spec.rank, alpha=w.spec.alpha, use_rslora=w.spec.use_rslora,
                              dtype=torch.float64)  # fmt: skip
            with torch.no_grad():
                lora.lora_A.weight.copy_(w.a)
                lora.lora_B.weight.copy_(w.b)
            wrapped[name] = lora
        up, down = wrapped["up"], wrapped["down"]
    return down(torch.tanh(up(x)))


def test_each_row_gets_its_own_adapter():
    g = torch.Generator().manual_seed(0)
    model = Two()
    first = adapter(g, {"up": (4, 12, 20), "down": (4, 20, 12)}, 8.0, False)
    second = adapter(g, {"up": (2, 12, 20)}, 3.0, True)  # another rank, one layer only, rsLoRA
    x = torch.randn(5, 3, 12, generator=g, dtype=torch.float64)
    which = [0, 1, 2, 1, 0]  # 0: the base
    with torch.no_grad():
        want = torch.cat([reference(model, [None, first, second][k], x[i : i + 1]) for i, k in enumerate(which)])
        multi = MultiLora.load(model, {"first": first, "second": second})
        multi.select(torch.tensor(which))
        got = model(x)
        multi.select(None)
        base = model(x)
    # the stacked adapters are float32 (as LoraLinear keeps them); compare at float32's precision
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base[1], want[1]) and torch.allclose(base[0], want[0])


def test_a_mismatched_adapter_is_refused():
    g = torch.Generator().manual_seed(1)
    with pytest.raises(AdapterError, match="does not have"):
        MultiLora.load(Two(), {"x": adapter(g, {"sideways": (2, 12, 20)}, 4.0, False)})
    with pytest.raises(AdapterError, match="lora_A"):
        MultiLora.load(Two(), {"x": adapter(g, {"up": (2, 13, 20)}, 4.0, False)})
