"""``KVRepeat.recompute``: what a compiled backward keeps of the K/V heads repeated for flash's varlen kernel (torch
< 2.13 takes no grouped heads). Without it the backward keeps the repeated copies; with it, the grouped heads, repeated
again in the backward (``attention.kv_for_flash``: the repeat checkpointed, so the partitioner recomputes it).

Flash needs CUDA, so on the CPU a stand-in takes varlen_attn's place: torch 2.11's signature over a custom op whose
autograd saves its inputs, as flash's does. The tests look at what the compiled forward hands its backward (the
``saved_tensors`` of its autograd node) and compare gradients. Tests marked ``gpu`` run the real kernel.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from torch import Tensor

from glmtune.models import attention, build_model
from glmtune.models.attention import (
    KVRepeat,
    attend,
    kv_for_flash,
    repeat_kv_heads,
    repeats_kv_for_flash,
    varlen_supported,
)
from glmtune.models.chatglm import SelfAttention, set_kv_repeat
from glmtune.models.config import preset
from glmtune.models.layout import SequenceLayout
from glmtune.models.masks import AttentionMask, build_mask, dense_from_runs

# the default partitioner (what the repository's compiled tests use), Inductor's min-cut one, Inductor itself
BACKENDS = ["aot_eager", "aot_eager_decomp_partition", pytest.param("inductor", marks=pytest.mark.slow)]


@functools.cache
def _stand_in():
    """A custom op attending causally within the runs of ``cu`` whose autograd saves q, k, v, out and lse (flash's
    way), and varlen_attn's torch 2.11 signature over it. The op's CPU code records the K/V it is given."""
    given: list[tuple[torch.Tensor, torch.Tensor]] = []

    def probs(q, k, cu):
        t = torch.arange(q.shape[0], device=q.device)
        run = torch.searchsorted(cu, t.to(cu.dtype), right=True)
        seen = (run[:, None] == run[None, :]) & (t[None, :] <= t[:, None])  # (query, key)
        scores = torch.einsum("thd,uhd->htu", q, k) * q.shape[-1] ** -0.5
        return scores.masked_fill(~seen, float("-inf"))

    @torch.library.custom_op("glmtune_test_kv_copy::attn", mutates_args=())
    def attn(q: Tensor, k: Tensor, v: Tensor, cu: Tensor) -> tuple[Tensor, Tensor]:
        given.append((k, v))  # kept alive: their storage is not reused, so a saved tensor on it is one of them
        scores = probs(q, k, cu)
        return torch.einsum("htu,uhd->thd", scores.softmax(-1), v).contiguous(), scores.logsumexp(-1)

    @attn.register_fake
    def _(q, k, v, cu):
        return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0])

    @torch.library.custom_op("glmtune_test_kv_copy::attn_backward", mutates_args=())
    def attn_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        p = (probs(q, k, cu) - lse[..., None]).exp()
        dp = torch.einsum("thd,uhd->htu", g, v)
        ds = p * (dp - (g * out).sum(-1).T[..., None]) * q.shape[-1] ** -0.5
        dq, dk = torch.einsum("htu,uhd->thd", ds, k), torch.einsum("htu,thd->uhd", ds, q)
        return dq.contiguous(), dk.contiguous(), torch.einsum("htu,thd->uhd", p, g).contiguous()

    @attn_backward.register_fake
    def _(g, q, k, v, out, lse, cu):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, cu = inputs
        ctx.save_for_backward(q, k, v, *output, cu)

    def backward(ctx, grad, _grad_lse):
        return *attn_backward(grad, *ctx.saved_tensors), None

    attn.register_autograd(backward, setup_context=setup_context)

    def varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1)):  # fmt: skip
        assert window_size == (-1, 0) and key.shape[1] == query.shape[1]  # causal; no GQA in 2.11
        return attn(query, key, value, cu_seq_q)[0]

    return varlen_211, given


@pytest.fixture
def flash_stand_in(monkeypatch):
    """varlen_attn replaced by the stand-in; returns the list of the K/V it is given."""
    import torch.nn.attention.varlen as varlen_module

    varlen, given = _stand_in()
    given.clear()
    monkeypatch.setattr(varlen_module, "varlen_attn", varlen)
    attention._varlen_signature.cache_clear()
    torch._dynamo.reset()
    yield given
    attention._varlen_signature.cache_clear()
    torch._dynamo.reset()
    given.clear()


def _mask(b: int, s: int) -> AttentionMask:
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [-1] * 3])[:b, :s]
    return build_mask(SequenceLayout(torch.zeros_like(seg), seg), backend="varlen", max_runs=b * s)


def _holds(saved: tuple[torch.Tensor, ...], tensors: list[torch.Tensor]) -> int:
    """How many of ``tensors`` share storage with a saved tensor."""
    storages = {t.untyped_storage().data_ptr() for t in saved}
    return sum(t.untyped_storage().data_ptr() in storages for t in tensors)


def _attention_step(b=2, s=12, h=8, n_kv=2, d=4, dtype=torch.float64):
    """x -> q, k, v projections -> _flash_varlen -> out, and its inputs (the weights requiring grad)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, 16, generator=g, dtype=dtype)
    wq, wkv = (torch.randn(16, n * d, generator=g, dtype=dtype).requires_grad_() for n in (h, 2 * n_kv))
    mask = _mask(b, s)
    table = torch.linspace(0.5, 1.5, s * d, dtype=dtype).view(s, 1, d)  # a fixed elementwise map, as rotary's

    def step(x, wq, wkv, kv_repeat):
        q = (x @ wq).view(b, s, h, d).transpose(1, 2)
        k, v = ((x @ wkv).view(b, s, 2 * n_kv, d) * table).transpose(1, 2).split(n_kv, dim=1)  # (b, n_kv, s, d)
        return attention._flash_varlen(q, k, v, mask, kv_repeat)

    return step, (x, wq, wkv), mask


def test_repeat_kv_heads_follows_the_grouping():
    """Head h = kv * g + j reads key head kv (SDPA's enable_gqa and flash's grouping): repeat_interleave's order."""
    t = torch.randn(10, 3, 5)
    out = repeat_kv_heads(t, 12)
    torch.testing.assert_close(out, t.repeat_interleave(4, dim=1), rtol=0, atol=0)
    assert out.is_contiguous() and out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    k, v = kv_for_flash(t, t + 1, 6, KVRepeat(recompute=True))  # eagerly the option is not applied: the same copies
    torch.testing.assert_close(v, (t + 1).repeat_interleave(2, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(k, t.repeat_interleave(2, dim=1), rtol=0, atol=0)


def test_the_stand_in_attends_like_the_dense_rule(flash_stand_in):
    """The stand-in (forward and its hand-written backward) against glmtune's dense mask through SDPA."""
    step, (x, wq, wkv), mask = _attention_step()
    b, s = x.shape[:2]
    dense = dense_from_runs(mask, b, s)
    grad = torch.randn(b, 8, s, 4, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    results = []
    table = torch.linspace(0.5, 1.5, s * 4, dtype=x.dtype).view(s, 1, 4)
    for run in (lambda: step(x, wq, wkv, KVRepeat()), lambda: _dense_step(x, wq, wkv, dense, table)):
        out = run()
        results.append([out, *torch.autograd.grad(out, (wq, wkv), grad)])
    assert len(flash_stand_in) == 1 and flash_stand_in[0][0].shape == (b * s, 8, 4)  # K/V repeated to 8 heads
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _dense_step(x, wq, wkv, mask, table, h=8, n_kv=2, d=4):
    b, s = x.shape[:2]
    q = (x @ wq).view(b, s, h, d).transpose(1, 2)
    k, v = ((x @ wkv).view(b, s, 2 * n_kv, d) * table).transpose(1, 2).split(n_kv, dim=1)
    return attend(q, k, v, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recomputed_copies_are_not_saved_for_the_backward(flash_stand_in, backend):
    """Compiled: by default the backward gets the repeated K/V the kernel got; ``recompute`` hands it neither, and
    saves 2 * T * (h - n_kv) * d fewer numbers (the grouped heads instead of the copies); the gradients agree with
    each other and with the eager step."""
    step, inputs, _ = _attention_step()
    b, s, h, n_kv, d = 2, 12, 8, 2, 4
    grad = torch.randn(b, h, s, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eager = step(*inputs, KVRepeat())
    want = [eager, *torch.autograd.grad(eager, inputs[1:], grad)]
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    numel = {}
    for recompute in (False, True):
        flash_stand_in.clear()
        out = compiled(*inputs, KVRepeat(recompute=recompute))
        saved = out.grad_fn.saved_tensors
        given = list(flash_stand_in[0])
        assert [t.shape for t in given] == [(b * s, h, d)] * 2
        assert _holds(saved, given) == (0 if recompute else 2), recompute
        numel[recompute] = sum(t.numel() for t in saved)
        got = [out, *torch.autograd.grad(out, inputs[1:], grad)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # the copies out; the grouped K/V (or the projection they come from) in
    assert numel[False] - numel[True] == 2 * b * s * (h - n_kv) * d


def test_the_switch_reaches_a_compiled_models_attention(flash_stand_in, monkeypatch):
    """set_kv_repeat on a tiny ChatGLM3 with compiled blocks (the stand-in as its varlen kernel on the CPU): with
    ``recompute`` no block's backward keeps a K/V copy, the blocks still compile to one graph without breaks, and the
    loss and the gradients are the same."""
    from glmtune.train.compile import compile_blocks

    # route the varlen form to the flash call on the CPU (it takes CUDA and half precision only)
    monkeypatch.setattr(attention, "_attend_varlen", attention._flash_varlen)
    seg = torch.tensor([[0] * 12 + [1] * 10 + [2] * 10, [0] * 24 + [-1] * 8])  # 5 runs (the default capacity 6)
    pos = torch.tensor([list(range(12)) + list(range(10)) * 2, list(range(24)) + [0] * 8])
    ids = torch.randint(10, 400, seg.shape, generator=torch.Generator().manual_seed(0))
    results = {}
    counters = torch._dynamo.utils.counters
    # fused: glmtune's repeat ops (they need Triton); on the CPU they run their torch reference, so this checks
    # the wiring and the saved tensors, not the kernels (tests/test_repeat_kv.py runs those under the interpreter)
    fused = [False, True] if importlib.util.find_spec("triton") else [False]
    for repeat in [KVRepeat(recompute=r, fused=f) for f in fused for r in (False, True)]:
        torch._dynamo.reset()
        counters.clear()
        flash_stand_in.clear()
        model = build_model(preset("tiny-chatglm3"))
        model.init_weights(seed=3, std=0.3)
        # every layer has grouped K/V heads
        assert set_kv_repeat(model, repeat) == model.config.num_layers
        compile_blocks(model, backend="aot_eager")
        model.set_attention_backend("varlen")
        saved: list[tuple[torch.Tensor, ...]] = []

        def keep(_module, _args, out, saved=saved):
            saved.append(out.grad_fn.saved_tensors)

        for block in model._blocks():
            block.register_forward_hook(keep)
        h = model.hidden_states(ids, position_ids=pos, segment_ids=seg)
        loss = (h * (seg >= 0)[..., None]).pow(2).mean()
        loss.backward()
        assert len(saved) == len(flash_stand_in) == model.config.num_layers
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, repeat
        for layer_saved, given in zip(saved, flash_stand_in, strict=True):
            assert _holds(layer_saved, list(given)) == (0 if repeat.recompute else 2), repeat
        results[repeat] = [loss.detach()] + [p.grad for p in model.parameters()]
    for key, result in results.items():
        for got, want in zip(result, results[KVRepeat()], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=str(key))


def test_set_kv_repeat_checks_its_value(monkeypatch):
    model = build_model(preset("tiny-chatglm3"))
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert attentions and all(m.kv_repeat == KVRepeat() for m in attentions)  # the default: saved, unfused
    with pytest.raises(TypeError, match="KVRepeat"):
        set_kv_repeat(model, "recomputed")
    with pytest.raises(TypeError, match="one of the two"):
        set_kv_repeat(model, KVRepeat(), fused=True)
    assert set_kv_repeat(model, KVRepeat(recompute=True)) == len(attentions)
    assert all(m.kv_repeat == KVRepeat(recompute=True) for m in attentions)
    set_kv_repeat(model, fused=False)  # fused= alone changes that field only: the recompute stays
    assert all(m.kv_repeat == KVRepeat(recompute=True) for m in attentions)
    # fused needs Triton: without it, a clear error and the setting unchanged
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
    )
    for args, kw in (((KVRepeat(fused=True),), {}), ((), {"fused": True})):
        with pytest.raises(ValueError, match="needs Triton"):
            set_kv_repeat(model, *args, **kw)
    assert all(m.kv_repeat == KVRepeat(recompute=True) for m in attentions)
    mha = build_model(preset("tiny-chatglm3").replace(multi_query_group_num=4))
    assert set_kv_repeat(mha, KVRepeat(recompute=True)) == 0  # no grouped heads: nothing is repeated


# ---- CUDA --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_supported("cuda"),
                    reason="needs CUDA with flash attention (sm80+)")  # fmt: skip
def test_recomputed_kv_repeat_trains_alike_in_less_memory_on_cuda():
    """A compiled bf16 ChatGLM3-shaped model (heads of 128, 2 KV groups, 4 layers) on packed rows through flash
    varlen: the loss and gradients with ``recompute`` equal those without (expand + reshape, and the fused repeat
    where Triton is), and with ``recompute`` the memory held at the forward's end is lower, by part of the copies
    (2 * T * (h - n_kv) * d bf16 per layer) where this torch repeats K/V heads. How much of them the partitioner
    drops depends on the graph's sizes: at this model's 17 % on an H200 (either repeat), at ChatGLM3-6B's about
    half (0.15 GiB on 4 ADGEN samples, bench/RESULTS.md)."""
    from glmtune.train.compile import compile_blocks

    dev = torch.device("cuda")
    cfg = preset("chatglm3-6b").replace(num_layers=4, hidden_size=1024, ffn_hidden_size=2048, num_attention_heads=8,
                                        padded_vocab_size=1024)  # fmt: skip
    b, s = 4, 512
    gen = torch.Generator().manual_seed(0)
    lengths = [[200, 180, 132], [512], [100] * 5 + [12], [300, 150, 62]]
    seg = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in lengths])
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    ids = torch.randint(10, 1000, (b, s), generator=gen)
    seg, pos, ids = seg.to(dev), pos.to(dev), ids.to(dev)
    proj = torch.randn(b, s, cfg.hidden_size, generator=gen).to(dev)
    results, held = {}, {}
    fused_too = [True] if importlib.util.find_spec("triton") is not None else []  # (compile_blocks' CUDA default)
    for recompute, fused in [(False, False), (True, False)] + [(False, True), (True, True)] * len(fused_too):
        torch._dynamo.reset()
        model = build_model(cfg)
        model.init_weights(seed=3)
        model = model.to(dev, torch.bfloat16)
        compile_blocks(model, kv_repeat=KVRepeat(recompute=recompute, fused=fused))
        assert model.attention_backend == "varlen"
        for _ in range(2):  # the first call compiles
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated(dev)
            h = model.hidden_states(ids, position_ids=pos, segment_ids=seg)
            loss = (h.float() * proj).mean()
            held[recompute, fused] = torch.cuda.memory_allocated(dev) - start
            loss.backward()
        # (hidden_states leaves the output layer out: its weight has no gradient)
        results[recompute, fused] = [loss.detach()] + [p.grad.float() for p in model.parameters() if p.grad is not None]
        del model, h, loss
    for key, result in results.items():
        for got, want in zip(result, results[False, False], strict=True):  # the loss, then every gradient
            # 1e-2, not tighter: the compiled graphs fuse (and round) the bf16 work around the repeat differently,
            # so one gradient's relative difference reached 1.5e-3 on an H200 (bf16's eps is 7.8e-3); the memory
            # check below is what tells them apart
            assert (got - want).norm() <= 1e-2 * want.norm(), key
    d, h_, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    copies = 2 * b * s * (h_ - n_kv) * d * 2 * cfg.num_layers  # bytes: the K/V copies less the grouped K/V
    if repeats_kv_for_flash(dev):
        for fused in [False] + fused_too:
            saved = (held[False, fused] - held[True, fused]) / copies  # 0.167 of the copies measured (H200)
            assert saved >= 0.12, f"fused={fused}: recompute kept {saved:.3f} of the copies less ({held}, {copies})"
    else:  # torch >= 2.13 hands flash the grouped heads: nothing is repeated, the option changes nothing
        assert abs(held[False, False] - held[True, False]) < 0.1 * copies, (held, copies)
