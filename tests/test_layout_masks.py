"""The sequence layout and the one mask builder: every form of the mask follows one naive rule."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from glmtune.models.attention import KVCache, attend
from glmtune.models.config import preset
from glmtune.models.layout import SequenceLayout, next_positions, prompt_layout, sample_positions, token_positions
from glmtune.models.masks import ALL, build_mask
from glmtune.models.spec import SPECS, configure, get_spec

# FlexAttention outside torch.compile runs its reference implementation: right for checking numerics
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def naive(q_seg, q_ord, k_seg, k_ord, k_ctx):
    """Python loops: who may see whom (prefix keys: everyone; same sample: not later or in its context)."""
    out = []
    for qs, qo in zip(q_seg, q_ord, strict=True):
        row = []
        for ks, ko, kc in zip(k_seg, k_ord, k_ctx, strict=True):
            if qs < 0:
                row.append(True)
            else:
                row.append(ks == ALL or (ks == qs and (ko <= qo or kc)))
        out.append(row)
    return out


def random_rows(rng: random.Random, b: int, t: int, with_context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seg = torch.full((b, t), -1, dtype=torch.long)
    ctx = torch.zeros((b, t), dtype=torch.bool)
    for i in range(b):
        pos, j = 0, 0
        while pos < t - 2 and rng.random() < 0.85:
            n = rng.randint(1, min(6, t - pos))
            seg[i, pos : pos + n] = j
            if with_context:
                ctx[i, pos : pos + rng.randint(0, n)] = True
            pos, j = pos + n, j + 1
    return seg, ctx


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_prefix", [0, 3])
def test_dense_mask_follows_the_rule(seed, n_prefix):
    rng = random.Random(seed)
    b, t = 3, 11
    seg, ctx = random_rows(rng, b, t, with_context=seed % 2 == 1)
    layout = SequenceLayout(torch.zeros((b, t), dtype=torch.long), seg, ctx)
    mask = build_mask(layout, n_prefix=n_prefix).dense
    assert mask.shape == (b, 1, t, n_prefix + t)
    for i in range(b):
        k_seg = [ALL] * n_prefix + seg[i].tolist()
        k_ord = [-1] * n_prefix + list(range(t))
        k_ctx = [True] * n_prefix + ctx[i].tolist()
        assert mask[i, 0].tolist() == naive(seg[i].tolist(), list(range(t)), k_seg, k_ord, k_ctx)


def test_causal_fast_path_only_when_exact():
    pos = torch.arange(5)[None]
    assert build_mask(SequenceLayout(pos)).causal
    assert not build_mask(SequenceLayout(pos), n_prefix=2).causal
    assert not build_mask(SequenceLayout(pos, segments=torch.zeros((1, 5), dtype=torch.long))).causal
    with pytest.raises(ValueError, match="backend"):
        build_mask(SequenceLayout(pos), backend="xformers")


@pytest.mark.parametrize("n_prefix", [0, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_flex_and_dense_attention_agree(n_prefix, groups):
    """The FlexAttention BlockMask and the dense SDPA mask give the same attention (packed rows, v1 context)."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 13, 4, 8
    seg, ctx = random_rows(rng, b, t, with_context=True)
    layout = SequenceLayout(torch.zeros((b, t), dtype=torch.long), seg, ctx)
    q = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h // groups, n_prefix + t, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h // groups, n_prefix + t, d, generator=gen, dtype=torch.float64)
    dense = attend(q, k, v, build_mask(layout, n_prefix=n_prefix))
    flex = attend(q, k, v, build_mask(layout, n_prefix=n_prefix, backend="flex"))
    real = (seg >= 0)[:, None, :, None]  # padding queries: either form may give them anything
    torch.testing.assert_close(torch.where(real, flex, 0), torch.where(real, dense, 0))
    # and the dense form against SDPA with the naive rule, keys expanded to every head
    ref_mask = torch.stack(
        [
            torch.tensor(
                naive(
                    seg[i].tolist(),
                    list(range(t)),
                    [ALL] * n_prefix + seg[i].tolist(),
                    [-1] * n_prefix + list(range(t)),
                    [True] * n_prefix + ctx[i].tolist(),
                )
            )
            for i in range(b)
        ]
    )
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=ref_mask[:, None])  # fmt: skip
    torch.testing.assert_close(dense, ref)


def test_cache_slots_and_mask():
    """Keys written at slots carry their segments; a decode query sees the prefix and its own row's real keys."""
    cache = KVCache(1, 2, 1, 8, 4, dtype=torch.float32, device="cpu")
    pk = torch.randn(2, 1, 2, 4)
    cache.write_prefix([(pk, pk)])
    cfg = preset("tiny-chatglm2")
    ids, layout = prompt_layout([[5, 6, 7], [8]], cfg, pad_id=0, start_slot=2)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert layout.slots.tolist() == [[2, 3, 4], [2, 3, 4]]
    assert layout.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    cache.write_tokens(layout.slots, layout.segments, layout.context)
    step = SequenceLayout(torch.tensor([[3], [1]]), torch.zeros((2, 1), dtype=torch.long), None,
                          torch.tensor([[5], [5]]))  # fmt: skip
    cache.write_tokens(step.slots, step.segments, None)
    mask = build_mask(step, cache=cache).dense
    assert mask[0, 0, 0].tolist() == [True, True, True, True, True, True, False, False]
    assert mask[1, 0, 0].tolist() == [True, True, False, False, True, True, False, False]
    cache.reset()
    assert (cache.segments == -1).all() and cache.length == 0


def test_v1_positions_from_tokens_and_samples():
    cfg = preset("tiny-chatglm")
    g, sop = cfg.gmask_token_id, cfg.bos_token_id
    seq = [10, 11, g, sop, 12, 13]
    assert token_positions(seq, cfg) == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]
    assert sample_positions(6, "2d", 3, 2) == token_positions(seq, cfg)
    assert sample_positions(4, "1d") == [[0, 1, 2, 3]]
    ids, layout = prompt_layout([seq, [10, g, sop]], cfg, pad_id=3)
    assert layout.positions.shape == (2, 2, 6)
    assert layout.context.tolist() == [[True, True, True, False, False, False],
                                       [False, False, False, True, True, False]]  # fmt: skip
    assert next_positions(torch.tensor([[[4], [2]]])).tolist() == [[[4], [3]]]
    assert next_positions(torch.tensor([[4]])).tolist() == [[5]]


def test_specs():
    from glmtune.cli_options import GENERATION_CHOICES  # the CLI's copy (no torch at start-up) stays the specs'

    assert GENERATION_CHOICES == tuple(SPECS)
    assert [s.rope for s in SPECS.values()] == ["glm2d", "chatglm2", "chatglm3", "chatglm3"]
    assert get_spec("chatglm").prefix_lm and get_spec("chatglm").positions == "2d"
    cfg = configure(preset("tiny-chatglm2"), "chatglm2")
    assert cfg.rope == "chatglm2" and configure(preset("tiny-chatglm2"), None).rope == "chatglm3"
    assert "rope_style" not in cfg.to_dict()  # never written into config.json
    with pytest.raises(ValueError, match="is a 'glm' model"):
        configure(preset("tiny-chatglm2"), "chatglm")
    with pytest.raises(ValueError, match="unknown generation"):
        get_spec("chatglm5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["tiny-chatglm2", "tiny-chatglm"])
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_compiled_flex_blocks_match_eager_sdpa_on_cuda(name, backend):
    """Compiled blocks with FlexAttention (or the varlen backend: its fp32 dense fallback for v2, flex for v1's
    context) give eager SDPA's loss and gradients on packed rows (fp32, CUDA)."""
    from glmtune.models import build_model
    from glmtune.train.compile import compile_blocks

    torch.manual_seed(0)
    cfg = preset(name)
    eager_model = build_model(cfg)
    eager_model.init_weights(seed=3, std=0.3)
    eager_model = eager_model.cuda()
    compiled = build_model(cfg)
    compiled.init_weights(seed=3, std=0.3)
    compiled = compiled.cuda()
    compile_blocks(compiled)
    assert compiled.attention_backend in ("varlen", "flex")
    compiled.set_attention_backend(backend)
    seg = torch.tensor([[0] * 50 + [1] * 40 + [2] * 30 + [-1] * 8, [0] * 100 + [1] * 28]).cuda()
    ids = torch.randint(10, 400, seg.shape).cuda()
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([50, 40, 30, 8], [100, 28])]).cuda()
    kw = {"segment_ids": seg}
    if cfg.arch == "glm":
        pos = torch.stack([pos, torch.zeros_like(pos)], 1)
        kw["context"] = (pos[:, 0] < 5) & (seg >= 0)
    losses = []
    for m in (eager_model, compiled):
        h = m.hidden_states(ids, position_ids=pos, **kw)
        loss = (h.float() ** 2 * (seg >= 0)[..., None]).mean()
        loss.backward()
        losses.append((loss.detach(), m._blocks()[0].mlp.dense_4h_to_h.weight.grad.clone()))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-3, atol=1e-5)
