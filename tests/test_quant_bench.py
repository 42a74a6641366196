"""bench/quant_train.py on the CPU with a tiny model: the quantized model is built block by block in the form a
checkpoint loads into, and every run trains with glmtune's real step and reports its numbers."""

from __future__ import annotations

import json

import quant_train  # noqa: E402
import torch

from glmtune.models.nf4 import NF4Linear
from glmtune.models.quant import QuantizedLinear


def test_the_model_is_built_quantized_block_by_block():
    cfg = quant_train.model_config(tiny=True)
    for quantize, kind in (("int4", QuantizedLinear), ("nf4", NF4Linear), ("none", torch.nn.Linear)):
        model = quant_train.build_quantized_model(cfg, quantize, torch.device("cpu"), torch.float32)
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        layers = [m for n, m in model.named_modules() if n.endswith(quant_train.QUANTIZED_LINEARS)]
        assert len(layers) == 4 * cfg.num_layers and all(type(m) is kind for m in layers)
        norm = model.transformer.encoder.final_layernorm.weight
        assert torch.equal(norm, torch.ones_like(norm))  # benchlib's fill, by name, for the parts outside the blocks
        with torch.no_grad():
            logits = model(torch.randint(10, 500, (1, 16)))
        assert torch.isfinite(logits).all() and logits.std() > 0


def test_the_benchmark_runs_every_setting(tmp_path):
    out = tmp_path / "quant_train.json"
    rows = quant_train.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--batches", "2",
                             "--json", str(out)])  # fmt: skip
    assert [r["run"] for r in rows] == ["ptuning-int4", "qlora-nf4", "lora-bf16"]
    for r in rows:
        assert "error" not in r, r
        assert r["useful_tok_s"] > 0 and r["step_ms"] > 0 and r["gradient_checkpointing"] is True
    assert rows[1]["vs_bf16_lora"] == rows[1]["useful_tok_s"] / rows[2]["useful_tok_s"]
    assert json.loads(out.read_text())["rows"] == rows
    assert "| qlora-nf4 | 4 |" in out.with_suffix(".md").read_text()
