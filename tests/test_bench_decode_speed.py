"""bench/decode_speed.py on the CPU with a tiny model: the script runs and times what it says, and greedy decoding
of its transformers peer makes glmtune's tokens from the same weights (the rows time the same work)."""

from __future__ import annotations

import importlib.util
import json

import benchlib  # noqa: E402
import decode_speed  # noqa: E402
import pytest
import torch

from glmtune.generate import GenerationConfig, generate_stream
from glmtune.models import build_model
from glmtune.models.config import preset

HAS_HF = importlib.util.find_spec("transformers") is not None


def test_decode_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    rows = decode_speed.main(["--preset", "tiny-chatglm3", "--device", "cpu", "--batch", "1", "3", "--prompt-len",
                              "8", "--new-tokens", "6", "--decode", "auto", "--json", str(out)]
                             + ([] if HAS_HF else ["--no-hf"]))  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    impls = ["glmtune decode=auto"] * 2 + (["transformers GlmForCausalLM"] * 2 if HAS_HF else [])
    assert [r["impl"] for r in rows] == impls and [r["batch"] for r in rows] == [1, 3] * (len(impls) // 2)
    for r in rows:
        assert r["new_tokens"] == 6, r  # no stop token: every row decodes all of them (times are not asserted)
        assert r["tokens_per_s_total"] == pytest.approx(r["batch"] * r["tokens_per_s_per_seq"])
    assert out.with_suffix(".md").read_text().count("\n") == len(rows) + 2


def test_decode_speed_variants_and_profile():
    rows = decode_speed.main(["--preset", "tiny-chatglm3", "--device", "cpu", "--batch", "1", "2", "--prompt-len",
                              "8", "--new-tokens", "6", "--variants", "eager:torch:sdpa", "graph",
                              "--profile-batch", "2", "--profile-tokens", "3", "--no-hf"])  # fmt: skip
    eager = "glmtune decode=eager matvec=torch attention=sdpa"
    assert [(r["impl"], r["batch"]) for r in rows] == [(eager, 1), (eager, 2), ("glmtune decode=graph", 1),
                                                       ("glmtune decode=graph", 2)]  # fmt: skip
    assert ["kernel_ms_per_token" in r for r in rows] == [False, True, False, True]
    for r in rows:
        assert r["whole_tokens_per_s"] == pytest.approx(r["new_tokens"] / r["whole_s"])


@pytest.mark.skipif(not HAS_HF, reason="transformers is a dev extra")
def test_transformers_peer_decodes_glmtunes_tokens_from_the_same_weights():
    import peer_hf

    cfg = preset("tiny-chatglm3")
    model = build_model(cfg, device="cpu", dtype=torch.float32, generation="chatglm3")
    benchlib.random_fill(model, torch.device("cpu"), torch.float32, seed=7)
    model.eval()
    hf = peer_hf.hf_model(cfg, torch.device("cpu"), torch.float32).eval()
    hf.load_state_dict(peer_hf.hf_state_dict(model), strict=False)
    ids = decode_speed.prompts_for(3, 10, cfg.padded_vocab_size)
    gen = GenerationConfig(max_new_tokens=12, do_sample=False)
    ours = torch.stack(list(generate_stream(model, ids.tolist(), gen, stop_ids=[], pad_id=0)), dim=1)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]  # fmt: skip
    assert torch.equal(ours, theirs)
    assert len(set(ours.flatten().tolist())) > 3  # not one token repeated: a real comparison
