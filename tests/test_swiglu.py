"""The fused SwiGLU ops (``models/swiglu.py``) against float64 references, and ChatGLM's MLP switched to them.

Without a GPU the Triton kernels run in Triton's interpreter (``fused_forward``/``fused_backward`` take it for CPU
tensors; the ops send CPU tensors to the kernels while ``INTERPRETED`` is set, else to the torch reference). Tests
marked ``gpu`` run the compiled kernels on ChatGLM3-6B's shape and a compiled bf16 model.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
import torch.nn.functional as F

from glmtune.adapters import build_method
from glmtune.models import build_model
from glmtune.models.chatglm import MLP, use_fused_swiglu
from glmtune.models.config import preset
from triton_support import assert_rounded

triton = pytest.importorskip("triton")
from glmtune.models import swiglu as sw  # noqa: E402  (needs Triton)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the interpreter's numpy exp overflows (to inf, as the GPU's) for a < -88: the saturation the tests ask for
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
SATURATING = [-100.0, 100.0, -89.0, 89.0, -30.0, 30.0, -1.25, 0.0]  # sigmoid 0 / 1 in float32, near da's zero


def _inputs(lead: tuple[int, ...], f: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ag = [a | g] (*lead, 2F) with |a| up to ~12 and the saturating values at the start of a; grad (*lead, F)."""
    g = torch.Generator().manual_seed(seed)
    ag = torch.randn(*lead, 2 * f, generator=g) * 4
    k = min(f, len(SATURATING))
    ag[..., :k] = torch.tensor(SATURATING[:k])
    grad = torch.randn(*lead, f, generator=g)
    return ag.to(DEVICE, dtype), grad.to(DEVICE, dtype)


def _float64(ag: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(a) * g and its gradient with respect to ag, by autograd in float64 on the same (rounded) inputs."""
    x = ag.detach().cpu().double().requires_grad_()
    a, g = x.chunk(2, dim=-1)
    y = a * torch.sigmoid(a) * g
    (dx,) = torch.autograd.grad(y, x, grad.detach().cpu().double())
    return y.detach(), dx


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_rounded(out, ref, dtype, spread=1e-5)  # (the dtype's rounding of the float64 value)


# (leading shape, F, config): a partial last block, several blocks a row, leading dims of 1-3, an odd F
CASES = [((7,), 300, sw.SwigluConfig(128, 4)), ((2, 3), 45, sw.SwigluConfig(32, 1)),
         ((1, 2, 5), 129, sw.SwigluConfig(64, 2)), ((3,), 1100, None)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_match_float64(dtype):
    for i, (lead, f, config) in enumerate(CASES):
        ag, grad = _inputs(lead, f, dtype, seed=i)
        y_ref, dx_ref = _float64(ag, grad)
        y, dx = sw.fused_forward(ag, config), sw.fused_backward(ag, grad, config)
        assert y.dtype == dx.dtype == dtype and y.is_contiguous() and dx.is_contiguous()
        _close(y, y_ref, dtype)
        _close(dx, dx_ref, dtype)


def test_kernels_read_strided_rows_and_no_rows():
    wide, grad_wide = _inputs((2, 4), 80, torch.float32, seed=7)
    ag = wide[..., 8:-2]  # rows of 2F = 150 (F 75) inside rows of 160: a row stride the kernel must follow
    grad = grad_wide[..., :75]
    assert not ag.is_contiguous() and not grad.is_contiguous()
    y_ref, dx_ref = _float64(ag, grad)
    config = sw.SwigluConfig(32, 1)
    _close(sw.fused_forward(ag, config), y_ref, torch.float32)
    _close(sw.fused_backward(ag, grad, config), dx_ref, torch.float32)
    empty = torch.empty(0, 3, 10, device=DEVICE)
    assert sw.fused_forward(empty).shape == (0, 3, 5)
    assert sw.fused_backward(empty, empty[..., :5]).shape == (0, 3, 10)
    with pytest.raises(ValueError, match="even"):
        sw.fused_forward(torch.ones(2, 7, device=DEVICE))


def _hopper_ptx(kernel, pointers: int, ints: int) -> str:
    """``kernel`` compiled for sm_90 with bf16 pointers and the integer arguments divisible by 16, as a launch on
    ChatGLM3's shapes specializes them (no GPU needed: Triton's NVIDIA backend and its ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "*bf16" if i < pointers else "i32" for i, n in enumerate(names[: pointers + ints])}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(pointers + ints)}
    src = ASTSource(fn=kernel, signature={**signature, "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kernels_compile_for_hopper_with_16_byte_accesses():
    """Every load and store of both kernels is one 16-byte vector (8 bf16) per thread, with or without the column
    mask: what lets them stream at the memory's speed. Checked in the PTX, without a GPU."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    for kernel, pointers, ints in ((sw._forward_kernel, 2, 3), (sw._backward_kernel, 3, 4)):
        ptx = _hopper_ptx(kernel, pointers, ints)
        loads = re.findall(r"ld\.global\S*", ptx)
        stores = re.findall(r"st\.global\S*", ptx)
        assert loads and all(op.endswith(".v4.b32") for op in loads), loads
        assert stores and all(op.endswith(".v4.b32") for op in stores), stores
        assert len(loads) == pointers and len(stores) == pointers - 1  # a, g (, dy); out (or da, dg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_mlps_own_autograd(dtype):
    """The CPU path: bit for bit what autograd gives through ``F.silu(a) * g``, and close to float64."""
    ag, grad = _inputs((3, 5), 37, dtype, seed=3)
    x = ag.clone().requires_grad_()
    a, g = x.chunk(2, dim=-1)
    y = F.silu(a) * g
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(sw.reference(ag), y) and torch.equal(sw.reference_backward(ag, grad), dx)
    y_ref, dx_ref = _float64(ag, grad)
    if dtype == torch.float32:  # bf16 autograd rounds its intermediates: only the float32 path is this close
        _close(sw.reference(ag), y_ref, dtype)
        _close(sw.reference_backward(ag, grad), dx_ref, dtype)


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_op_and_its_gradient(monkeypatch, kernel):
    monkeypatch.setattr(sw, "INTERPRETED", kernel)
    ag, grad = _inputs((2, 3), 45, torch.float32, seed=11)
    x = ag.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sw.swiglu(x)
    assert len(saved) == 1 and saved[0] is x  # only ag is kept for the backward
    (dx,) = torch.autograd.grad(y, x, grad)
    y_ref, dx_ref = _float64(ag, grad)
    _close(y, y_ref, torch.float32)
    _close(dx, dx_ref, torch.float32)


@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_opcheck(monkeypatch, kernel):
    monkeypatch.setattr(sw, "INTERPRETED", kernel)
    ag, grad = _inputs((2, 3), 21, torch.float32, seed=12)
    torch.library.opcheck(sw.swiglu, (ag.clone().requires_grad_(),))
    torch.library.opcheck(sw.swiglu_backward, (ag, grad))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])  # C++: ~5 s
def test_op_under_torch_compile_is_one_node_each_way(backend):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def f(x, w):
        return sw.swiglu(x * w) * 2.0

    ag, grad = _inputs((2, 5), 24, torch.float32, seed=13)
    w = torch.rand(48) + 0.5
    want_x = ag.clone().requires_grad_()
    want = f(want_x, w)
    want.backward(grad)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep) if backend == "aot_eager" else backend,
                             fullgraph=True)  # fmt: skip
    x = ag.clone().requires_grad_()
    got = compiled(x, w)
    got.backward(grad)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x.grad, rtol=1e-6, atol=1e-6)
    if backend == "aot_eager":
        # the forward and backward graphs: the ops, not silu's pieces
        targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
        assert len(targets) == 2
        assert "glmtune.swiglu.default" in targets[0] and "glmtune.swiglu_backward.default" in targets[1]
        assert not any("silu" in t for t in targets[0] | targets[1])


# ---- the MLP switch in a tiny ChatGLM3 -----------------------------------------------------------------------------
def _tiny(method: str):
    model = build_model(preset("tiny-chatglm3"), dtype=torch.float32, generation="chatglm3")
    model.init_weights(seed=2, std=0.1)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "query_key_value,dense_4h_to_h"}
    build_method(method, lora if method == "lora" else {}).setup(model)
    with torch.no_grad():  # LoRA's B starts at zero: nonzero, so every factor gets a gradient through the MLPs
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "kernel"])
def test_tiny_chatglm3_with_fused_swiglu_gives_the_same_loss_and_gradients(monkeypatch, method, kernel):
    monkeypatch.setattr(sw, "INTERPRETED", kernel)
    calls = []
    forward, backward = sw.fused_forward, sw.fused_backward
    monkeypatch.setattr(sw, "fused_forward", lambda *a: calls.append("fwd") or forward(*a))
    monkeypatch.setattr(sw, "fused_backward", lambda *a: calls.append("bwd") or backward(*a))
    model = _tiny(method)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    layers = model.config.num_layers
    assert use_fused_swiglu(model) == layers
    assert all(m.fused_swiglu for m in model.modules() if isinstance(m, MLP))
    fused_loss, fused_grads = _loss_and_grads(model, ids)
    if kernel:  # the kernels ran both ways in every layer and agree to float32 rounding
        assert sorted(calls) == ["bwd"] * layers + ["fwd"] * layers
        torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    else:  # the CPU reference: PyTorch's own expressions, so bit for bit
        assert calls == []
        assert torch.equal(fused_loss, loss)
        assert all(torch.equal(fused_grads[n], g) for n, g in grads.items())
    model.eval()  # evaluation and generation keep PyTorch's expression (the numbers of a later `glmtune eval`)
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert calls == []
    model.train()
    assert use_fused_swiglu(model, on=False) == 0
    assert not any(m.fused_swiglu for m in model.modules() if isinstance(m, MLP))
    assert torch.equal(_loss_and_grads(model, ids)[0], loss)


def test_glm_v1_has_no_swiglu_to_switch():
    model = build_model(preset("tiny-chatglm"), dtype=torch.float32)  # GELU MLPs
    assert use_fused_swiglu(model) == 0
    assert not any(isinstance(m, MLP) for m in model.modules())


def test_tiny_chatglm3_compiled_with_fused_swiglu_equals_eager(monkeypatch):
    from glmtune.train import compile as train_compile

    monkeypatch.setattr(train_compile, "BACKEND", "aot_eager")
    model = _tiny("lora")
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    use_fused_swiglu(model)
    loss, grads = _loss_and_grads(model, ids)
    torch._dynamo.reset()
    train_compile.compile_blocks(model)  # on the CPU: the MLPs go (back) to PyTorch's SwiGLU unless asked
    assert not any(m.fused_swiglu for m in model.modules() if isinstance(m, MLP))
    torch._dynamo.reset()
    train_compile.compile_blocks(model, fused_swiglu=True)  # (the default on CUDA)
    assert all(m.fused_swiglu for m in model.modules() if isinstance(m, MLP))
    try:
        c_loss, c_grads = _loss_and_grads(model, ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


# ---- the micro-benchmark ---------------------------------------------------------------------------------------------
def test_swiglu_speed_runs_on_cpu(tmp_path):
    import swiglu_speed

    out = tmp_path / "swiglu.json"
    result = swiglu_speed.main(["--device", "cpu", "--rows", "16", "--ffn", "40", "--dtype", "fp32", "--iters", "2",
                                 "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) >= {"torch", "glmtune::swiglu"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["max_err"] < 1e-5 and r["max_grad_err"] < 1e-5


# ---- on the GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_chatglm3_shape_matches_float64(dtype):
    ag, grad = _inputs((512,), 13696, dtype, seed=20)  # 512 of ChatGLM3-6B's rows (all columns)
    y_ref, dx_ref = _float64(ag, grad)
    for config in sw.CANDIDATES:
        _close(sw.fused_forward(ag, config), y_ref, dtype)
        _close(sw.fused_backward(ag, grad, config), dx_ref, dtype)
    x = ag.clone().requires_grad_()
    y = sw.swiglu(x)  # the op: the kernels on CUDA
    y.backward(grad)
    _close(y, y_ref, dtype)
    _close(x.grad, dx_ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_ops_capture_in_a_cuda_graph():
    ag, grad = _inputs((64, 2), 1000, torch.bfloat16, seed=21)
    x = ag.clone().requires_grad_()
    sw.swiglu(x).backward(grad)  # compiled and warmed up before the capture
    want = x.grad.clone()
    x.grad = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = sw.swiglu(x)
        (dx,) = torch.autograd.grad(y, x, grad)
    x.data.copy_(ag * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    y_ref, dx_ref = _float64(ag * 0.5, grad)
    _close(y, y_ref, torch.bfloat16)
    _close(dx, dx_ref, torch.bfloat16)
    assert not torch.equal(dx, want)  # the replay read the new input


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_compiled_bf16_model_with_fused_swiglu_matches_without():
    from glmtune.train import compile as train_compile

    losses, grads = [], []
    for fused in (False, True):
        torch._dynamo.reset()
        model = _tiny("lora").to("cuda", torch.bfloat16)
        train_compile.compile_blocks(model, fused_swiglu=None if fused else False)  # (None: on, CUDA's default)
        assert all(m.fused_swiglu == fused for m in model.modules() if isinstance(m, MLP))
        ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
        loss, g = _loss_and_grads(model, ids)
        losses.append(loss.float())
        grads.append(g)
    torch._dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for name, g in grads[0].items():  # bf16 LoRA factors: agreement to a few bf16 roundings
        rel = (grads[1][name].float() - g.float()).norm() / g.float().norm()
        assert rel < 3e-2, (name, rel.item())
