"""The Triton INT4/INT8 kernels (``models/quant_kernels.py``) against a float64 dequantize-and-multiply reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` while the module is imported, see the
``qk`` fixture); the interpreter's ``tl.dot`` mishandles bfloat16 operands (it multiplies their raw bits), so the
tensor-core path is checked there with float16 and float32 and with bfloat16 on the GPU. Tests marked ``gpu`` run the
compiled kernels, the ``QuantizedLinear`` dispatch and CUDA-graph decode of a quantized model.
"""

from __future__ import annotations

import pytest
import torch

from glmtune.models.quant import dequantize_weight, pack_int4
from triton_support import import_kernels

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
MODULE = "glmtune.models.quant_kernels"


@pytest.fixture(scope="module")
def qk():
    """The kernels module, compiled or interpreted (``triton_support``)."""
    return import_kernels(MODULE)


def _device() -> str:
    return "cuda" if CUDA else "cpu"


def _weight(n: int, k: int, bits: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored (q, scale) pair over the whole integer range, with a row of zeros (scale 0), rows at the extremes
    (+-7 / +-127 and the -8 / -128 a packed byte can hold) and random fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    values = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    values[0] = 0
    values[1, ::2], values[1, 1::2] = hi - 1, -(hi - 1)
    values[2] = lo
    scale = (torch.rand(n, generator=g) * 0.05 + 0.001).to(torch.float16)
    scale[0] = 0
    q = pack_int4(values) if bits == 4 else values
    return q.to(device), scale.to(device)


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None):
    w = dequantize_weight(q.cpu(), scale.cpu(), bits, torch.float64)
    y = x.detach().cpu().double() @ w.T
    return y if bias is None else y + bias.detach().cpu().double()


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.detach().cpu().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    # every element, not just the norm: an unwritten or misplaced output fails here
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol


# (path, dtype): the interpreter's tl.dot cannot take bfloat16, the GPU checks it
CASES = [("gemv", torch.float32), ("gemv", torch.bfloat16), ("dot", torch.float32), ("dot", torch.float16),
         ("dequant", torch.float32), ("dequant", torch.bfloat16)]  # fmt: skip


def _small_config(qk, path: str, m: int):
    """Blocks smaller than the input, so that every kernel loops, masks and tiles; the GPU tests run the defaults
    (the interpreter is slow at the matrix-vector kernel's reduction over large blocks)."""
    if path == "gemv":
        return qk.GemvConfig(block_m=1 if m == 1 else 2, block_n=16, block_k=16)
    return qk.DotConfig(block_m=16, block_n=16, block_k=16, group_m=2) if path == "dot" else None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("path", "dtype"), CASES)
def test_each_path_matches_float64(qk, bits, path, dtype):
    dev = _device()
    n, k = 37, 70  # odd output rows; INT4 stores 35 columns
    q, scale = _weight(n, k, bits, seed=bits, device=dev)
    g = torch.Generator().manual_seed(1)
    for m, bias in ((1, True), (3, False), (37, True)):  # 3, 37: not a multiple of any tile
        x = torch.randn(m, k, generator=g).to(dev, dtype)
        b = torch.randn(n, generator=g).to(dev, dtype) if bias else None
        ref = _reference(x, q, scale, bits, b)
        config = _small_config(qk, path, m)
        _close(qk.linear(x, q, scale, bits, b, path=path, config=config), ref, dtype)
        if CUDA:  # the default blocks (larger than these shapes: masked everywhere)
            _close(qk.linear(x, q, scale, bits, b, path=path), ref, dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_masks_the_edges_of_rows_and_blocks(qk, bits, dtype):
    """The matrix-vector kernel on rows of whole 32-bit words (136 columns) and not (70), blocks that cut the rows
    mid-way, over the whole integer range, a row of zeros, with and without bias, one and two rows of x; on the GPU
    also the tensor-core INT4 kernel (bf16 inputs, rows of whole words; elsewhere the same config takes the CUDA-core
    kernel), whose lanes must pair up words of the same rows at any block size."""
    dev = _device()
    g = torch.Generator().manual_seed(bits)
    configs = [qk.GemvConfig(1, 4, 8), qk.GemvConfig(2, 16, 16, num_warps=2)]
    if CUDA:
        configs += [qk.GemvConfig(1, bn, bk, nw, mma=True) for bn, bk, nw in
                    [(4, 16, 4), (16, 32, 2), (4, 128, 4), (32, 512, 8), (8, 1024, 4)]]  # fmt: skip
    for n, k in ((37, 136), (19, 70)):
        q, scale = _weight(n, k, bits, seed=n, device=dev)
        for m, bias in ((1, True), (2, False)):
            x = torch.randn(m, k, generator=g).to(dev, dtype)
            b = torch.randn(n, generator=g).to(dev, dtype) if bias else None
            ref = _reference(x, q, scale, bits, b)
            for config in configs:
                _close(qk.linear(x, q, scale, bits, b, path="gemv", config=config), ref, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_op_chooses_by_rows_and_keeps_leading_dims(qk, bits):
    dev = _device()
    n, k = 24, 48
    q, scale = _weight(n, k, bits, seed=3, device=dev)
    b = torch.randn(n).to(dev)
    for rows in (1, qk.GEMV_MAX_M + 1, qk.DOT_MAX_M + 1):
        x = torch.randn(rows, 1, k).to(dev)
        y = qk.int_linear(x, q, scale, bits, b)
        assert y.shape == (rows, 1, n)
        _close(y.reshape(rows, n), _reference(x.reshape(rows, k), q, scale, bits, b), torch.float32)
    odd = torch.randn(3, k + 1).to(dev, torch.bfloat16)[:, 1:]  # a view at an odd offset and row stride
    _close(qk.linear(odd, q, scale, bits, b, path="gemv"), _reference(odd, q, scale, bits, b), torch.bfloat16)
    w = qk.int_dequantize(q, scale, bits, torch.float32)
    assert torch.allclose(w.cpu().double(), dequantize_weight(q.cpu(), scale.cpu(), bits, torch.float64), rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_backward_gives_grad_times_weight(qk, bits):
    dev = _device()
    n, k = 19, 34
    q, scale = _weight(n, k, bits, seed=5, device=dev)
    x = torch.randn(2, 3, k).to(dev).requires_grad_()
    b = torch.randn(n).to(dev).requires_grad_()
    grad = torch.randn(2, 3, n).to(dev)
    (qk.int_linear(x, q, scale, bits, b) * grad).sum().backward()
    w = dequantize_weight(q.cpu(), scale.cpu(), bits, torch.float64)
    _close(x.grad, grad.cpu().double() @ w, torch.float32)
    _close(b.grad, grad.cpu().double().sum((0, 1)), torch.float32)
    frozen = torch.randn(n).to(dev)  # a frozen bias gets no gradient and costs nothing
    x.grad = None
    qk.int_linear(x, q, scale, bits, frozen).sum().backward()
    assert x.grad is not None and frozen.grad is None


def test_the_op_passes_opcheck_and_traces_under_compile(qk):
    dev = _device()
    q, scale = _weight(16, 32, 4, seed=7, device=dev)
    x = torch.randn(5, 32).to(dev).requires_grad_()
    b = torch.randn(16).to(dev)
    torch.library.opcheck(qk.int_linear, (x, q, scale, 4, b))
    torch.library.opcheck(qk.int_dequantize, (q, scale, 4, torch.float32))

    def f(inp):
        return qk.int_linear(inp, q, scale, 4, b).square().sum()

    eager = torch.autograd.grad(f(x), x)[0]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(torch.autograd.grad(compiled(x), x)[0], eager, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_bits_are_named(qk):
    dev = _device()
    q, scale = _weight(8, 16, 4, seed=0, device=dev)
    with pytest.raises(ValueError, match="input has 15 features; the INT4 weight \\(8, 8\\) takes 16"):
        qk.linear(torch.randn(2, 15).to(dev), q, scale, 4, None)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        qk.linear(torch.randn(2, 16).to(dev), q, scale, 3, None)
    with pytest.raises(ValueError, match="weight_scale must have shape \\(8,\\)"):
        qk.linear(torch.randn(2, 16).to(dev), q, scale[:4], 4, None)
    with pytest.raises(ValueError, match="unknown path"):
        qk.linear(torch.randn(2, 16).to(dev), q, scale, 4, None, path="fast")


# ---- GPU only -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("path", "m"), [("gemv", 1), ("gemv", 3), ("dot", 2), ("dot", 16), ("dequant", 17),
                                         ("dequant", 100)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2050, 4104])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_kernels_at_larger_shapes(qk, bits, path, m, dtype, k):
    """Several tiles, none full at the edges: 2,050 inputs (INT4 stores an odd 1,025 columns) and 4,104 (whole
    32-bit words, a partial last step: INT4 + bf16 also through the tensor-core kernel)."""
    n = 1031
    q, scale = _weight(n, k, bits, seed=m, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    ref = _reference(x, q, scale, bits, b)
    _close(qk.linear(x, q, scale, bits, b, path=path), ref, dtype)
    if path == "gemv":
        _close(qk.linear(x, q, scale, bits, b, path=path, config=qk.GemvConfig(1, 8, 1024, mma=True)), ref, dtype)


def _tiny_quantized(bits: int, dtype: torch.dtype):
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.models.quant import quantize_model_

    model = build_model(preset("tiny-chatglm2"))
    model.init_weights(seed=1)
    return quantize_model_(model.to(dtype), bits).eval()  # fp16 scales, biases in dtype (as a loaded folder)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_quantized_model_uses_the_kernels_and_decodes_in_a_cuda_graph(qk, bits, monkeypatch):
    """The model's QuantizedLinear layers take the kernels on CUDA (logits match the CPU reference path), and the
    decode step captured as a CUDA graph, or compiled then captured, gives the eager tokens."""
    from glmtune.generate import GenerationConfig, generate

    calls = []
    kernel = qk.linear
    monkeypatch.setattr(qk, "linear", lambda *a, **kw: calls.append(a[0].shape[0]) or kernel(*a, **kw))
    ids = torch.randint(5, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _tiny_quantized(bits, torch.float32)(ids).double()
        out = _tiny_quantized(bits, torch.float32).cuda()(ids.cuda()).double().cpu()
    assert calls and ((out - ref).norm() / ref.norm()).item() < 1e-4  # float32: kernels vs dequantize + matmul
    model = _tiny_quantized(bits, torch.bfloat16).cuda()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    cfg = GenerationConfig(max_new_tokens=10)
    calls.clear()
    eager = generate(model, prompts, cfg, stop_ids=[], pad_id=0, decode="eager")
    assert 2 in calls  # the decode steps (2 rows) went through the matrix-vector kernel
    assert generate(model, prompts, cfg, stop_ids=[], pad_id=0, decode="graph") == eager
    assert generate(model, prompts, cfg, stop_ids=[], pad_id=0, decode="compiled") == eager


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_inductor_compiles_forward_and_backward(qk):
    from glmtune.models.quant import QuantizedLinear

    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), 4).cuda()
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, 40, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(inp):
        return layer(inp).float().square().mean()

    eager = torch.autograd.grad(f(x), x)[0]
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(x), x)[0]
    assert ((got.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2


# ---- INT4 in tinygemm's layout (models/int4_pack.py): the dequantize pass and the op ------------------------------
TC_SHAPES = [(16, 256), (24, 96), (8, 13696), (40, 4160)]  # 2/4/8 inner k-tiles, groups of 32-256, K % 1024 != 0


@pytest.mark.parametrize(("n", "k"), TC_SHAPES)
def test_the_dequantize_pass_reads_the_tinygemm_layout(qk, n, k):
    from glmtune.models import int4_pack

    q, scale = _weight(n, k, 4, seed=k, device="cpu")
    packed = int4_pack.pack(q.to(_device()), int4_pack.tinygemm_params(n, k)[0])
    exact = dequantize_weight(q, scale, 4, torch.float32)
    assert torch.equal(qk.dequantize_tc(packed, scale.to(_device()), torch.float32).cpu(), exact)
    half = qk.dequantize_tc(packed, scale.to(_device()), torch.bfloat16).cpu().float()
    ulps = 1 if CUDA else 2  # one bfloat16 rounding of each value (the interpreter's cast truncates: 2 u)
    assert ((half - exact).abs() <= ulps * 2.0**-8 * exact.abs()).all()


def test_the_tinygemm_layout_op_routes_by_rows_and_has_a_backward(qk):
    """Up to TC_MAX_M rows tinygemm (the CPU op here), above dequantize + matmul; the gradient of x is grad @ W."""
    from glmtune.models import int4_pack

    n, k, dev = 24, 96, _device()
    q, scale = _weight(n, k, 4, seed=5, device=dev)
    inner_k_tiles, group = int4_pack.tinygemm_params(n, k)
    packed = int4_pack.pack(q, inner_k_tiles)
    sz = int4_pack.scales_and_zeros(scale, k, group)
    for m in (1, qk.TC_MAX_M, qk.TC_MAX_M + 1):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dev, torch.bfloat16)
        # bf16 scales (tinygemm) or the interpreter's truncating cast: within 2^-7 of the exact product's norm
        out, ref = qk.int4_tc_linear(x, packed, sz, scale, group).double().cpu(), _reference(x, q, scale, 4, None)
        assert ((out - ref).norm() / ref.norm()).item() < 2.0**-7, m
    x = torch.randn(2, 3, k, dtype=torch.float32, device=dev, requires_grad=True)
    bias = torch.randn(n, device=dev, requires_grad=True)
    y = qk.int4_tc_linear(x, packed, sz, scale, group, bias)
    assert y.shape == (2, 3, n)
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), g)
    w = dequantize_weight(q.cpu(), scale.cpu(), 4, torch.float64)
    assert torch.allclose(gx.double().cpu(), g.double().cpu() @ w, atol=1e-5)
    assert torch.allclose(gb.double().cpu(), g.double().cpu().sum((0, 1)), atol=1e-5)
