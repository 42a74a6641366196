"""bench/quant_speed.py on the CPU with a tiny model: it writes THUDM-format INT8/INT4 folders with random weights,
loads them through glmtune's loader and decodes (the reference path; the GPU run measures)."""

from __future__ import annotations

import json

import quant_speed  # noqa: E402


def test_quant_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "quant.json"
    result = quant_speed.main(["--preset", "tiny-chatglm3", "--device", "cpu", "--prompt-len", "8", "--new-tokens",
                               "5", "--context", "40", "--mem-new-tokens", "4", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["end_to_end"]
    assert [r["precision"] for r in rows] == ["bf16", "int8", "int4 thudm", "int4 tinygemm"]
    for r in rows:
        assert r["new_tokens"] == 5 and r["graph_equals_eager"] is True and r["decode"] == "graph"
    for r in rows[1:]:  # the folders hold what the format says: int8 weights, fp16 scales, quantization_bit
        assert r["mem_new_tokens"] == 4 and r["folder_gib"] > 0 and r["load_s"] >= 0
        assert r["whole_run_speedup"] == r["whole_run_tokens_per_s"] / rows[0]["whole_run_tokens_per_s"]
    assert rows[2]["folder_gib"] < rows[1]["folder_gib"]  # INT4 packs two values a byte
    assert [r["layout"] for r in rows[1:]] == ["thudm", "thudm", "tinygemm"]


def test_the_written_folder_loads_quantized(tmp_path):
    from glmtune.models.config import preset
    from glmtune.models.quant import QuantizedLinear
    from glmtune.pretrained import load_pretrained

    cfg = preset("tiny-chatglm3")
    folder = tmp_path / "int4"
    quant_speed.write_random_quantized(
        cfg, 4, folder, quant_speed.tokenizer_files(tmp_path), quant_speed.torch.device("cpu")
    )
    assert json.loads((folder / "config.json").read_text())["quantization_bit"] == 4
    model = load_pretrained(folder, device="cpu").model
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * cfg.num_layers and all(m.bits == 4 for m in layers)


def test_first_difference_says_where_and_by_how_much():
    """A fast mode's tokens that part from eager's at position k: k and eager's logit gap there (>= 0: eager took
    its argmax; 0 only for an exact tie); equal tokens: None."""
    import torch

    from glmtune.generate import GenerationConfig, generate
    from glmtune.models import build_model
    from glmtune.models.config import preset

    model = build_model(preset("tiny-chatglm3"), generation="chatglm3")
    model.init_weights(seed=0, std=0.05)
    model.eval()
    prompt = [5, 9, 17, 33]
    eager = generate(model, [prompt], GenerationConfig(max_new_tokens=6, do_sample=False), stop_ids=[], pad_id=0,
                     decode="eager")[0]  # fmt: skip
    assert quant_speed.first_difference(model, prompt, eager=eager, other=list(eager)) == {
        "first_difference": None, "difference_gap": None}  # fmt: skip
    other = list(eager)
    other[3] = (eager[3] + 1) % 100
    got = quant_speed.first_difference(model, prompt, eager=eager, other=other)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + eager[:3]]))[0, -1].float()
    want = (logits[eager[3]] - logits[other[3]]) / (logits.max() - logits.min())
    assert got["first_difference"] == 3 and got["difference_gap"] == float(want) and got["difference_gap"] > 0
