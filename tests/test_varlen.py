"""The varlen form of the mask (flash attention over variable-length runs of packed causal rows): its cu_seqlens
describe exactly the one rule, with a fixed shape and no host sync; on CUDA, attention through it matches SDPA."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
import torch.nn.functional as F

from glmtune.models.attention import attend, varlen_supported
from glmtune.models.layout import SequenceLayout
from glmtune.models.masks import build_mask, packed_cu_seqlens, varlen_max_runs, visible

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

needs_flash = pytest.mark.skipif(not torch.cuda.is_available() or not varlen_supported("cuda"),
                                 reason="needs CUDA with flash attention (sm80+)")  # fmt: skip


def packed_rows(rng: random.Random, b: int, s: int, kind: str) -> torch.Tensor:
    """Segments (b, s) of packed rows, -1 = padding at the end of a row."""
    seg = torch.full((b, s), -1, dtype=torch.long)
    for i in range(b):
        if kind == "mixed" and i == b - 1:
            continue  # a row of only padding
        pos, j = 0, 0
        while pos < s:
            if kind == "one":  # one sample per row, then padding
                n = rng.randint(1, s)
            elif kind == "singles":  # 1-token samples
                n = 1
            else:
                n = rng.randint(1, max(1, s // 3))
            seg[i, pos : pos + n] = j
            pos, j = pos + n, j + 1
            if kind == "one" or (kind == "mixed" and rng.random() < 0.3):
                break
    return seg


def runs_visibility(cu: list[int], n: int) -> list[list[bool]]:
    """Python loops: query t sees key u when both lie in one run [cu[r], cu[r+1]) and u <= t."""
    out = [[False] * n for _ in range(n)]
    for lo, hi in zip(cu[:-1], cu[1:], strict=True):
        for t in range(lo, hi):
            for u in range(lo, t + 1):
                out[t][u] = True
    return out


@pytest.mark.parametrize("kind", ["mixed", "one", "singles"])
@pytest.mark.parametrize("seed", range(3))
def test_cu_seqlens_follow_the_rule(kind, seed):
    rng = random.Random(seed)
    b, s = 3, 12
    seg = packed_rows(rng, b, s, kind)
    n = b * s
    cu = packed_cu_seqlens(seg, max_runs=n)
    assert cu.dtype == torch.int32 and cu.shape == (n + 1,)  # the shape depends on (b, s, max_runs) only
    cu_list = cu.tolist()
    assert cu_list[0] == 0 and cu_list[-1] == n and cu_list == sorted(cu_list)
    seen = runs_visibility(cu_list, n)
    # the rule over the flattened tokens: tokens of different rows never see each other
    row = torch.arange(n) // s
    flat, order = seg.reshape(n), torch.arange(n) % s
    rule = visible(flat[:, None], order[:, None], flat[None, :], order[None, :], torch.zeros(n, dtype=torch.bool))
    rule &= row[:, None] == row[None, :]
    for t in range(n):
        if flat[t] >= 0:  # a real query sees exactly what the rule says
            assert seen[t] == rule[t].tolist(), (kind, t)
        else:  # a padding query sees padding of its own row only (its output is never read)
            assert all(flat[u] < 0 and row[u] == row[t] for u in range(n) if seen[t][u])


def test_cu_seqlens_padding_and_capacity():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert packed_cu_seqlens(seg, max_runs=5).tolist() == [0, 2, 5, 6, 12, 12]  # a zero-length run at the end
    assert packed_cu_seqlens(seg, max_runs=4).tolist() == [0, 2, 5, 6, 12]  # exactly full
    with pytest.raises(RuntimeError, match="max_runs"):  # never silently wrong (a device-side assert on CUDA)
        packed_cu_seqlens(seg, max_runs=3)
    assert varlen_max_runs(4, 1024) == 260


def test_cu_seqlens_compile_with_a_fixed_shape():
    """No data-dependent shape and no host read: the builder compiles as one graph."""
    fn = torch.compile(packed_cu_seqlens, backend="aot_eager", fullgraph=True, dynamic=False)
    rng = random.Random(0)
    for kind in ("mixed", "one", "singles"):
        seg = packed_rows(rng, 2, 16, kind)
        torch.testing.assert_close(fn(seg, 32), packed_cu_seqlens(seg, 32))


def test_build_mask_forms_under_the_varlen_backend():
    b, s = 2, 10
    pos = torch.zeros((b, s), dtype=torch.long)
    seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [-1] * 3])
    mask = build_mask(SequenceLayout(pos, seg), backend="varlen", max_runs=8)
    assert mask.cu_seqlens is not None and mask.max_len == s and not mask.causal
    assert mask.cu_seqlens.tolist() == [0, 4, 10, 17, 20, 20, 20, 20, 20]
    assert build_mask(SequenceLayout(pos), backend="varlen").causal  # nothing to mask: the fast path
    # v1 context and P-Tuning prefixes: the flex form
    assert build_mask(SequenceLayout(pos, seg, seg >= 0), backend="varlen").block is not None
    assert build_mask(SequenceLayout(pos, seg), n_prefix=2, backend="varlen").block is not None


@pytest.mark.parametrize("groups", [1, 4])
def test_varlen_mask_attends_like_the_dense_rule_on_the_cpu(groups):
    """Off CUDA (or in fp32) the varlen form runs as a dense mask: real tokens get the dense rule's attention."""
    layout, q, k, v = random_case(seed=1, b=3, s=14, h=4, groups=groups)
    out = attend(q, k, v, build_mask(layout, backend="varlen", max_runs=q.shape[0] * q.shape[2]))
    assert_real_tokens_close(out, attend(q, k, v, build_mask(layout)), layout)


def random_case(seed: int, b: int, s: int, h: int, groups: int) -> tuple[SequenceLayout, torch.Tensor, ...]:
    """A layout of random packed rows and q (b, h, s, 8), k, v (b, h // groups, s, 8)."""
    seg = packed_rows(random.Random(seed), b, s, "mixed")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, 8, generator=gen)
    k, v = (torch.randn(b, h // groups, s, 8, generator=gen) for _ in range(2))
    return SequenceLayout(torch.zeros((b, s), dtype=torch.long), seg), q, k, v


def assert_real_tokens_close(out: torch.Tensor, ref: torch.Tensor, layout: SequenceLayout) -> None:
    real = (layout.segments >= 0)[:, None, :, None].expand_as(out)  # padding outputs are never read
    torch.testing.assert_close(out[real], ref[real])


def _runs_attention(query, key, value, cu) -> torch.Tensor:
    """(T, H, D) tokens, causal attention within each run [cu[r], cu[r+1]) (SDPA, one run at a time)."""
    out = torch.zeros_like(query)
    cu = cu.tolist()
    for lo, hi in zip(cu[:-1], cu[1:], strict=True):
        if hi > lo:
            q, k, v = (t[lo:hi].transpose(0, 1) for t in (query, key, value))  # (H, L, D)
            out[lo:hi] = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1)
    return out


def fake_varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and key.shape[1] == query.shape[1]  # no GQA in torch 2.10's wrapper
    return _runs_attention(query, key, value, cu_seq_q)


def fake_varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):  # fmt: skip
    assert window_size == (-1, 0) and key.shape[1] == query.shape[1]
    return _runs_attention(query, key, value, cu_seq_q)


def fake_varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, num_splits=None):  # fmt: skip
    assert window_size == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
    return _runs_attention(query, key, value, cu_seq_q)


@pytest.mark.parametrize("fake", [fake_varlen_210, fake_varlen_211, fake_varlen_213])
@pytest.mark.parametrize("groups", [1, 4])
def test_varlen_call_follows_the_installed_signature(monkeypatch, fake, groups):
    """``varlen_attn``'s signature changed (2.10: is_causal; 2.11: window_size; 2.13: enable_gqa): the call adapts,
    repeating K/V heads where GQA is not accepted. A stand-in with each signature checks the call's arguments."""
    import torch.nn.attention.varlen as varlen_module

    from glmtune.models import attention

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape[1])  # key heads
        return fake(*args, **kwargs)

    spy.__signature__ = inspect.signature(fake)
    monkeypatch.setattr(varlen_module, "varlen_attn", spy)
    attention._varlen_signature.cache_clear()
    h = 4
    layout, q, k, v = random_case(seed=groups, b=2, s=12, h=h, groups=groups)
    try:
        out = attention._flash_varlen(q, k, v, build_mask(layout, backend="varlen", max_runs=24))
    finally:
        attention._varlen_signature.cache_clear()
    native_gqa = "enable_gqa" in inspect.signature(fake).parameters
    assert calls == [h // groups if native_gqa else h]  # K/V repeated only where GQA is not accepted
    assert_real_tokens_close(out, attend(q, k, v, build_mask(layout)), layout)


# ---- CUDA --------------------------------------------------------------------------------------------------------
def _adgen_like_rows(b: int, s: int, seed: int, short: bool = False) -> torch.Tensor:
    rng = random.Random(seed)
    seg = torch.full((b, s), -1, dtype=torch.long)
    for i in range(b):
        pos, j = 0, 0
        while True:
            n = rng.randint(1, 6) if short else rng.randint(70, 190)
            if pos + n > s - rng.randint(0, 40):
                break
            seg[i, pos : pos + n] = j
            pos, j = pos + n, j + 1
    return seg


@pytest.mark.gpu
@needs_flash
@pytest.mark.parametrize(("n_kv", "max_runs"), [(2, None), (32, None), (2, "all"), (2, "collator"),
                                                (32, "collator")])  # fmt: skip
def test_varlen_flash_matches_dense_sdpa_on_cuda(n_kv, max_runs):
    """bf16 forward and q/k/v gradients of flash varlen vs SDPA with the dense mask, both against an fp32
    reference; GQA (2 KV heads of 32); ``max_runs="all"``: b * s runs, most of them zero-length; "collator": the
    collator's runs and their bound (256 in rows of 512, padding cut to fit)."""
    from glmtune.models.masks import packed_runs

    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, s, h, d = 2, 512, 32, 128
    seg = _adgen_like_rows(b, s, seed=n_kv)
    seg[1, 300:] = -1  # a padding run longer than the bound
    cu, bound = packed_runs(seg) if max_runs == "collator" else (None, None)
    assert max_runs != "collator" or bound == 256
    seg = seg.to(dev)
    layout = SequenceLayout(torch.zeros((b, s), dtype=torch.long, device=dev), seg,
                            runs=None if cu is None else cu.to(dev), max_run=bound)  # fmt: skip
    runs = b * s if max_runs == "all" else None
    masks = {"varlen": build_mask(layout, backend="varlen", max_runs=runs), "dense": build_mask(layout)}
    base = [torch.randn(b, n, s, d, device=dev) for n in (h, n_kv, n_kv)]
    grad = torch.randn(b, h, s, d, device=dev) * (seg >= 0)[:, None, :, None]  # padding outputs are never read
    results = {}
    for name, dtype in (("varlen", torch.bfloat16), ("dense", torch.bfloat16), ("ref", torch.float32)):
        qkv = [t.to(dtype).requires_grad_() for t in base]
        out = attend(*qkv, masks["dense" if name == "ref" else name])
        out.backward(grad.to(dtype))
        results[name] = [(out * (seg >= 0)[:, None, :, None]).float()] + [t.grad.float() for t in qkv]
    for what, got, dense, ref in zip("o q k v".split(), results["varlen"], results["dense"], results["ref"],
                                     strict=True):  # fmt: skip
        assert torch.isfinite(got).all(), what
        err, dense_err = (got - ref).abs().max().item(), (dense - ref).abs().max().item()
        assert err <= 3 * dense_err + 1e-3, (what, err, dense_err)


@pytest.mark.gpu
@needs_flash
def test_varlen_mask_needs_no_host_sync_and_captures_in_a_cuda_graph():
    dev = torch.device("cuda")
    b, s, h, d = 2, 256, 8, 64
    seg = _adgen_like_rows(b, s, seed=0, short=True).to(dev)  # many short runs
    layout = SequenceLayout(torch.zeros((b, s), dtype=torch.long, device=dev), seg)
    q, k, v = (torch.randn(b, n, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for n in (h, 2, 2))
    ref = attend(q, k, v, build_mask(layout))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attend(q, k, v, build_mask(layout, backend="varlen", max_runs=b * s))
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    real = (seg >= 0)[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=2e-2, rtol=2e-2)
    # forward + backward captured (as train.cuda_graph captures the step), replayed on new rows in the same buffers.
    # The leaves are made and first used on the capture stream: a leaf first used on the default stream makes the
    # backward order the default stream after the capturing one, which a capture refuses (an H200 run said so).
    grad = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd() -> torch.Tensor:
            out = attend(q, k, v, build_mask(layout, backend="varlen", max_runs=b * s))
            out.backward(grad)
            return out

        fwd_bwd()  # warm-up off the capture
        for t in (q, k, v):
            t.grad.zero_()  # the captured backward accumulates into these
        with torch.cuda.graph(graph, stream=stream):
            captured = fwd_bwd()
    torch.cuda.current_stream().wait_stream(stream)
    for t in (q, k, v):
        t.grad.zero_()
    seg.copy_(_adgen_like_rows(b, s, seed=1, short=True).to(dev))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [captured.clone()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = [fwd_bwd().detach()] + [t.grad for t in (q, k, v)]  # eager on the new rows
    for got, want in zip(replayed, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    ref = attend(q, k, v, build_mask(layout))
    real = (seg >= 0)[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(replayed[0][real], ref[real], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_flash
def test_compiled_tiny_model_step_varlen_equals_flex_on_cuda():
    """A compiled tiny ChatGLM2 on packed rows in bf16: compile_blocks picks varlen; loss and gradients match flex."""
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.train.compile import compile_blocks

    dev = torch.device("cuda")
    seg = torch.tensor([[0] * 50 + [1] * 40 + [2] * 30 + [-1] * 8, [0] * 100 + [1] * 27 + [2]], device=dev)
    ids = torch.randint(10, 400, seg.shape, device=dev)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([50, 40, 30, 8], [100, 27, 1])]).to(dev)
    proj = torch.randn(*seg.shape, preset("tiny-chatglm2").hidden_size, device=dev)
    results = {}
    for backend in ("varlen", "flex"):
        model = build_model(preset("tiny-chatglm2"))
        model.init_weights(seed=3, std=0.3)
        model = model.to(dev, torch.bfloat16)
        compile_blocks(model)
        assert model.attention_backend == "varlen"
        model.set_attention_backend(backend)
        h = model.hidden_states(ids, position_ids=pos, segment_ids=seg)
        # a random projection of the real tokens' states (the mean square of RMS-normed states is ~1 whatever the
        # weights: its gradient was rounding noise, and the two backends' noise differed on an H200)
        loss = (h.float() * proj * (seg >= 0)[..., None]).sum() / (seg >= 0).sum()
        loss.backward()
        real = h.detach().float()[seg >= 0]
        results[backend] = (real, model._blocks()[0].self_attention.query_key_value.weight.grad.float())
    for got, want in zip(results["varlen"], results["flex"], strict=True):  # states, then gradients
        assert (got - want).norm() <= 0.05 * want.norm()


def test_the_collator_sizes_the_runs_to_the_batch():
    """Packed 1-D rows carry their runs (``cu_seqlens``) with a capacity fixed by the batch shape (or the next power
    of two for short samples); build_mask hands them to the varlen form as they are, and they are the runs of the
    default's device path."""
    from glmtune.data.collate import PackedRow, collate_packed
    from glmtune.models.masks import packed_runs, run_capacity
    from glmtune.templates import Encoded

    assert [run_capacity(n, 4, 1024) for n in (0, 1, 33, 68, 69, 129, 4096)] == [68] * 4 + [128, 256, 4096]
    assert run_capacity(3, 4, 187) == 16 and run_capacity(17, 4, 187) == 32
    rng = random.Random(0)
    rows = []
    for _ in range(3):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(2, 6))]
        rows.append(PackedRow([Encoded(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in lengths]))
    batch = collate_packed(rows, pad_id=0, pad_to=48)
    seg = batch["segment_ids"]
    n_runs = sum(len(r.examples) + 1 for r in rows)  # each sample, then the row's padding
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.shape == (run_capacity(n_runs, 3, 48) + 1,)
    assert torch.equal(cu, packed_cu_seqlens(seg, run_capacity(n_runs, 3, 48)))
    assert torch.equal(cu, packed_runs(seg)[0]) and batch["max_seqlen"] == 48  # (short rows: the bound is the width)
    assert torch.equal(cu[: n_runs + 1], torch.unique(cu)) and (cu[n_runs:] == seg.numel()).all()
    layout = SequenceLayout(batch["position_ids"], seg, runs=cu, max_run=batch["max_seqlen"])
    mask = build_mask(layout, backend="varlen")
    assert mask.cu_seqlens is cu and mask.max_len == 48
    assert build_mask(layout, backend="varlen", max_runs=100).cu_seqlens.shape == (101,)  # an explicit bound wins
    assert "cu_seqlens" not in collate_packed(rows, pad_id=0, positions="2d")  # v1 rows: the flex form


# (samples per row, their length range, row width, the collator's bound on the runs)
LEARN_CASES = {"short rows": ((3, 3), (3, 12), 40, 40), "tight bound": ((3, 1), (20, 120), 512, 128)}


@pytest.mark.parametrize("case", LEARN_CASES)
def test_a_tiny_model_learns_alike_through_the_collators_runs(case):
    """LMLoss on a collated packed batch with the "varlen" backend (on the CPU: its runs as a dense mask) gives the
    loss and gradients of the dense rule: the collator's runs are right, end to end; also in rows wider than twice
    their longest sample (the bound below the width, padding cut into runs)."""
    from glmtune.data.collate import PackedRow, collate_packed
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.templates import IGNORE_INDEX, Encoded
    from glmtune.train.step import MODEL_INPUTS, LMLoss

    per_row, (lo, hi), width, bound = LEARN_CASES[case]
    rng = random.Random(1)
    rows = []
    for n_samples in per_row:
        lengths = [rng.randint(lo, hi) for _ in range(n_samples)]
        rows.append(PackedRow([Encoded([rng.randint(10, 400) for _ in range(n)],
                                       [IGNORE_INDEX] + [rng.randint(10, 400) for _ in range(n - 1)])
                               for n in lengths]))  # fmt: skip
    batch = collate_packed(rows, pad_id=0, pad_to=width)
    assert batch["max_seqlen"] == bound and int(batch["cu_seqlens"].diff().max()) <= bound
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    model = build_model(preset("tiny-chatglm2"))
    model.init_weights(seed=0, std=0.05)
    net = LMLoss(model, chunk_tokens=16)
    out = {}
    for backend in ("sdpa", "varlen"):
        model.set_attention_backend(backend)
        model.zero_grad()
        loss = net(**inputs)
        loss.backward()
        out[backend] = (loss.detach(), model._blocks()[0].self_attention.query_key_value.weight.grad.clone())
    torch.testing.assert_close(out["varlen"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["varlen"][1], out["sdpa"][1], rtol=1e-5, atol=1e-6)
    n = 2 * width
    bad = dict(inputs, cu_seqlens=torch.tensor([0, n] + [n] * 15, dtype=torch.int32),  # one run over both rows
               max_seqlen=None)  # fmt: skip
    model.set_attention_backend("varlen")
    assert not torch.allclose(net(**bad), out["sdpa"][0])  # the runs do decide who sees whom


# ---- the bound on run lengths (flash's max_seqlen) ---------------------------------------------------------------
def test_run_bound_buckets():
    """The bound holds the longest sample, is a multiple of 128 (flash's query block) from few values (each is a
    compiled variant and a CUDA graph), and is the row width once it would be more than half of it."""
    from glmtune.models.masks import RUN_BLOCK, run_bound

    assert [run_bound(n, 1024) for n in (1, 128, 129, 200, 256, 257, 384, 385, 512, 513, 1024)] == [
        128, 128, 256, 256, 256, 384, 384, 512, 512, 1024, 1024]  # fmt: skip
    assert {run_bound(n, 1024) for n in range(1, 1025)} == {128, 256, 384, 512, 1024}
    assert [run_bound(n, 4096) for n in (700, 1000, 1100, 1600)] == [768, 1024, 1536, 2048]
    assert {run_bound(n, 187) for n in range(1, 188)} == {187}  # short rows: the width, as before
    for s in (100, 255, 256, 1000, 1024, 3000, 8192):
        for n in range(1, s + 1, 7):
            bound = run_bound(n, s)
            assert n <= bound <= s and (bound == s or (bound % RUN_BLOCK == 0 and 2 * bound <= s))
            assert bound == s or bound < 2 * max(n, RUN_BLOCK)  # never more than twice what the rows need


def test_collated_runs_fit_their_bound_and_follow_the_rule():
    """Rows of ADGEN-like samples with long padding (a half-empty row, a row of only padding): the collator's bound
    is that of the longest sample (not the row width), padding runs are cut to fit it, and the runs still give
    every real token exactly the rule's keys."""
    from glmtune.models.masks import packed_runs, run_bound

    b, s = 3, 512
    seg = _adgen_like_rows(b, s, seed=4)
    seg[1, 150:] = -1  # a long padding run
    seg[2] = -1  # a row of only padding
    cu, bound = packed_runs(seg)
    longest = max(int((seg[i] == j).sum()) for i in range(b) for j in range(int(seg[i].max()) + 1))
    assert 128 < longest <= bound == run_bound(longest, s) == 256
    lengths = cu.diff()
    assert int(lengths.max()) <= bound and int(lengths.min()) >= 0
    n = b * s
    cu_list = cu.tolist()
    assert cu_list[-1] == n and cu_list == sorted(cu_list)
    seen = runs_visibility(cu_list, n)
    flat, order, row = seg.reshape(n), torch.arange(n) % s, torch.arange(n) // s
    rule = visible(flat[:, None], order[:, None], flat[None, :], order[None, :], torch.zeros(n, dtype=torch.bool))
    rule &= row[:, None] == row[None, :]
    for t in range(n):
        if flat[t] >= 0:
            assert seen[t] == rule[t].tolist(), t
        else:  # padding sees padding of its own row only
            assert all(flat[u] < 0 and row[u] == row[t] for u in range(n) if seen[t][u])


def test_a_run_longer_than_the_bound_stops_the_step():
    """A bound below a run's length would leave that run's later queries unattended in flash: build_mask checks it
    on the device (an assert, a RuntimeError on the CPU), and a bound needs the runs it bounds."""
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.models.masks import packed_runs

    seg = torch.tensor([[0] * 200 + [1] * 56, [0] * 100 + [-1] * 156])
    cu, bound = packed_runs(seg)
    assert bound == 256 == seg.shape[1]  # the width: nothing to check
    seg = torch.cat([seg, torch.full((2, 256), -1)], dim=1)  # s = 512: bound 256 < s
    cu, bound = packed_runs(seg)
    assert bound == 256
    pos = torch.zeros(seg.shape, dtype=torch.long)
    ok = build_mask(SequenceLayout(pos, seg, runs=cu, max_run=bound), backend="varlen")
    assert ok.max_len == 256 and ok.cu_seqlens is cu
    with pytest.raises(RuntimeError, match="longer than"):
        build_mask(SequenceLayout(pos, seg, runs=cu, max_run=128), backend="varlen")
    model = build_model(preset("tiny-chatglm2"))
    with pytest.raises(ValueError, match="max_seqlen"):
        model.hidden_states(torch.zeros(seg.shape, dtype=torch.long), segment_ids=seg, max_seqlen=256)
