"""The Triton matrix-vector kernel for one-row half-precision linears (``models/gemv.py``) against a float64
reference, the mode that routes ``F.linear`` to it, and decoding with it (``generate``'s ``matvec="triton"``).

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` while the module is imported, see the
``gv`` fixture); tests marked ``gpu`` run the compiled kernel on ChatGLM3-6B's shapes and a captured decode step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtune.generate import Decoder, GenerationConfig, generate, resolve_matvec
from glmtune.models import build_model
from glmtune.models.config import preset
from triton_support import import_kernels

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def gv():
    """models.gemv, compiled or interpreted (``triton_support``)."""
    return import_kernels("glmtune.models.gemv")


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    dev = DEVICE
    return x.to(dev), w.to(dev), None if b is None else b.to(dev)


def _reference(x, w, b):
    y = x.detach().cpu().double() @ w.detach().cpu().double().T
    return y if b is None else y + b.detach().cpu().double()


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out = out.detach().cpu().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    # every element (an unwritten or misplaced output fails here); the output's own rounding: 2^-8 relative
    assert ((out - ref).abs() <= 1e-2 * ref.abs().max() + 2**-7 * ref.abs()).all()


# (out, in): a partial last block of rows and a tail of inputs shorter than a step; whole steps only
SHAPES = [(37, 1100), (8, 1024)]


def test_kernel_matches_float64_for_every_candidate(gv):
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _inputs(n, k, torch.bfloat16, seed=i)
        ref = _reference(x, w, b)
        for config in gv.CANDIDATES:
            _close(gv.matvec(x, w, b, config=config), ref)


def test_kernel_in_float16_and_without_bias(gv):
    for i, (n, k) in enumerate(SHAPES):
        x, w, _ = _inputs(n, k, torch.float16, seed=10 + i, bias=False)
        _close(gv.matvec(x, w), _reference(x, w, None))


def test_matvec_keeps_leading_dims_and_rejects_several_rows(gv):
    x, w, b = _inputs(16, 64, torch.float16, seed=3)
    assert gv.matvec(x.reshape(64), w, b).shape == (16,)
    assert gv.matvec(x.reshape(1, 64), w).shape == (1, 16)
    with pytest.raises(ValueError, match="one row"):
        gv.matvec(x.reshape(1, 64).expand(2, 64), w)
    with pytest.raises(ValueError, match="one row"):
        gv.matvec(x, w[:, :32])


def test_fits_only_one_row_plain_half_products(gv, monkeypatch):
    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 64)
    x, w, b = _inputs(16, 64, torch.bfloat16, seed=4)
    assert gv.fits(x, w, b) and gv.fits(x, w) and gv.fits(x.reshape(64), w)
    assert not gv.fits(x.expand(1, 2, 64), w)  # two rows
    assert not gv.fits(x.float(), w.float())  # float32: F.linear
    assert not gv.fits(x, w.half())  # mixed dtypes
    assert not gv.fits(x, w.T.contiguous().T)  # rows not contiguous
    assert not gv.fits(x, w, b.float())
    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 2048)
    assert not gv.fits(x, w)  # too small: launch-bound either way
    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 64)
    with torch.enable_grad():
        assert not gv.fits(x.requires_grad_(), w)  # training: F.linear and its backward


def _counting(gv, monkeypatch) -> list:
    """The weight shapes the kernel runs on, counted where the custom op's implementation launches it (torch.compile
    does not trace into it, so the count holds no state a compiled step would guard on and recompile for)."""
    calls: list = []
    launch = gv.matvec
    monkeypatch.setattr(gv, "matvec", lambda x, w, b=None, config=None: calls.append(tuple(w.shape)) or launch(
        x, w, b, config))  # fmt: skip
    return calls


def test_mode_routes_one_row_linears_and_leaves_the_rest(gv, monkeypatch):
    from glmtune.adapters.lora import LoraLinear

    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 1024)
    calls = _counting(gv, monkeypatch)
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 48, bias=True).to(DEVICE, torch.float16)
    lora = LoraLinear(base, rank=4, alpha=8)  # float32 factors: not routed
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(1, 1, 96, device=DEVICE).half()
    with torch.inference_mode():
        ref_base = _reference(x, base.weight, base.bias)
        ref = ref_base + lora.scaling * (x.cpu().double() @ lora.lora_A.weight.cpu().double().T) @ (
            lora.lora_B.weight.cpu().double().T
        )
        with gv.MatvecMode():
            out_base = base(x)
            out = lora(x)
            two = torch.randn(1, 2, 96, device=DEVICE).half()
            out_two = base(two)
        assert calls == [(48, 96), (48, 96)]  # the base layer twice; the LoRA factors and two rows went to F.linear
        _close(out_base, ref_base)
        _close(out, ref)
        assert torch.equal(out_two, F.linear(two, base.weight, base.bias))


def test_mode_traces_under_torch_compile(gv, monkeypatch):
    """torch.compile traces through the mode: the compiled graph calls the custom op (fullgraph: no break)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 1024)
    x, w, b = _inputs(48, 96, torch.float16, seed=5)

    def f(x):
        return F.linear(x, w, b).float().relu()

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch.inference_mode(), gv.MatvecMode():
        out = torch.compile(f, fullgraph=True, backend=counter)(x)
    targets = [str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert counter.frame_count == 1 and any("glmtune.gemv" in t for t in targets), targets
    _close(out, _reference(x, w, b).relu())


def test_resolve_matvec():
    cpu = torch.device("cpu")
    assert resolve_matvec("auto", cpu, "eager") == "torch"
    assert resolve_matvec("triton", cpu, "eager") == "triton"
    assert resolve_matvec("inductor", cpu, "compiled") == "inductor"
    with pytest.raises(ValueError, match="compiled"):
        resolve_matvec("inductor", cpu, "graph")
    with pytest.raises(ValueError, match="matvec must be"):
        resolve_matvec("cublas", cpu, "graph")


@pytest.mark.slow
def test_decoding_with_the_kernel_gives_the_tokens_of_f_linear(gv, monkeypatch):
    """Batch 1 in float16: the decode steps' linears (output layer included) run the kernel, same tokens."""
    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 4096)
    if not CUDA:  # the untuned blocks: fewer, larger programs for the interpreter
        monkeypatch.setattr(gv, "DEFAULT", gv.MatvecConfig(64, 64))
    calls = _counting(gv, monkeypatch)
    m = build_model(preset("tiny-chatglm3"))
    m.init_weights(seed=1)
    m = m.to(DEVICE, torch.float16).eval()
    prompt = [torch.randint(5, 200, (6,), generator=torch.Generator().manual_seed(2)).tolist()]
    cfg = GenerationConfig(max_new_tokens=6)
    ref = generate(m, prompt, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode="eager", matvec="torch"))
    assert not calls
    decode = "graph" if CUDA else "eager"
    out = generate(m, prompt, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode=decode, matvec="triton"))
    assert calls and out == ref and len(set(ref[0])) > 1
    linears = {tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    assert set(calls) == {s for s in linears if s[0] * s[1] >= 4096}


# ---- on the GPU ----------------------------------------------------------------------------------------------------
CHATGLM3 = [(4608, 4096, True), (4096, 4096, False), (27392, 4096, False), (4096, 13696, False), (65024, 4096, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k,bias", CHATGLM3)
def test_gpu_chatglm3_shapes_match_float64(gv, n, k, bias):
    x, w, b = _inputs(n, k, torch.bfloat16, seed=n + k, bias=bias)
    ref = _reference(x, w, b)
    _close(gv.matvec(x, w, b), ref)  # the tuned configuration
    for config in gv.CANDIDATES:
        _close(gv.matvec(x, w, b, config=config), ref)


def _tiny_bf16_decode(gv, monkeypatch, decode: str) -> tuple[list, list]:
    """Batch-1 tokens of a tiny bfloat16 model decoded op by op and with ``decode``, both with the kernel."""
    monkeypatch.setattr(gv, "MIN_WEIGHT_ELEMENTS", 4096)
    calls = _counting(gv, monkeypatch)
    m = build_model(preset("tiny-chatglm3"))
    m.init_weights(seed=1)
    m = m.to("cuda", torch.bfloat16).eval()
    prompt = [[5, 6, 7, 8, 9, 10]]
    cfg = GenerationConfig(max_new_tokens=10)
    eager = generate(m, prompt, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode="eager", matvec="triton"))
    assert calls
    return eager, generate(m, prompt, cfg, stop_ids=[], pad_id=0, decoder=Decoder(m, decode=decode, matvec="triton"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("decode", ["graph", "compiled"])
def test_gpu_captured_decode_with_the_kernel_gives_the_eager_tokens(gv, monkeypatch, decode):
    """The step captured as a CUDA graph (or compiled by inductor, then captured) with the kernel."""
    eager, out = _tiny_bf16_decode(gv, monkeypatch, decode)
    assert out == eager and len(set(eager[0])) > 1
