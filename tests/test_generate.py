import pytest
import torch

from glmtune.generate import GenerationConfig, filter_top_k_top_p, generate, generate_stream, left_pad
from glmtune.models import build_model
from glmtune.models.config import preset


@pytest.fixture(scope="module", params=["tiny-chatglm2", "tiny-glm4", "tiny-chatglm"])
def model(request):
    cfg = preset(request.param)
    torch.manual_seed(0)
    m = build_model(cfg)
    # A tiny random v1 model (tied embeddings, DeepNorm residual) just repeats its last token at std 0.02.
    m.init_weights(seed=1, std=0.3 if cfg.arch == "glm" else 0.02)
    return m.eval()


def _prompts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.padded_vocab_size
    prompts = [torch.randint(5, vocab - 20, (n,), generator=g).tolist() for n in (7, 3, 11)]
    if model.config.arch == "glm":  # v1 prompts end with [gMASK] <sop>
        gmask, sop = _v1_ids(model)
        prompts = [p + [gmask, sop] for p in prompts]
    return prompts


def _v1_ids(model):
    return model.config.gmask_token_id, model.config.bos_token_id


def _stop_pad(model):
    v = model.config.padded_vocab_size
    return [v - 1], 0


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []], 0)


@pytest.mark.parametrize("sample", [False, True])
def test_batch_equals_one_by_one(model, sample):
    _, pad = _stop_pad(model)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=sample, temperature=0.9, top_p=0.8, top_k=50, seed=123,
                           repetition_penalty=1.1)  # fmt: skip
    prompts = _prompts(model)
    stop = []  # no stop token: every row runs the full length
    batched = generate(model, prompts, cfg, stop_ids=stop, pad_id=pad)
    alone = [generate(model, [p], cfg, stop_ids=stop, pad_id=pad)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 8 for o in batched)


def test_greedy_matches_full_forward_argmax(model):
    """Greedy decoding with the KV cache picks, at each step, the argmax of a full forward over the sequence."""
    stop, pad = _stop_pad(model)
    prompt = _prompts(model)[0]
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=6), stop_ids=stop, pad_id=pad)[0]
    seq = list(prompt)
    for t in out:
        ids = torch.tensor([seq])
        pos = model.prompt_position_ids(ids, torch.ones_like(ids)) if model.config.arch == "chatglm" else None
        if model.config.arch == "glm":
            # v1: generated tokens keep the mask position and advance the block position
            pos = model.prompt_position_ids(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
            extra = pos[..., -1:].repeat(1, 1, len(seq) - len(prompt))
            extra[:, 1] += torch.arange(1, len(seq) - len(prompt) + 1)
            pos = torch.cat([pos, extra], dim=-1)
        with torch.no_grad():
            logits = model(ids, position_ids=pos)
        assert int(logits[0, -1].argmax()) == t
        seq.append(t)


def test_stop_tokens_end_rows_independently(model):
    _, pad = _stop_pad(model)
    prompts = _prompts(model)
    cfg = GenerationConfig(max_new_tokens=6)
    free = generate(model, prompts, cfg, stop_ids=[model.config.padded_vocab_size - 1], pad_id=pad)
    # make a later token of row 0 (one that differs from its first) a stop token: row 0 ends early, before it
    stop_tok = next(t for t in free[0][1:] if t != free[0][0])
    stopped = generate(model, prompts, cfg, stop_ids=[stop_tok], pad_id=pad)
    assert 1 <= len(stopped[0]) < len(free[0])
    assert stopped[0] == free[0][: free[0].index(stop_tok)]
    for i in (1, 2):
        expected = free[i][: free[i].index(stop_tok)] if stop_tok in free[i] else free[i]
        assert stopped[i] == expected


def test_stream_yields_minus_one_after_stop(model):
    _, pad = _stop_pad(model)
    prompts = _prompts(model)[:1]
    cfg = GenerationConfig(max_new_tokens=8)
    first = generate(model, prompts, cfg, stop_ids=[0], pad_id=pad)[0]
    j = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # the first new token after the start
    steps = list(generate_stream(model, prompts, cfg, stop_ids=[first[j]], pad_id=pad))
    assert [int(s[0]) for s in steps] == first[:j] + [-1]


def test_seeded_sampling_repeats_and_differs_by_seed(model):
    stop, pad = _stop_pad(model)
    p = _prompts(model)[:1]
    a = generate(model, p, GenerationConfig(max_new_tokens=10, do_sample=True, seed=1), stop_ids=stop, pad_id=pad)
    b = generate(model, p, GenerationConfig(max_new_tokens=10, do_sample=True, seed=1), stop_ids=stop, pad_id=pad)
    c = generate(model, p, GenerationConfig(max_new_tokens=10, do_sample=True, seed=2), stop_ids=stop, pad_id=pad)
    assert a == b
    assert a != c


def _naive_top_p(logits, top_p):
    out = logits.clone()
    for r in range(logits.shape[0]):
        probs = logits[r].double().softmax(-1)
        order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
        total, keep = 0.0, []
        for i in order:
            keep.append(i)
            total += float(probs[i])
            if total >= top_p:
                break
        for i in range(len(probs)):
            if i not in keep:
                out[r, i] = float("-inf")
    return out


def test_top_p_matches_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    for top_p in (0.3, 0.7, 0.95):
        assert torch.equal(filter_top_k_top_p(logits, 0, top_p).isinf(), _naive_top_p(logits, top_p).isinf())


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    out = filter_top_k_top_p(logits, 2, 1.0)
    assert out.isfinite().tolist() == [[False, True, False, False, True]]


def test_invalid_config():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0).validate()
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0).validate()


@pytest.mark.parametrize("sample", [False, True])
def test_static_decode_equals_dynamic(model, sample):
    """Fixed-shape steps (the CUDA-graph path without the graph) give exactly the dynamic path's tokens."""
    _, pad = _stop_pad(model)
    cfg = GenerationConfig(max_new_tokens=7, do_sample=sample, temperature=0.9, top_p=0.9, seed=5)
    prompts = _prompts(model, seed=4)
    dynamic = generate(model, prompts, cfg, stop_ids=[], pad_id=pad, decode="dynamic")
    static = generate(model, prompts, cfg, stop_ids=[], pad_id=pad, decode="static")
    assert static == dynamic


def test_static_decode_with_prefix(monkeypatch):
    from glmtune import generate as gen_module

    calls = []
    original = gen_module.StaticDecodeStep.__call__
    monkeypatch.setattr(gen_module.StaticDecodeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    cfg = preset("tiny-chatglm2").replace(pre_seq_len=3, prefix_projection=True)
    m = build_model(cfg)
    m.init_weights(seed=2)
    m.eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    gen = GenerationConfig(max_new_tokens=6)
    assert generate(m, prompts, gen, stop_ids=[], pad_id=0, decode="static") == generate(
        m, prompts, gen, stop_ids=[], pad_id=0, decode="dynamic"
    )
    assert len(calls) == 5  # the static path really ran (6 tokens: the first comes from the prompt's forward)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(m, prompts, gen, stop_ids=[], pad_id=0, decode="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_dynamic():
    m = build_model(preset("tiny-chatglm2"))
    m.init_weights(seed=1)
    m = m.to("cuda").eval()
    prompts = _prompts(m, seed=4)
    gen = GenerationConfig(max_new_tokens=12)
    assert generate(m, prompts, gen, stop_ids=[], pad_id=0, decode="graph") == generate(
        m, prompts, gen, stop_ids=[], pad_id=0, decode="dynamic"
    )


def test_row_seeds_make_rows_independent_and_batch_invariant():
    m = build_model(preset("tiny-chatglm2"))
    m.init_weights(seed=1)
    m.eval()
    same = [[5, 6, 7, 8]] * 3
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=1.0, seed=0)
    shared = generate(m, same, gen, stop_ids=[], pad_id=0)
    assert shared[0] == shared[1] == shared[2]  # one seed for all rows: identical draws
    own = generate(m, same, gen, stop_ids=[], pad_id=0, row_seeds=[10, 11, 12])
    assert len({tuple(r) for r in own}) > 1
    alone = [generate(m, [same[0]], gen, stop_ids=[], pad_id=0, row_seeds=[s])[0] for s in (10, 11, 12)]
    assert own == alone
    with pytest.raises(ValueError, match="row_seeds"):
        generate(m, same, gen, stop_ids=[], pad_id=0, row_seeds=[1])
