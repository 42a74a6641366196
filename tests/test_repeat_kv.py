"""The repeat-K/V-heads ops (``models/repeat_kv.py``) against float64 references and autograd through ``expand`` +
``reshape`` (``attention.repeat_kv_heads``, what ``_flash_varlen`` runs without them).

Without a GPU the Triton kernels run in Triton's interpreter (``fused_forward``/``fused_backward`` take it for CPU
tensors; the ops send CPU tensors to the kernels while ``INTERPRETED`` is set, else to the torch reference). Tests
marked ``gpu`` run the compiled kernels on ChatGLM3-6B's shape (4096 tokens, 2 K/V heads of 128, 16 groups).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest
import torch

from glmtune.models.attention import repeat_kv_heads
from triton_support import assert_rounded

triton = pytest.importorskip("triton")
from glmtune.models import repeat_kv as rk  # noqa: E402  (needs Triton)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _repeat64(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The float64 copy, head by head: out[:, kv * groups + j] = x[:, kv]."""
    x = x.detach().cpu().double()
    return torch.stack([x[:, h // groups] for h in range(x.shape[1] * groups)], dim=1)


def _sum64(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The float64 group sums, head by head: dx[:, kv] = sum_j grad[:, kv * groups + j]."""
    grad = grad.detach().cpu().double()
    heads = grad.shape[1] // groups
    return torch.stack([sum(grad[:, kv * groups + j] for j in range(groups)) for kv in range(heads)], dim=1)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_rounded(out, ref, dtype, spread=1e-6)  # (the dtype's rounding of the float64 value)


# (tokens, K/V heads, head dim, groups, config): tokens not a multiple of the block (odd, prime, fewer than one
# block), a head dim that is not a power of two, one group, several K/V heads, the default config
CASES = [(37, 2, 16, 4, rk.RepeatKVConfig(16, 1)), (5, 3, 24, 2, rk.RepeatKVConfig(8, 2)),
         (64, 1, 8, 1, rk.RepeatKVConfig(32, 1)), (19, 2, 32, 16, None)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_float64(dtype):
    for i, (n, n_kv, d, groups, config) in enumerate(CASES):
        k, v = _randn(n, n_kv, d, dtype=dtype, seed=i), _randn(n, n_kv, d, dtype=dtype, seed=50 + i)
        dk, dv = (_randn(n, n_kv * groups, d, dtype=dtype, seed=s + i) for s in (100, 150))
        for xs, grads in (((k,), (dk,)), ((k, v), (dk, dv))):  # one tensor, and a pair in one launch
            outs, sums = rk.fused_forward(xs, groups, config), rk.fused_backward(grads, groups, config)
            assert len(outs) == len(sums) == len(xs)
            for x, out, grad, dx in zip(xs, outs, grads, sums, strict=True):
                assert out.dtype == dx.dtype == dtype and out.is_contiguous() and dx.is_contiguous()
                assert torch.equal(out.cpu().double(), _repeat64(x, groups))  # a copy: exact
                _close(dx, _sum64(grad, groups), dtype)


def test_kernel_sums_are_exact_in_float32():
    """Values on a 2^-8 grid below 2^8: every partial sum is exact in float32, so the kernel must give the float64
    sums exactly, and equal autograd's gradient through expand + reshape bit for bit."""
    n, n_kv, d, groups = 23, 2, 16, 16
    g = torch.Generator().manual_seed(3)
    grad = (torch.randint(-4096, 4096, (n, n_kv * groups, d), generator=g) / 256).to(DEVICE)
    (dx,) = rk.fused_backward((grad,), groups, rk.RepeatKVConfig(8, 1))
    assert torch.equal(dx.cpu().double(), _sum64(grad, groups))
    x = torch.zeros(n, n_kv, d, device=DEVICE, requires_grad=True)
    (want,) = torch.autograd.grad(repeat_kv_heads(x, n_kv * groups), x, grad)
    assert torch.equal(dx, want)


def test_kernels_read_strided_inputs():
    """K and V as views into a QKV projection's output (token stride 36 heads, head offsets), a gradient in another
    layout (heads outermost) and inputs whose last dimension is not contiguous (copied first)."""
    n, n_kv, d, groups = 21, 2, 16, 4
    config = rk.RepeatKVConfig(8, 1)
    qkv = _randn(n, (n_kv * groups + 2 * n_kv) * d, dtype=torch.float32, seed=7).view(n, -1, d)
    k, v = qkv[:, n_kv * groups : n_kv * groups + n_kv], qkv[:, n_kv * groups + n_kv :]
    assert not k.is_contiguous() and k.stride() == (qkv.stride(0), d, 1)
    grad = _randn(n_kv * groups, n, d, dtype=torch.float32, seed=8).transpose(0, 1)  # strides (d, n * d, 1)
    for_last = _randn(n, d, n_kv, dtype=torch.float32, seed=9).transpose(1, 2)  # last stride n_kv
    spread = _randn(n, n_kv, 2 * d, dtype=torch.float32, seed=11)[..., d:]  # head stride 2d
    for pair in ((k, v), (k, v.contiguous()), (for_last, spread)):  # pairs whose strides differ: each read by its own
        outs = rk.fused_forward(pair, groups, config)
        assert torch.equal(outs[0].cpu().double(), _repeat64(pair[0], groups))
        assert torch.equal(outs[1].cpu().double(), _repeat64(pair[1], groups))
    assert torch.equal(rk.fused_forward((for_last,), groups, config)[0].cpu().double(), _repeat64(for_last, groups))
    sums = rk.fused_backward((grad, grad.contiguous()), groups, config)
    _close(sums[0], _sum64(grad, groups), torch.float32)
    assert torch.equal(sums[0], sums[1])
    sums = rk.fused_backward((grad.contiguous(), grad), groups, config)
    _close(sums[0], _sum64(grad, groups), torch.float32)
    assert torch.equal(sums[0], sums[1])
    last = _randn(n, d, n_kv * groups, dtype=torch.float32, seed=10).transpose(1, 2)
    _close(rk.fused_backward((last,), groups, config)[0], _sum64(last, groups), torch.float32)


def test_kernels_take_no_tokens_and_reject_bad_shapes():
    empty = torch.empty(0, 2, 8, device=DEVICE)
    assert rk.fused_forward((empty, empty), 4)[1].shape == (0, 8, 8)
    assert rk.fused_backward((torch.empty(0, 8, 8, device=DEVICE),), 4)[0].shape == (0, 2, 8)
    x = torch.ones(3, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="whole number of groups"):
        rk.fused_backward((torch.ones(3, 6, 8, device=DEVICE),), 4)
    with pytest.raises(ValueError, match="must match"):
        rk.fused_forward((x, torch.ones(4, 2, 8, device=DEVICE)), 4)
    with pytest.raises(ValueError, match="must match"):
        rk.fused_forward((x, x.half()), 4)
    with pytest.raises(ValueError, match="tokens, heads, head dim"):
        rk.fused_forward((x[None],), 4)
    with pytest.raises(ValueError, match="groups >= 1"):
        rk.fused_forward((x,), 0)


def _hopper_asm(kernel, block: int, num_warps: int) -> dict:
    """``kernel`` compiled for sm_90 with bf16 pointers, ChatGLM3's head dim and groups, and the integer arguments
    divisible by 16 (but N), as a launch on its shapes specializes them (no GPU needed: Triton's NVIDIA backend)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "*bf16" if i < 4 else "i32" for i, n in enumerate(names[:9])}
    constexprs = {"G": 16, "D": 128, "BLOCK_N": block, "BLOCK_D": 128}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9) if i != 4}
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                    constexprs=constexprs, attrs=attrs)  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kernels_compile_for_hopper_with_16_byte_accesses():
    """Every load and store is one 16-byte vector (8 bf16) per thread, with the token mask in place, and the
    backward issues its 16 group loads as such (2 vectors a thread at 16 tokens x 128 on 4 warps): what lets the
    kernels stream at the memory's speed. Checked in the PTX, without a GPU."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    for kernel, loads_want, stores_want in ((rk._forward_kernel, 2, 32), (rk._backward_kernel, 32, 2)):
        ptx = _hopper_asm(kernel, rk.DEFAULT.block, rk.DEFAULT.num_warps)["ptx"]
        loads = Counter(re.sub(r"\.L[12]::\S+?(?=\.)", "", op) for op in re.findall(r"ld\.global\S*", ptx))
        stores = Counter(re.findall(r"st\.global\S*", ptx))
        assert loads == {"ld.global.v4.b32": loads_want}, loads
        assert stores == {"st.global.v4.b32": stores_want}, stores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_autograd_through_expand_and_reshape(dtype):
    """The CPU route: bit for bit what ``attention.repeat_kv_heads`` and its autograd give."""
    n, n_kv, d, groups = 9, 2, 8, 4
    x = _randn(n, n_kv, d, dtype=dtype, seed=4).requires_grad_()
    grad = _randn(n, n_kv * groups, d, dtype=dtype, seed=5)
    y = repeat_kv_heads(x, n_kv * groups)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(rk.reference(x.detach(), groups), y)
    assert torch.equal(rk.reference_backward(grad, groups), dx)
    _close(rk.reference_backward(grad, groups), _sum64(grad, groups), dtype)


def _kernel_route(monkeypatch, kernel: bool) -> list[str]:
    """Sends CPU tensors to the interpreted kernels (or not); returns the list the kernels' calls are logged to."""
    monkeypatch.setattr(rk, "INTERPRETED", kernel)
    calls: list[str] = []
    forward, backward = rk.fused_forward, rk.fused_backward
    monkeypatch.setattr(rk, "fused_forward", lambda xs, *a: calls.append(f"fwd{len(xs)}") or forward(xs, *a))
    monkeypatch.setattr(rk, "fused_backward", lambda gs, *a: calls.append(f"bwd{len(gs)}") or backward(gs, *a))
    return calls


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_ops_and_their_gradients_equal_autograd(monkeypatch, kernel):
    """Both ops give autograd's values and gradients through expand + reshape, exactly in float32 (a kernel's sum in
    order is autograd's here; the CPU route is its expressions), and save nothing for the backward."""
    calls = _kernel_route(monkeypatch, kernel)
    n, n_kv, d, groups = 13, 2, 8, 4
    k0, v0 = _randn(n, n_kv, d, dtype=torch.float32, seed=20), _randn(n, n_kv, d, dtype=torch.float32, seed=21)
    dk, dv = (_randn(n, n_kv * groups, d, dtype=torch.float32, seed=s) for s in (22, 23))
    k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
    want = (repeat_kv_heads(k, n_kv * groups), repeat_kv_heads(v, n_kv * groups))
    want_grads = torch.autograd.grad(want, (k, v), (dk, dv))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        single = rk.repeat_kv(k, groups)
        pair = rk.repeat_kv_pair(k, v, groups)
    assert saved == []
    assert torch.equal(single, want[0]) and torch.equal(pair[0], want[0]) and torch.equal(pair[1], want[1])
    (single_grad,) = torch.autograd.grad(single, k, dk)
    pair_grads = torch.autograd.grad(pair, (k, v), (dk, dv))
    assert torch.equal(single_grad, want_grads[0])
    assert torch.equal(pair_grads[0], want_grads[0]) and torch.equal(pair_grads[1], want_grads[1])
    assert calls == (["fwd1", "fwd2", "bwd1", "bwd2"] if kernel else [])
    (only_v,) = torch.autograd.grad(rk.repeat_kv_pair(k, v, groups)[1], v, dv)  # K's gradient is zeros
    assert torch.equal(only_v, want_grads[1])


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_opcheck(monkeypatch, kernel):
    monkeypatch.setattr(rk, "INTERPRETED", kernel)
    n, n_kv, d, groups = 6, 2, 8, 4
    k, v = _randn(n, n_kv, d, dtype=torch.float32, seed=30), _randn(n, n_kv, d, dtype=torch.float32, seed=31)
    dk, dv = (_randn(n, n_kv * groups, d, dtype=torch.float32, seed=s) for s in (32, 33))
    torch.library.opcheck(rk.repeat_kv, (k.clone().requires_grad_(), groups))
    torch.library.opcheck(rk.repeat_kv_pair, (k.clone().requires_grad_(), v.clone().requires_grad_(), groups))
    torch.library.opcheck(rk.repeat_kv_backward, (dk, groups))
    torch.library.opcheck(rk.repeat_kv_pair_backward, (dk, dv, groups))
    torch.library.opcheck(rk.repeat_kv, (k, 1))  # one group: a copy still, never the input itself


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # C++: ~5 s
def test_ops_under_torch_compile_are_one_node_each_way(backend):
    """Rotary-like work on each side of the pair, as in attention: compiled equals eager, and the forward and
    backward graphs hold the ops, not an expand's copy or a sum."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    groups = 4

    def f(k, v, w):
        kr, vr = rk.repeat_kv_pair(k * w, v, groups)
        return (kr * 2.0 + vr).sum(-1) + rk.repeat_kv(v, groups).sum(-1)

    n, n_kv, d = 11, 2, 8
    k0, v0 = _randn(n, n_kv, d, dtype=torch.float32, seed=40), _randn(n, n_kv, d, dtype=torch.float32, seed=41)
    w = torch.rand(d) + 0.5
    grad = _randn(n, n_kv * groups, dtype=torch.float32, seed=42)
    k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
    want = f(k, v, w)
    want.backward(grad)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep) if backend == "aot_eager" else backend,
                             fullgraph=True)  # fmt: skip
    ck, cv = k0.clone().requires_grad_(), v0.clone().requires_grad_()
    try:
        got = compiled(ck, cv, w)
        got.backward(grad)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ck.grad, k.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cv.grad, v.grad, rtol=1e-6, atol=1e-6)
    if backend == "aot_eager":
        targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
        assert len(targets) == 2
        assert {"glmtune.repeat_kv_pair.default", "glmtune.repeat_kv.default"} <= targets[0]
        assert {"glmtune.repeat_kv_pair_backward.default", "glmtune.repeat_kv_backward.default"} <= targets[1]
        assert not any("expand" in t for t in targets[0]), targets[0]
        assert not any("aten.sum" in t for t in targets[1]), targets[1]  # (the sum(-1)'s backward is an expand)


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_pair_inside_a_compiled_checkpoint_is_recomputed_in_the_backward(monkeypatch, kernel):
    """As ``attention.kv_for_flash`` calls it with ``KVRepeat(recompute=True, fused=True)``: the forward saves K and
    V (n_kv heads), not their copies, and the backward repeats them again before summing the gradients; the
    gradients equal eager's."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(rk, "INTERPRETED", kernel)
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def f(k, v):
        kr, vr = checkpoint(rk.repeat_kv_pair, k * 1.5, v, 4, use_reentrant=False, preserve_rng_state=False)
        return (kr * vr).sum()  # a stand-in for flash: saves both copies unless they are recomputed

    k0, v0 = _randn(5, 2, 8, dtype=torch.float32, seed=45), _randn(5, 2, 8, dtype=torch.float32, seed=46)
    k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
    want = torch.autograd.grad(f(k, v), (k, v))
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    try:
        got = torch.autograd.grad(compiled(k, v), (k, v))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    forward, backward = graphs
    saved = [tuple(n.meta["val"].shape) for n in forward.graph.output_node().args[0][1:]]
    assert saved == [(5, 2, 8), (5, 2, 8)], saved
    ops = [str(n.target) for n in backward.graph.nodes if n.op == "call_function" and "glmtune" in str(n.target)]
    assert ops == ["glmtune.repeat_kv_pair.default", "glmtune.repeat_kv_pair_backward.default"]


def test_ops_compile_once_for_any_token_count():
    torch._dynamo.reset()
    compiled = torch.compile(lambda k, v: rk.repeat_kv_pair(k, v, 4), backend="aot_eager", fullgraph=True,
                             dynamic=True)  # fmt: skip
    try:
        for n in (3, 8, 17):
            k, v = _randn(n, 2, 8, dtype=torch.float32, seed=n), _randn(n, 2, 8, dtype=torch.float32, seed=n + 1)
            got = compiled(k, v)
            assert torch.equal(got[0], rk.reference(k, 4)) and torch.equal(got[1], rk.reference(v, 4))
    finally:
        torch._dynamo.reset()


# ---- the micro-benchmark ---------------------------------------------------------------------------------------------
def test_repeat_kv_speed_runs_on_cpu(tmp_path):
    import repeat_kv_speed

    out = tmp_path / "repeat_kv.json"
    result = repeat_kv_speed.main(["--device", "cpu", "--tokens", "9", "--kv-heads", "2", "--head-dim", "8",
                                   "--groups", "4", "--dtype", "fp32", "--iters", "2", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) >= {"torch", "glmtune::repeat_kv_pair", "glmtune::repeat_kv x2"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["max_err"] == 0 and r["max_grad_err"] < 1e-5
    assert result["bytes"] == {"fwd": 2 * 4 * (9 * 2 * 8) * 5, "bwd": 2 * 4 * (9 * 2 * 8) * 5}


# ---- on the GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_chatglm3_shape_matches_float64(dtype):
    n, n_kv, d, groups = 4096, 2, 128, 16  # a packed 4 x 1024 step of ChatGLM3-6B
    k, v = _randn(n, n_kv, d, dtype=dtype, seed=60), _randn(n, n_kv, d, dtype=dtype, seed=61)
    dk, dv = (_randn(n, n_kv * groups, d, dtype=dtype, seed=s) for s in (62, 63))
    k_ref, v_ref, dk_ref, dv_ref = _repeat64(k, groups), _repeat64(v, groups), _sum64(dk, groups), _sum64(dv, groups)
    for config in rk.CANDIDATES:
        outs, sums = rk.fused_forward((k, v), groups, config), rk.fused_backward((dk, dv), groups, config)
        assert torch.equal(outs[0].double().cpu(), k_ref) and torch.equal(outs[1].double().cpu(), v_ref)
        _close(sums[0], dk_ref, dtype)
        _close(sums[1], dv_ref, dtype)
    kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()
    kr, vr = rk.repeat_kv_pair(kl, vl, groups)  # the op: the kernels on CUDA
    torch.autograd.backward((kr, vr), (dk, dv))
    assert torch.equal(kr.double().cpu(), k_ref) and torch.equal(vr.double().cpu(), v_ref)
    _close(kl.grad, dk_ref, dtype)
    _close(vl.grad, dv_ref, dtype)
    qkv = _randn(n, 36 * d, dtype=dtype, seed=64).view(n, 36, d)  # K, V read in place from a QKV output
    kr, vr = rk.repeat_kv_pair(qkv[:, 32:34], qkv[:, 34:], groups)
    assert torch.equal(kr.double().cpu(), _repeat64(qkv[:, 32:34], groups))
    assert torch.equal(vr.double().cpu(), _repeat64(qkv[:, 34:], groups))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_ops_capture_in_a_cuda_graph():
    n, n_kv, d, groups = 1000, 2, 128, 16
    k, v = _randn(n, n_kv, d, dtype=torch.bfloat16, seed=70), _randn(n, n_kv, d, dtype=torch.bfloat16, seed=71)
    dk, dv = (_randn(n, n_kv * groups, d, dtype=torch.bfloat16, seed=s) for s in (72, 73))
    kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()
    torch.autograd.grad(rk.repeat_kv_pair(kl, vl, groups), (kl, vl), (dk, dv))  # compiled and warmed up first
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        kr, vr = rk.repeat_kv_pair(kl, vl, groups)
        dkl, dvl = torch.autograd.grad((kr, vr), (kl, vl), (dk, dv))
    kl.data.copy_(k * 0.5)
    vl.data.copy_(v * 2)
    dk.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kr.double().cpu(), _repeat64(k * 0.5, groups))
    assert torch.equal(vr.double().cpu(), _repeat64(v * 2, groups))
    _close(dkl, _sum64(dk, groups), torch.bfloat16)  # the replay read the new gradient
    _close(dvl, _sum64(dv, groups), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_compiled_with_inductor_equals_eager():
    """The ops inside an Inductor-compiled function (rotary-like multiply before, a reduction after) on the real
    shape: the same values and gradients as eager expand + reshape."""
    n, n_kv, d, groups = 4096, 2, 128, 16
    k0, v0 = _randn(n, n_kv, d, dtype=torch.bfloat16, seed=80), _randn(n, n_kv, d, dtype=torch.bfloat16, seed=81)
    w = _randn(d, dtype=torch.bfloat16, seed=82)
    grad = _randn(n, n_kv * groups, d, dtype=torch.bfloat16, seed=83)

    def f(k, v, fused):
        if fused:
            kr, vr = rk.repeat_kv_pair(k * w, v, groups)
        else:
            kr, vr = repeat_kv_heads(k * w, n_kv * groups), repeat_kv_heads(v, n_kv * groups)
        return kr * vr

    results = {}
    for fused, compiled in ((False, True), (True, True), (True, False)):
        torch._dynamo.reset()
        k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
        out = (torch.compile(f, fullgraph=True) if compiled else f)(k, v, fused)
        out.backward(grad)
        results[fused, compiled] = (out, k.grad, v.grad)
    torch._dynamo.reset()
    # with the ops, compiled = eager: k * w and the output gradient are bf16 tensors at the ops' boundary either way
    for a, b in zip(results[True, True], results[True, False], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    # without them Inductor fuses k * w and the gradient products into its copy and its sum in float32 (no bf16
    # rounding in between: a few of the 1M gradient sums of 16 products differ by several bf16 steps, measured on an
    # H200): the same numbers to ~1e-2 of the norm
    for a, b in zip(results[True, True], results[False, True], strict=True):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()
