"""ChatGLM2/3 and GLM-4 model: against the naive float64 reference, cache, batching, P-Tuning, checkpoints."""

import pytest
import torch

from glmtune.models import build_model
from glmtune.models.chatglm import ChatGLMForCausalLM
from glmtune.models.checkpoint import save_pretrained
from glmtune.models.config import preset
from glmtune.pretrained import load_model
from reference_chatglm import reference_logits, reference_prefix_kv

VARIANTS = {
    "chatglm2": {},
    "glm4": {"rope_ratio": 500.0},
    "mha-per-head-qkv": {"multi_query_attention": False},
    "post-ln-residual-biases": {"apply_residual_connection_post_layernorm": True, "add_bias_linear": True},
    "layernorm-no-final-norm": {"rmsnorm": False, "post_layer_norm": False, "add_qkv_bias": False},
}


def _model(overrides=None, *, dtype=torch.float64, seed=0, rope_style="chatglm3", std=0.1):
    cfg = preset("tiny-chatglm2").replace(**(overrides or {}))
    m = ChatGLMForCausalLM(cfg.replace(rope_style=rope_style), dtype=dtype)
    m.init_weights(seed=seed, std=std)
    return m.eval()


def _ids(n, seed=0, vocab=500):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _causal(s):
    return [list(range(q + 1)) for q in range(s)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant):
    m = _model(VARIANTS[variant])
    ids = _ids(9)
    with torch.no_grad():
        got = m(torch.tensor([ids]))[0]
    want = reference_logits(m.state_dict(), m.config, ids, list(range(9)), _causal(9))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("style", ["chatglm2", "chatglm3"])
def test_rope_ratio_styles(style):
    """ChatGLM3/GLM-4 scale the rotary base by rope_ratio; ChatGLM2-32k divides the positions by it."""
    m = _model({"rope_ratio": 16.0}, rope_style=style)
    ids = _ids(12, seed=3)
    with torch.no_grad():
        got = m(torch.tensor([ids]))[0]
    want = reference_logits(m.state_dict(), m.config, ids, list(range(12)), _causal(12), rope_style=style)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    other = reference_logits(
        m.state_dict(), m.config, ids, list(range(12)), _causal(12),
        rope_style="chatglm3" if style == "chatglm2" else "chatglm2",
    )  # fmt: skip
    assert (got - other).abs().max() > 1e-3  # the two styles really differ


def test_left_padded_batch_equals_one_by_one():
    m = _model()
    rows = [_ids(7, 1), _ids(3, 2), _ids(5, 3)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = m(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = m(torch.tensor([r]))[0]
            torch.testing.assert_close(batched[i, width - len(r) :], alone, rtol=0, atol=1e-10)
            # and against the reference, with the padded layout
            want = reference_logits(m.state_dict(), m.config, r, list(range(len(r))), _causal(len(r)))
            torch.testing.assert_close(alone, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix", [None, (4, False), (3, True)])
def test_cache_decoding_equals_full_forward(prefix):
    overrides = {} if prefix is None else {"pre_seq_len": prefix[0], "prefix_projection": prefix[1]}
    m = _model(overrides)
    rows = [_ids(6, 4), _ids(2, 5)]
    extra = [_ids(4, 6), _ids(4, 7)]
    width = 6
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        cache = m.new_cache(2, 16)
        pos = m.prompt_position_ids(ids, mask)
        step_logits = [m(ids, attention_mask=mask, position_ids=pos, cache=cache)[:, -1]]
        for t in range(4):
            nxt = torch.tensor([[extra[0][t]], [extra[1][t]]])
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            pos = m.next_position_ids(pos[:, -1:])
            step_logits.append(m(nxt, attention_mask=mask, position_ids=pos, cache=cache)[:, -1])
        for i, r in enumerate(rows):
            full = m(torch.tensor([r + extra[i]]))[0, len(r) - 1 :]
            got = torch.stack([s[i] for s in step_logits])
            torch.testing.assert_close(got, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_matches_reference(projection):
    m = _model({"pre_seq_len": 5, "prefix_projection": projection})
    sd = m.state_dict()
    assert ("transformer.prefix_encoder.trans.0.weight" in sd) == projection
    if projection:  # the original projects from the full key/value width: kv -> hidden -> kv
        kv = m.config.num_layers * 2 * m.config.num_kv_heads * m.config.head_dim
        assert sd["transformer.prefix_encoder.embedding.weight"].shape == (5, kv)
        assert sd["transformer.prefix_encoder.trans.0.weight"].shape == (m.config.hidden_size, kv)
    ids = _ids(6, 8)
    with torch.no_grad():
        got = m(torch.tensor([ids]))[0]
    want = reference_logits(sd, m.config, ids, list(range(6)), _causal(6), prefix_kv=reference_prefix_kv(sd, m.config))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the prefix changes the output
    plain = reference_logits(sd, m.config, ids, list(range(6)), _causal(6))
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_rows_equal_separate_samples(backend):
    m = _model()
    m.set_attention_backend(backend)
    a, b = _ids(5, 9), _ids(4, 10)
    seg = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 2])
    pos = torch.tensor([list(range(5)) + list(range(4)) + [0, 0]])
    with torch.no_grad():
        packed = m(torch.tensor([a + b + [0, 0]]), position_ids=pos, segment_ids=seg)[0]
        m.set_attention_backend("sdpa")
        torch.testing.assert_close(packed[:5], m(torch.tensor([a]))[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(packed[5:9], m(torch.tensor([b]))[0], rtol=0, atol=1e-10)


def test_hidden_states_and_logits_to_keep():
    m = _model()
    ids = torch.tensor([_ids(6, 11)])
    with torch.no_grad():
        full = m(ids)
        h = m.hidden_states(ids)
        torch.testing.assert_close(m.output_embeddings()(h), full)
        torch.testing.assert_close(m(ids, logits_to_keep=2), full[:, -2:])


def test_gradient_checkpointing_same_gradients():
    m = _model(dtype=torch.float32).train()
    ids = torch.tensor([_ids(8, 12)])
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.transformer.gradient_checkpointing = flag
        m(ids).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_bf16_close_to_fp32():
    m32 = _model(dtype=torch.float32)
    m16 = _model(dtype=torch.bfloat16)
    ids = torch.tensor([_ids(10, 13)])
    with torch.no_grad():
        a, b = m32(ids), m16(ids).float()
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1 * a.abs().max()


def test_half_precision_rope_tables_are_rounded():
    """The original rounds the [cos, sin] table to bf16/fp16 (ChatGLM2: angles computed in that precision)."""
    from glmtune.models.chatglm import rope_table

    t3 = rope_table(300, 8, torch.bfloat16, "cpu", rope_ratio=1.0, style="chatglm3")
    assert t3.dtype == torch.bfloat16
    exact = rope_table(300, 8, torch.float32, "cpu", rope_ratio=1.0, style="chatglm3")
    torch.testing.assert_close(t3, exact.to(torch.bfloat16), rtol=0, atol=0)
    t2 = rope_table(300, 8, torch.bfloat16, "cpu", rope_ratio=1.0, style="chatglm2")
    # positions above 256 are not representable in bf16: the ChatGLM2 table differs there
    assert not torch.equal(t2[257:], t3[257:])


def test_checkpoint_round_trip_bit_identical(tmp_path):
    m = _model(dtype=torch.float32, std=0.02)
    save_pretrained(m, m.config, tmp_path / "m", max_shard_bytes=40_000)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path / "m", m.config, dtype=torch.float32, device=torch.device("cpu"))
    for (n1, t1), (n2, t2) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    ids = torch.tensor([_ids(5, 14)])
    with torch.no_grad():
        assert torch.equal(m(ids), loaded(ids))


def test_original_parameter_names():
    m = build_model(preset("tiny-glm4"), device="meta")
    names = set(m.state_dict())
    for n in (
        "transformer.embedding.word_embeddings.weight",
        "transformer.rotary_pos_emb.inv_freq",
        "transformer.encoder.layers.0.input_layernorm.weight",
        "transformer.encoder.layers.1.self_attention.query_key_value.weight",
        "transformer.encoder.layers.1.self_attention.query_key_value.bias",
        "transformer.encoder.layers.1.self_attention.dense.weight",
        "transformer.encoder.layers.1.post_attention_layernorm.weight",
        "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
        "transformer.encoder.final_layernorm.weight",
        "transformer.output_layer.weight",
    ):
        assert n in names, n
    cfg = m.config
    assert m.state_dict()["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape == (
        (cfg.num_attention_heads + 2 * cfg.multi_query_group_num) * cfg.head_dim,
        cfg.hidden_size,
    )
    assert m.state_dict()["transformer.rotary_pos_emb.inv_freq"].shape == (cfg.head_dim // 4,)


def test_bad_shapes_are_clear_errors():
    m = _model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    cache = m.new_cache(1, 8)
    m(torch.tensor([[5, 6]]), cache=cache)
    with pytest.raises(ValueError, match="position_ids are required"):
        m(torch.tensor([[7]]), cache=cache)
