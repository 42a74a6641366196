"""INT4 in tinygemm's layout (``models/int4_pack.py``, ``QuantizedLinear.to_layout``, ``quant.use_inference_layout``):
the repack against a naive transcription of the CUDA packing kernel, the numerics through the CPU tinygemm op against
a float64 dequantize-and-multiply, THUDM's bytes written back bit for bit, a tiny model's logits in both layouts
(tests/test_quant_kernels.py checks the layout's Triton dequantize pass and op). Tests marked ``gpu`` check aten's
CUDA packing and kernel, and graph and compiled decode in the layout.

Tolerance of the tinygemm product (bfloat16): the kernel multiplies ``v * s_bf16`` (v the integer, s_bf16 the fp16
row scale rounded to bfloat16: relative error <= u = 2^-8) and rounds that product to bfloat16 (<= u again), adds in
float32 and rounds the output to bfloat16 (<= u of the output). So |y - y_ref| <= 2.01 u sum_k |v s x| + u |y_ref|
(+ float32 rounding), with y_ref the float64 product with THUDM's exact fp16 scale.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmtune.models import int4_pack
from glmtune.models.quant import QuantizedLinear, dequantize_weight, pack_int4, unpack_int4, use_inference_layout

CUDA = torch.cuda.is_available()
U = 2.0**-8  # bfloat16's unit roundoff
# (out, in): K not a multiple of 1024 (4,160: 4 inner k-tiles, groups of 64; 13,696 = ChatGLM3's dense_4h_to_h), of
# 128 (96: 2 inner k-tiles, groups of 32), and out not a multiple of 16 (the CPU op's tile; 24, 40)
SHAPES = [(16, 256), (24, 96), (8, 13696), (40, 4160)]


def _thudm_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM INT4 bytes and fp16 row scales over the whole range: a zero row (scale 0), a row of +7/-7, a row of -8
    (what a byte can hold), odd values, scales with many mantissa bits (their bfloat16 rounding shows)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    values[0] = 0
    values[1, ::2], values[1, 1::2] = 7, -7
    values[2] = -8
    values[3, ::3] = 7
    scale = (torch.rand(n, generator=g) * 0.05 + 0.001).to(torch.float16)
    scale[0] = 0
    return pack_int4(values), scale


def _naive_cuda_pack(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """ATen's ``matrix_to_m16n8k16_Bint4_layout`` (int4mm.cu, CUDA branch), transcribed loop for loop: uint8 (N, K/2)
    -> int32 (N/8, K/(16 inner_k_tiles), 32, inner_k_tiles/2)."""
    n, kb = u.shape
    k_outer = kb * 2 // (16 * inner_k_tiles)
    out = torch.zeros(n // 8, k_outer, 32, inner_k_tiles // 2, dtype=torch.int64)
    v = u.to(torch.int64)
    for n_tile in range(n // 8):
        for ko in range(k_outer):
            for t in range(32):
                for inner in range(0, inner_k_tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    base0 = (ko * inner_k_tiles + inner) * 16 // 2
                    ks = [base0 + t % 4, base0 + t % 4 + 4, base0 + 8 + t % 4, base0 + 8 + t % 4 + 4]
                    b = [int(v[n0, c]) for c in ks]
                    pack = ((b[3] & 0xF) << 28 | (b[2] & 0xF) << 24 | (b[1] & 0xF) << 20 | (b[0] & 0xF) << 16
                            | (b[3] & 0xF0) << 8 | (b[2] & 0xF0) << 4 | (b[1] & 0xF0) | (b[0] & 0xF0) >> 4)  # fmt: skip
                    out[n_tile, ko, t, inner // 2] = pack
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, the error bound of the module docstring)."""
    w = dequantize_weight(q, scale, 4, torch.float64)
    ref = x.double() @ w.T
    return ref, 2.01 * U * (x.double().abs() @ w.abs().T) + U * ref.abs() + 1e-6


def test_the_repack_is_the_cuda_kernel_layout_and_unpacks_bit_for_bit():
    for n, k in [(16, 256), (8, 96), (16, 192)]:
        q, _ = _thudm_weight(n, k, seed=n + k)
        inner_k_tiles, _ = int4_pack.tinygemm_params(n, k)
        packed = int4_pack.pack(q, inner_k_tiles)
        assert packed.dtype == torch.int32 and packed.shape == (n // 8, k // (16 * inner_k_tiles), 32,
                                                                inner_k_tiles // 2)  # fmt: skip
        assert torch.equal(packed, _naive_cuda_pack(int4_pack.to_unsigned(q), inner_k_tiles))
        for tiles in (2, 4, 8):
            if k % (16 * tiles) == 0:  # every tiling the kernel takes
                assert torch.equal(int4_pack.pack_reference(int4_pack.to_unsigned(q), tiles),
                                   _naive_cuda_pack(int4_pack.to_unsigned(q), tiles))  # fmt: skip
    for n, k in SHAPES:
        q, _ = _thudm_weight(n, k, seed=k)
        packed = int4_pack.pack(q, int4_pack.tinygemm_params(n, k)[0])
        assert torch.equal(int4_pack.unpack(packed), q)  # THUDM's bytes back, bit for bit
        assert torch.equal(int4_pack.signed_values(packed), unpack_int4(q))


def test_tinygemm_params_take_what_the_kernel_takes():
    assert int4_pack.tinygemm_params(4608, 4096) == (8, 256)
    assert int4_pack.tinygemm_params(4096, 13696) == (8, 128)  # 13,696 = 107 x 128
    assert int4_pack.tinygemm_params(24, 96) == (2, 32)
    assert int4_pack.tinygemm_params(12, 256) is None  # out not a multiple of 8
    assert int4_pack.tinygemm_params(16, 80) is None  # in not a multiple of 32
    sz = int4_pack.scales_and_zeros(torch.tensor([0.5, 3e-3], dtype=torch.float16), 64, 32)
    assert sz.shape == (2, 2, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 1], torch.zeros(2, 2)) and torch.equal(sz[0, :, 0], sz[1, :, 0])


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tinygemm_on_the_repacked_weight_matches_float64(n, k, dtype):
    """The signed-to-unsigned mapping (^ 0x88), zero 0 and the row scale in every group, through PyTorch's own CPU
    tinygemm op: within the bound of the module docstring, and further from the reference than that if a nibble,
    a scale or the zero were wrong (checked below by breaking them)."""
    q, scale = _thudm_weight(n, k, seed=n)
    inner_k_tiles, group = int4_pack.tinygemm_params(n, k)
    packed = int4_pack.pack(q, inner_k_tiles)
    sz = int4_pack.scales_and_zeros(scale, k, group)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref, bound = _bound(x, q, scale)
    y = int4_pack.linear_cpu(x, packed, sz, group, inner_k_tiles, None).double()
    assert y.shape == ref.shape and ((y - ref).abs() <= bound).all()
    assert _rel(y, ref) < 2 * U  # the bound is the worst case; the typical error is far below it
    assert torch.equal(y[:, 0], torch.zeros(5, dtype=torch.float64))  # the zero row
    wrong_zero = sz.clone()
    wrong_zero[..., 1] = sz[..., 0]  # zero = scale: every weight one step off
    wrong_bytes = int4_pack.pack_reference(q.view(torch.uint8), inner_k_tiles)  # signed nibbles taken as unsigned
    for bad_packed, bad_sz in ((packed, wrong_zero), (wrong_bytes, sz)):
        y_bad = int4_pack.linear_cpu(x, bad_packed, bad_sz, group, inner_k_tiles, None).double()
        assert _rel(y_bad, ref) > 20 * U


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def _layer(n: int, k: int, seed: int, bias: bool) -> QuantizedLinear:
    q, scale = _thudm_weight(n, k, seed)
    layer = QuantizedLinear(k, n, 4, bias=bias)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(scale)
    if bias:
        layer.bias.data.normal_(generator=torch.Generator().manual_seed(seed))
    return layer


def test_the_layer_in_tinygemm_layout_keeps_thudm_bytes_in_its_state_dict():
    layer = _layer(40, 4160, seed=1, bias=True)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(3, 4160)
    ref, bound = _bound(x, before["weight"], before["weight_scale"])
    ref, bound = ref + layer.bias.double(), bound + 1e-6
    assert layer.to_layout("tinygemm") and layer.layout == "tinygemm"
    assert layer.weight.dtype == torch.int32 and layer.weight.nbytes == before["weight"].nbytes  # replaced, same size
    with torch.no_grad():
        assert ((layer(x).double() - ref).abs() <= bound).all()
    after = layer.state_dict()
    assert set(after) == set(before)  # the scales-and-zeros stay out of checkpoints
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    assert torch.equal(layer.dequantized(), dequantize_weight(before["weight"], before["weight_scale"], 4,
                                                              torch.float32))  # fmt: skip
    other = _layer(40, 4160, seed=2, bias=True)
    layer.load_state_dict(other.state_dict())  # THUDM bytes into a repacked layer: repacked, still in its layout
    assert layer.layout == "tinygemm" and torch.equal(layer.state_dict()["weight"], other.weight)
    assert torch.equal(layer.scales_zeros[0, :, 0], other.weight_scale.to(torch.bfloat16))
    layer.to_layout("thudm")
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, other.weight)
    assert not hasattr(layer, "scales_zeros")


def test_layers_tinygemm_cannot_take_stay_in_thudm_layout():
    odd = QuantizedLinear(80, 16, 4)  # 80 inputs: not a multiple of 32
    int8 = QuantizedLinear(64, 16, 8)
    assert not odd.to_layout("tinygemm") and odd.layout == "thudm"
    model = torch.nn.Sequential(odd, int8, _layer(16, 256, seed=0, bias=False))
    assert use_inference_layout(model, "tinygemm") == 1
    assert [m.layout for m in model] == ["thudm", "thudm", "tinygemm"]
    assert use_inference_layout(model, "thudm") == 0
    assert all(m.layout == "thudm" for m in model)
    with pytest.raises(ValueError, match="unknown layout"):
        use_inference_layout(model, "gptq")


def _tiny_int4(tmp_path):
    """A THUDM-format INT4 tiny ChatGLM3 folder: int8 ``weight`` + fp16 ``weight_scale``, ``quantization_bit`` 4."""
    from glmtune.demo_data import corpus_lines
    from glmtune.models.checkpoint import save_weights
    from glmtune.pretrained import load_pretrained
    from glmtune.tiny import make_tiny_model_dir

    full = make_tiny_model_dir(tmp_path / "full", corpus_lines(seed=0), generation="chatglm3", vocab_size=600)
    quantized = load_pretrained(full, device="cpu", dtype="float32", quantize="int4").model.state_dict()
    out = tmp_path / "int4"
    shutil.copytree(full, out)
    (out / "model.safetensors").unlink()
    save_weights(quantized, out)
    config = json.loads((full / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    return out


def test_a_tiny_int4_model_gives_its_logits_in_either_layout_and_keeps_thudm_bytes(tmp_path):
    from glmtune.pretrained import load_pretrained

    folder = _tiny_int4(tmp_path)
    thudm = load_pretrained(folder, device="cpu", dtype="float32")
    packed = load_pretrained(folder, device="cpu", dtype="float32", int4_layout="tinygemm")
    layers = [m for m in packed.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * packed.config.num_layers and all(m.layout == "tinygemm" for m in layers)
    assert all(m.layout == "thudm" for m in thudm.model.modules() if isinstance(m, QuantizedLinear))
    ids = torch.randint(5, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = thudm.model(ids).double(), packed.model(ids).double()
    # the only difference: the row scales rounded to bfloat16 (<= 2^-8 relative) through the layers
    assert ((a - b).abs().max() / (a.max() - a.min())).item() < 0.02
    assert not torch.equal(a, b)  # the tinygemm op ran (its scales are bf16)
    saved = thudm.model.state_dict()
    for name, t in packed.model.state_dict().items():  # what a save writes: THUDM's bytes, bit for bit
        assert t.dtype == saved[name].dtype and torch.equal(t, saved[name]), name


# ---- GPU: aten's packing and kernel --------------------------------------------------------------------------------
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


@pytest.mark.parametrize(("n", "k"), [*SHAPES, (4608, 4096), (27392, 4096), (4096, 13696)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_aten_packing_is_the_reference_layout_and_its_kernel_matches_float64(n, k):
    q, scale = _thudm_weight(n, k, seed=n % 97)
    inner_k_tiles, group = int4_pack.tinygemm_params(n, k)
    packed = int4_pack.pack(q.cuda(), inner_k_tiles)  # aten._convert_weight_to_int4pack
    assert torch.equal(packed.cpu(), int4_pack.pack_reference(int4_pack.to_unsigned(q), inner_k_tiles))
    assert torch.equal(int4_pack.unpack(packed).cpu(), q)
    sz = int4_pack.scales_and_zeros(scale.cuda(), k, group)
    for m in (1, 3, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref, bound = _bound(x.float().cpu(), q, scale)
        y = torch.ops.aten._weight_int4pack_mm(x, packed, group, sz).double().cpu()
        assert ((y - ref).abs() <= bound).all(), (m, ((y - ref).abs() / bound).max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_a_model_in_tinygemm_layout_decodes_in_graphs_and_compiled():
    """Graph and compiled-then-captured decode of a tiny INT4 model in tinygemm's layout give its eager tokens, and
    its logits stay within the bf16-scale rounding of THUDM's layout."""
    from glmtune.generate import GenerationConfig, generate
    from glmtune.models import build_model
    from glmtune.models.config import preset
    from glmtune.models.quant import quantize_model_

    model = build_model(preset("tiny-chatglm3"))
    model.init_weights(seed=1)
    model = quantize_model_(model.to(torch.bfloat16), 4).eval().cuda()
    ids = torch.randint(5, 400, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = model(ids).double()
    assert use_inference_layout(model) == 4 * preset("tiny-chatglm3").num_layers
    with torch.no_grad():
        out = model(ids).double()
    assert ((out - ref).abs().max() / (ref.max() - ref.min())).item() < 0.03
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    cfg = GenerationConfig(max_new_tokens=10)
    for rows in (prompts, prompts[:1]):
        eager = generate(model, rows, cfg, stop_ids=[], pad_id=0, decode="eager")
        assert generate(model, rows, cfg, stop_ids=[], pad_id=0, decode="graph") == eager
        assert generate(model, rows, cfg, stop_ids=[], pad_id=0, decode="compiled") == eager
