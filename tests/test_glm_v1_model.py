"""ChatGLM-6B (v1) model: parity with an independent float64 reference, cache, padding, P-Tuning, meta init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmtune.models.config import preset
from glmtune.models.glm import GLMForCausalLM, rope_inv_freq, rope_table
from reference_glm_v1 import ref_forward, ref_positions, ref_prefix_kv

CFG = preset("tiny-chatglm")  # 2 layers, hidden 64, 4 heads (d = 16), vocab 512
MASK, GMASK, BOS, EOS = CFG.mask_token_id, CFG.gmask_token_id, CFG.bos_token_id, CFG.eos_token_id
PAD = CFG.pad_token_id


def _model(cfg=CFG, dtype=torch.float64, seed=0) -> GLMForCausalLM:
    model = GLMForCausalLM(cfg, device="meta", dtype=dtype)
    model.init_weights(seed=seed)
    # Random everything (LayerNorms and biases too), so every parameter is exercised.
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "layernorm" in name else (0.5 if "prefix_encoder" in name else 0.08)
            base = 1.0 if name.endswith("layernorm.weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


def _words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 480, (n,), generator=g).tolist()


def _gmask_seq(seed=1) -> list[int]:  # prompt [gMASK] <sop> answer
    return _words(6, seed) + [GMASK, BOS] + _words(4, seed + 1)


def _mask_seq(seed=2) -> list[int]:  # text with a [MASK] in the middle, then <sop> and the fill
    return _words(3, seed) + [MASK] + _words(3, seed + 1) + [BOS] + _words(3, seed + 2)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make_seq", [_gmask_seq, _mask_seq])
def test_float64_matches_reference(make_seq):
    model = _model()
    seq = make_seq()
    with torch.no_grad():
        got = model(torch.tensor([seq]))[0]
    want = ref_forward(_state(model), CFG, seq)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_matches_reference():
    model64 = _model()
    model32 = _model(dtype=torch.float32)
    seq = _gmask_seq(seed=7)
    with torch.no_grad():
        got = model32(torch.tensor([seq]))[0].double()
    want = ref_forward(_state(model64), CFG, seq)
    assert (got - want).abs().max() < 1e-4


def test_reference_sees_the_mask_and_positions():
    """The parity test can fail: a causal-only mask or 1D positions change the reference's logits."""
    model = _model()
    seq = _gmask_seq()
    sd = _state(model)
    want = ref_forward(sd, CFG, seq)
    pos, block = ref_positions(seq, BOS, MASK, GMASK)
    shifted = ref_forward(sd, CFG, seq, positions=(list(range(len(seq))), block))
    assert (want - shifted).abs().max() > 1e-3
    with torch.no_grad():
        # moving <sop> one token later makes one more token bidirectional and changes the prompt's logits
        other = model(torch.tensor([seq[:5] + [GMASK, seq[5], BOS] + seq[8:]]))[0]
    assert (other[:5] - want[:5]).abs().max() > 1e-3


def test_position_ids_match_original_rule():
    model = _model()
    for seq in (_gmask_seq(), _mask_seq(), _words(4, 3) + [MASK, GMASK] + _words(2, 4) + [BOS]):
        got = model.prompt_position_ids(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
        pos, block = ref_positions(seq, BOS, MASK, GMASK)
        assert got.tolist() == [pos, block]
    seq = _gmask_seq()
    ctx = seq.index(BOS)
    assert model.prompt_position_ids(torch.tensor([seq]))[0, 0, ctx:].tolist() == [ctx - 1] * (len(seq) - ctx)
    last = torch.tensor([[[5], [2]], [[7], [1]]])
    assert model.next_position_ids(last).tolist() == [[[5], [3]], [[7], [2]]]
    # left padding: positions of the real tokens as if alone, zeros on the padding
    padded = torch.tensor([[PAD, PAD] + _gmask_seq()[:8]])
    mask = torch.tensor([[0, 0] + [1] * 8])
    alone = model.prompt_position_ids(torch.tensor([_gmask_seq()[:8]]))
    got = model.prompt_position_ids(padded, mask)
    assert got[..., :2].eq(0).all() and torch.equal(got[..., 2:], alone)


def _extend_positions(prompt_pos: torch.Tensor, n_new: int) -> torch.Tensor:
    """Positions of n_new generated tokens after a prompt: same position id, block position +1 each."""
    last = prompt_pos[..., -1:]
    extra = last.repeat(1, 1, n_new)
    extra[:, 1] += torch.arange(1, n_new + 1)
    return torch.cat([prompt_pos, extra], dim=-1)


@pytest.mark.parametrize("make_seq", [_gmask_seq, _mask_seq])
def test_cache_decoding_equals_full_forward(make_seq):
    model = _model()
    seq = make_seq()
    ctx = seq.index(BOS) + 1  # prompt ends with <sop>
    prompt, answer = seq[:ctx], seq[ctx:]
    ids = torch.tensor([prompt])
    pos = model.prompt_position_ids(ids)
    with torch.no_grad():
        full = model(torch.tensor([seq]), position_ids=_extend_positions(pos, len(answer)))[0]
        cache = model.new_cache(1, len(seq))
        steps = [model(ids, position_ids=pos, cache=cache)[0]]
        last = pos[..., -1:]
        for tok in answer:
            last = model.next_position_ids(last)
            steps.append(model(torch.tensor([[tok]]), position_ids=last, cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-10, atol=1e-10)
    # and the prompt's own positions, computed by the model, agree with the reference over the whole sequence
    want = ref_forward(_state(model), CFG, seq)
    torch.testing.assert_close(full, want, rtol=1e-10, atol=1e-10)


def test_left_padded_batch_equals_one_by_one():
    model = _model()
    prompts = [_words(n, 10 + n) + [GMASK, BOS] for n in (2, 7, 4)]
    prompts[2] = _words(2, 30) + [MASK] + _words(1, 31) + [BOS]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), PAD)
    attn = torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    new_tokens = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    with torch.no_grad():
        cache = model.new_cache(3, width + 3)
        pos = model.prompt_position_ids(ids, attn)
        batch = [model(ids, attention_mask=attn, position_ids=pos, cache=cache)]
        last = pos[..., -1:]
        for step in range(3):
            attn = torch.cat([attn, torch.ones((3, 1), dtype=torch.long)], dim=1)
            last = model.next_position_ids(last)
            tok = torch.tensor([[row[step]] for row in new_tokens])
            batch.append(model(tok, attention_mask=attn, position_ids=last, cache=cache))
        for i, p in enumerate(prompts):
            seq = p + new_tokens[i]
            alone_pos = _extend_positions(model.prompt_position_ids(torch.tensor([p])), 3)
            alone = model(torch.tensor([seq]), position_ids=alone_pos)[0]
            got = torch.cat([batch[0][i, width - len(p) :]] + [b[i] for b in batch[1:]])
            torch.testing.assert_close(got, alone, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(alone, ref_forward(_state(model), CFG, seq), rtol=1e-9, atol=1e-9)
    assert torch.isfinite(batch[0]).all()


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_prefix_matches_reference(projection):
    cfg = CFG.replace(pre_seq_len=3, prefix_projection=projection)
    model = _model(cfg)
    names = [n for n in model.state_dict() if "prefix_encoder" in n]
    expected = ["embedding.weight"] + (["trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"]
                                       if projection else [])  # fmt: skip
    assert sorted(names) == sorted(f"transformer.prefix_encoder.{n}" for n in expected)
    seq = _gmask_seq(seed=4)
    sd = _state(model)
    with torch.no_grad():
        got = model(torch.tensor([seq]))[0]
    want = ref_forward(sd, cfg, seq, prefix_kv=ref_prefix_kv(sd, cfg))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (want - ref_forward(sd, cfg, seq)).abs().max() > 1e-3  # the prefix matters
    # decoding from a cache pre-filled with the prefix gives the same logits
    ctx = seq.index(BOS) + 1
    ids = torch.tensor([seq[:ctx]])
    pos = model.prompt_position_ids(ids)
    with torch.no_grad():
        cache = model.new_cache(1, len(seq))
        assert cache.length == 3
        steps = [model(ids, attention_mask=torch.ones_like(ids), position_ids=pos, cache=cache)[0]]
        last = pos[..., -1:]
        for i, tok in enumerate(seq[ctx:]):
            last = model.next_position_ids(last)
            attn = torch.ones((1, ctx + i + 1), dtype=torch.long)
            steps.append(model(torch.tensor([[tok]]), attention_mask=attn, position_ids=last, cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps), want, rtol=1e-10, atol=1e-10)


def test_ptuning_prefix_dropout_only_in_training():
    model = _model(CFG.replace(pre_seq_len=2))
    ids = torch.tensor([_gmask_seq()])
    with torch.no_grad():
        a, b = model(ids), model(ids)
        model.train()
        torch.manual_seed(0)
        c = model(ids)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_meta_construction_and_names():
    model = GLMForCausalLM(CFG, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    assert model.config is CFG
    names = set(model.state_dict())
    per_layer = [
        "input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
        "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
        "attention.rotary_emb.inv_freq", "post_attention_layernorm.weight", "post_attention_layernorm.bias",
        "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
    ]  # fmt: skip
    expected = {"transformer.word_embeddings.weight", "transformer.final_layernorm.weight",
                "transformer.final_layernorm.bias", "lm_head.weight"}  # fmt: skip
    expected |= {f"transformer.layers.{i}.{n}" for i in range(CFG.num_layers) for n in per_layer}
    assert names == expected
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    qkv = model.transformer.layers[0].attention.query_key_value.weight
    assert tuple(qkv.shape) == (3 * CFG.hidden_size, CFG.hidden_size)
    model.init_weights(seed=3)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    inv = model.transformer.layers[1].attention.rotary_emb.inv_freq
    assert inv.dtype == torch.float16 and inv.shape == (CFG.head_dim // 4,)
    again = GLMForCausalLM(CFG)
    again.init_weights(seed=3)
    for (n1, t1), (_, t2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(t1, t2), n1


def test_init_missing_fills_meta_tensors_only():
    model = GLMForCausalLM(CFG.replace(pre_seq_len=2), device="meta")
    rules = model.checkpoint_rules()
    assert any("prefix_encoder" in r for r in rules["optional"])
    names = ["transformer.prefix_encoder.embedding.weight", "transformer.layers.0.attention.rotary_emb.inv_freq"]
    model.init_missing(names, device="cpu", dtype=torch.float32)
    emb = model.transformer.prefix_encoder.embedding.weight
    assert not emb.is_meta and emb.dtype == torch.float32
    assert model.transformer.layers[0].attention.rotary_emb.inv_freq.dtype == torch.float16
    assert model.transformer.word_embeddings.weight.is_meta


def test_rope_table_half_precision_like_the_original():
    """The float16 table: float16 inv_freq, float16 positions, float16 angles, cos/sin rounded to float16."""
    n, rot = 2100, 64
    cos, sin = rope_table(n, rot, torch.float16)
    inv = (1.0 / (10000.0 ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)))).astype(np.float16)
    t = np.arange(n).astype(np.float16)  # 2049 is not a float16: the original's arange rounds it too
    angles = (t.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]).astype(np.float16)
    angles = np.concatenate([angles, angles], axis=1).astype(np.float32)
    want_cos, want_sin = np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)
    # float32 cos/sin may differ in the last bit between libraries; after rounding to float16 nearly never.
    assert (cos.numpy() != want_cos).mean() < 1e-4 and (sin.numpy() != want_sin).mean() < 1e-4
    assert np.abs(cos.numpy().astype(np.float32) - want_cos.astype(np.float32)).max() <= 2**-10
    c32, _ = rope_table(n, rot, torch.float32)
    assert c32.dtype == torch.float32 and not torch.equal(c32, cos.float())  # fp32 model: fp32 table
    cb, _ = rope_table(n, rot, torch.bfloat16)
    assert torch.equal(cb, cos.to(torch.bfloat16))  # bf16 model: the float16 table


def test_bad_inputs_are_named():
    model = _model()
    ids = torch.tensor([_gmask_seq()])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.zeros(1, 2, 3, dtype=torch.long))
    cache = model.new_cache(1, 32)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="position_ids are required"):
        model(torch.tensor([[7]]), cache=cache)
    with pytest.raises(ValueError, match="arch"):
        GLMForCausalLM(preset("tiny-chatglm2"))


def test_loads_an_original_layout_checkpoint(tmp_path):
    """The original .bin holds lm_head.weight beside the embeddings and float16 inv_freq buffers; both load."""
    from glmtune.models.checkpoint import load_weights

    src = _model(dtype=torch.float32)
    state = {k: v.clone().half() for k, v in src.state_dict().items()}  # separate tensors, as the original saves
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = GLMForCausalLM(CFG, device="meta")
    report = load_weights(model, tmp_path, dtype=torch.float32, device="cpu", **model.checkpoint_rules())
    model.init_missing(report.missing_optional, device="cpu", dtype=torch.float32)
    assert report.missing_optional == [] and "lm_head.weight" in report.tied
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert model.transformer.layers[0].attention.rotary_emb.inv_freq.dtype == torch.float16
    ids = torch.tensor([_gmask_seq()])
    with torch.no_grad():
        want = src.half().float()(ids)
        torch.testing.assert_close(model(ids), want)
    del state["transformer.layers.1.attention.rotary_emb.inv_freq"]  # a checkpoint without the buffers also loads
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = GLMForCausalLM(CFG, device="meta")
    report = load_weights(model, tmp_path, dtype=torch.float32, device="cpu", **model.checkpoint_rules())
    assert report.missing_optional == ["transformer.layers.1.attention.rotary_emb.inv_freq"]
    model.init_missing(report.missing_optional, device="cpu", dtype=torch.float32)
    assert torch.equal(model.transformer.layers[1].attention.rotary_emb.inv_freq, rope_inv_freq(CFG.head_dim // 2))
