"""The split-over-the-keys attention for decode steps (``models/decode_attention.py``) against float64 SDPA under
the same dense bool mask, the mode that routes ``F.scaled_dot_product_attention`` to it, and decoding with it
(``generate``'s ``attention="triton"``).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` while the module is imported, see the
``da`` fixture); tests marked ``gpu`` run the compiled kernels on ChatGLM3-6B's decode shapes and captured steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtune.generate import Decoder, GenerationConfig, generate, resolve_attention
from glmtune.models import build_model
from glmtune.models.config import preset
from triton_support import import_kernels

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def da():
    """models.decode_attention, compiled or interpreted (``triton_support``)."""
    return import_kernels("glmtune.models.decode_attention")


def _case(b: int, h: int, n_q: int, t: int, d: int, dtype: torch.dtype, seed: int, n_prefix: int = 0,
          used: int | None = None):  # fmt: skip
    """q (b, h, n_q, d), k, v (b, h, t, d) and a decode-like mask (b, 1, n_q, t): ``n_prefix`` prefix slots every
    query sees, then each row's own slots up to a row-dependent end (at most ``used``), later slots empty, and a
    random hole in the slots in use (so masked keys sit between seen ones). Every query sees at least one key."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (n_q, t, t))
    used = t if used is None else used
    ends = torch.randint(max(n_prefix + 1, used // 2), used + 1, (b,), generator=g)  # a row's first empty slot
    slot = torch.arange(t)
    mask = (slot[None, :] < ends[:, None]) & (torch.rand(b, t, generator=g) > 0.2)
    mask[:, :n_prefix] = True
    mask[torch.arange(b), ends - 1] = True  # the query's own slot
    mask = mask[:, None, None, :].expand(b, 1, n_q, t)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE)


def _reference(q, k, v, mask, scale=None):
    return F.scaled_dot_product_attention(*(x.detach().cpu().double() for x in (q, k, v)), attn_mask=mask.cpu(),
                                          scale=scale)  # fmt: skip


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.detach().cpu().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out - ref).norm() / ref.norm()).item() < rel
    # every element (an unwritten or misplaced output fails here)
    assert ((out - ref).abs() <= rel * (ref.abs().max() + 4 * ref.abs())).all()


# (b, heads, queries, keys, d, prefix slots, slots in use): GQA folded (16 queries), one query (MHA), batches,
# key counts that are no multiple of the block, a P-Tuning prefix, unused slots at the end
CASES = [(1, 2, 16, 100, 64, 0, None), (3, 2, 5, 77, 32, 4, 60), (2, 3, 1, 70, 16, 0, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64_sdpa(da, dtype):
    configs = [da.DEFAULT, da.DecodeAttentionConfig(block_t=16, min_chunk=32, programs=1000),
               da.DecodeAttentionConfig(block_t=32, min_chunk=32, programs=1)]  # fmt: skip
    for i, (b, h, n_q, t, d, n_prefix, used) in enumerate(CASES):
        q, k, v, mask = _case(b, h, n_q, t, d, dtype, seed=i, n_prefix=n_prefix, used=used)
        ref = _reference(q, k, v, mask)
        splits = {da.splits_for(b, h, t, c)[1] for c in configs}
        assert 1 in splits and max(splits) > 2  # the one-chunk path and the combine both ran
        for config in configs:
            _close(da.attention(q, k, v, mask, config=config), ref, dtype)


def test_kernel_takes_strided_inputs_scale_and_a_mask_per_query(da):
    """q a transposed view (as the model's projections give it), k/v a window of a longer cache, a mask that
    differs per query and head, and an explicit scale."""
    g = torch.Generator().manual_seed(7)
    b, h, n_q, t, d = 2, 2, 3, 50, 32
    q = torch.randn(b, n_q, h, d, generator=g).transpose(1, 2).to(DEVICE)
    cache = torch.randn(2, b, h, 80, d, generator=g).to(DEVICE)
    k, v = cache[0][:, :, :t], cache[1][:, :, :t]
    mask = torch.rand(b, h, n_q, t, generator=g) > 0.5
    mask[..., 0] = True
    mask = mask.to(DEVICE)
    ref = _reference(q, k, v, mask, scale=0.3)
    _close(da.attention(q, k, v, mask, scale=0.3, config=da.DecodeAttentionConfig(16, 16)), ref, torch.float32)


def test_a_query_that_sees_nothing_gets_zeros(da):
    q, k, v, mask = _case(1, 2, 4, 40, 16, torch.float32, seed=3)
    mask = mask.clone()
    mask[:, :, 1] = False
    out = da.attention(q, k, v, mask, config=da.DecodeAttentionConfig(16, 16))
    assert torch.equal(out[:, :, 1].cpu(), torch.zeros_like(out[:, :, 1].cpu()))
    keep = [0, 2, 3]
    _close(out[:, :, keep], _reference(q, k, v, mask)[:, :, keep], torch.float32)


def test_fits_only_few_query_masked_half_calls(da):
    q, k, v, mask = _case(1, 2, 16, 40, 16, torch.bfloat16, seed=4)
    assert da.fits(q, k, v, mask)
    assert da.fits(q, k, v, mask[:, :, :1])  # broadcast over the queries
    assert not da.fits(q.float(), k.float(), v.float(), mask)  # float32: SDPA
    assert not da.fits(q, k, v, mask.float())  # an additive mask
    assert not da.fits(q, k, v, mask, dropout_p=0.1)
    assert not da.fits(q, k, v, mask, is_causal=True)
    assert not da.fits(q, k[:, :1], v[:, :1], mask)  # grouped heads not folded
    many = torch.randn(1, 2, da.MAX_QUERIES + 1, 16, dtype=torch.bfloat16, device=DEVICE)
    assert not da.fits(many, k, v, mask[:, :, :1])  # a prefill
    assert not da.fits(q[..., :12], k[..., :12], v[..., :12], mask)  # d not a power of two
    assert not da.fits(q, k, v, mask[:, :, :, :20])  # the mask does not cover the keys
    with torch.enable_grad():
        assert not da.fits(q.requires_grad_(), k, v, mask)


def test_mode_routes_decode_calls_and_leaves_the_rest(da, monkeypatch):
    calls = _counting(da, monkeypatch)
    q, k, v, mask = _case(1, 2, 16, 40, 16, torch.bfloat16, seed=5)
    with torch.inference_mode(), da.DecodeAttentionMode():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        kw = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, scale=0.2)
        causal = F.scaled_dot_product_attention(q, k[:, :, :16], v[:, :, :16], is_causal=True)
    assert calls == [q.shape, q.shape]  # the causal call (no mask) went to SDPA
    _close(out, _reference(q, k, v, mask), torch.bfloat16)
    _close(kw, _reference(q, k, v, mask, scale=0.2), torch.bfloat16)
    assert torch.equal(causal, F.scaled_dot_product_attention(q, k[:, :, :16], v[:, :, :16], is_causal=True))


def test_mode_traces_under_torch_compile(da):
    """torch.compile traces through the mode: the compiled graph calls the custom op (fullgraph: no break)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, mask = _case(1, 2, 4, 40, 16, torch.bfloat16, seed=6)

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().relu()

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch.inference_mode(), da.DecodeAttentionMode():
        out = torch.compile(f, fullgraph=True, backend=counter)(q, k, v, mask)
    targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert counter.frame_count == 1 and any("glmtune.decode_attention" in t for t in targets), targets
    _close(out, _reference(q, k, v, mask).relu(), torch.bfloat16)


def test_resolve_attention():
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu) == "sdpa"
    assert resolve_attention("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="attention must be"):
        resolve_attention("flash", cpu)


def _counting(da, monkeypatch) -> list:
    """The query shapes the kernel runs on, counted where the custom op's implementation launches it (torch.compile
    does not trace into it, so the count holds no state a compiled step would guard on and recompile for)."""
    calls: list = []
    launch = da.attention
    monkeypatch.setattr(da, "attention", lambda *a, **kw: calls.append(tuple(a[0].shape)) or launch(*a, **kw))
    return calls


def _tiny(name: str, dtype: torch.dtype, **changes):
    cfg = preset(name)
    m = build_model(cfg.replace(**changes) if changes else cfg)
    m.init_weights(seed=1)
    return m.to(DEVICE, dtype).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name,changes", [("tiny-chatglm3", {"pre_seq_len": 3, "prefix_projection": True}),
                                          ("tiny-chatglm", {})])  # fmt: skip
def test_decoding_through_the_kernel_gives_the_tokens_of_sdpa(da, monkeypatch, name, changes):
    """Two rows of different prompt lengths in float16 (GQA folded with a P-Tuning prefix in the first slots;
    v1: every head its own keys, 2-D positions, a bidirectional prompt), sampled with a seed: every decode step's
    attention runs the kernel, same tokens as SDPA."""
    calls = _counting(da, monkeypatch)
    m = _tiny(name, torch.float16, **changes)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 120, (n,), generator=g).tolist() for n in (7, 4)]
    if m.config.arch == "glm":  # v1 prompts end with [gMASK] <sop>
        prompts = [p + [m.config.gmask_token_id, m.config.bos_token_id] for p in prompts]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=2.0, seed=3)  # varied tokens
    ref = generate(m, prompts, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode="eager", attention="sdpa"))
    assert not calls
    decode = "graph" if CUDA else "eager"
    out = generate(m, prompts, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode=decode, attention="triton"))
    assert out == ref and len(set(ref[0])) > 1
    layers = m.config.num_layers
    assert len(calls) >= layers and len(calls) % layers == 0  # every layer of every step (the prefill: SDPA)


# ---- on the GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("b", [1, 8, 32])
@pytest.mark.parametrize("t", [129, 384, 1000])
def test_gpu_chatglm3_decode_shapes_match_float64(da, b, t):
    """ChatGLM3-6B's decode call: 2 KV heads with their 16 query heads folded, d 128, bf16."""
    q, k, v, mask = _case(b, 2, 16, t, 128, torch.bfloat16, seed=b + t, n_prefix=8, used=t - 3)
    ref = _reference(q, k, v, mask)
    _close(da.attention(q, k, v, mask), ref, torch.bfloat16)
    _close(da.attention(q, k, v, mask, config=da.DecodeAttentionConfig(programs=1)), ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("decode", ["graph", "compiled"])
def test_gpu_captured_decode_with_the_kernel_gives_the_eager_tokens(da, monkeypatch, decode):
    """The step captured as a CUDA graph (or compiled by inductor, then captured) with the kernel, bf16, a
    P-Tuning prefix: the tokens of the same step run op by op."""
    calls = _counting(da, monkeypatch)
    m = _tiny("tiny-chatglm3", torch.bfloat16, pre_seq_len=3, prefix_projection=True)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    cfg = GenerationConfig(max_new_tokens=10)
    eager = generate(m, prompts, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode="eager", attention="triton"))
    assert calls
    out = generate(m, prompts, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode=decode, attention="triton"))
    assert out == eager and len(set(eager[0])) > 1
