import pytest
import torch

from glmtune.generate import GenerationConfig, filter_top_k_top_p, generate, generate_stream, gumbel_noise, hash32
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


def test_hash32_matches_python_reference():
    def ref(x):  # lowbias32 on Python ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (200,), dtype=torch.long).tolist()
    assert hash32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


def test_gumbel_argmax_samples_the_softmax():
    """argmax(logits + noise) over many seeds draws each token with its softmax probability."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 20000
    noise = gumbel_noise(torch.arange(n), torch.tensor(3), 5)  # (n, 5): one row per seed
    counts = torch.bincount((logits + noise).argmax(-1), minlength=5).double()
    p = logits.double().softmax(-1)
    # within 4 standard deviations of the binomial count for every token
    assert ((counts - n * p).abs() <= 4 * (n * p * (1 - p)).sqrt()).all(), (counts / n, p)
    other = gumbel_noise(torch.arange(n), torch.tensor(4), 5)
    assert not torch.equal(noise, other)  # another step draws anew


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


def test_prefix_model_greedy_matches_full_forward():
    """With a P-Tuning prefix in the first cache slots, decoding picks the argmax of a full forward each step."""
    cfg = preset("tiny-chatglm2").replace(pre_seq_len=3, prefix_projection=True)
    m = build_model(cfg)
    m.init_weights(seed=2)
    m.eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate(m, prompts, GenerationConfig(max_new_tokens=6), stop_ids=[], pad_id=0)
    for prompt, new in zip(prompts, out, strict=True):
        seq = list(prompt)
        for token in new:
            with torch.no_grad():
                assert int(m(torch.tensor([seq]))[0, -1].argmax()) == token
            seq.append(token)
    with pytest.raises(ValueError, match="decode must be one of"):
        generate(m, prompts, GenerationConfig(max_new_tokens=2), stop_ids=[], pad_id=0, decode="fast")


def test_stream_every_does_not_change_tokens(model):
    _, pad = _stop_pad(model)
    cfg = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.9, top_p=0.9, seed=5)
    prompts = _prompts(model, seed=4)
    one = [t.tolist() for t in generate_stream(model, prompts, cfg, stop_ids=[], pad_id=pad, stream_every=1)]
    three = [t.tolist() for t in generate_stream(model, prompts, cfg, stop_ids=[], pad_id=pad, stream_every=3)]
    assert one == three and len(one) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager():
    m = build_model(preset("tiny-chatglm2"))
    m.init_weights(seed=1)
    m = m.to("cuda").eval()
    prompts = _prompts(m, seed=4)
    gen = GenerationConfig(max_new_tokens=12)
    assert generate(m, prompts, gen, stop_ids=[], pad_id=0, decode="graph") == generate(
        m, prompts, gen, stop_ids=[], pad_id=0, decode="eager"
    )
    sample = GenerationConfig(max_new_tokens=12, do_sample=True, top_p=0.8, top_k=20, repetition_penalty=1.2, seed=3)
    eager = generate(m, prompts, sample, stop_ids=[], pad_id=0, decode="eager")
    assert generate(m, prompts, sample, stop_ids=[], pad_id=0, decode="graph") == eager
    assert generate(m, prompts, sample, stop_ids=[], pad_id=0, decode="compiled") == eager  # inductor, captured


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


@pytest.mark.parametrize("sample", [False, True])
def test_decoder_reuses_its_buffers_and_gives_fresh_results(model, sample):
    """A Decoder keeps its cache and step between calls; each call gives what a fresh generation gives."""
    from glmtune.generate import Decoder

    _, pad = _stop_pad(model)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=sample, temperature=0.9, top_p=0.9, seed=7,
                           repetition_penalty=1.2)  # fmt: skip
    decoder = Decoder(model)
    first, second = _prompts(model, seed=4), _prompts(model, seed=5)
    for prompts in (first, second, first):
        assert generate(model, prompts, cfg, stop_ids=[], pad_id=pad, decoder=decoder) == generate(
            model, prompts, cfg, stop_ids=[], pad_id=pad
        )
    assert len(decoder._batches) == 1  # same batch size, cache bucket and settings: one set of buffers


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(model):
    """decode="compiled" (the step through torch.compile; aot_eager here: the same graph, no code generation)."""
    from glmtune.generate import Decoder

    _, pad = _stop_pad(model)
    cfg = GenerationConfig(max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9, seed=3, repetition_penalty=1.1)
    prompts = _prompts(model, seed=6)
    compiled = Decoder(model, decode="compiled", compile_backend="aot_eager")
    assert generate(model, prompts, cfg, stop_ids=[], pad_id=pad, decoder=compiled) == generate(
        model, prompts, cfg, stop_ids=[], pad_id=pad, decode="eager"
    )


def test_eval_decode_choices_are_the_decoder_modes():
    """The eval command lists the modes without importing torch at start-up; they must stay the Decoder's."""
    import argparse

    from glmtune.evaluate.command import add_parser
    from glmtune.generate import DECODE_MODES

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    (action,) = [a for a in eval_parser._actions if a.dest == "decode"]
    assert tuple(action.choices) == DECODE_MODES


def _drive_decode_batch(model, prompts, settings, limits, stop, decode="eager"):
    """Sequences through one 3-row DecodeBatch: they join free rows at different steps (prompts fed in two parts
    where the model allows, the row waiting between them), leave at their stop or limit, and their rows are taken
    again. Returns each sequence's tokens."""
    from glmtune.generate import Admission, DecodeBatch

    batch = DecodeBatch(model, 3, 40, n_stop=1, ring=4, window_multiple=8, decode=decode)
    batch.reset()
    batch.set_stop(stop)
    whole = model.config.arch == "glm"  # v1 prompts are attended both ways: never split
    got: dict[int, list[int]] = {}
    rows: dict[int, int] = {}  # row -> sequence
    joined: dict[int, int] = {}
    waiting = list(range(len(prompts)))

    def admit(row: int) -> None:
        i = waiting.pop(0)
        a = Admission(prompts[i], settings[i], limits[i])
        if whole:
            [first] = batch.prefill([row], [a])
        else:  # two parts: the row waits between them while the others decode
            assert batch.prefill([row], [a], [(0, 2)]) == []
            advance(1)
            [first] = batch.prefill([row], [a], [(2, len(a.prompt))])
        rows[row], joined[row], got[i] = i, batch.tick, [first]

    def advance(k: int) -> None:  # k steps; each row's new tokens recorded, finished rows freed and taken again
        cols = batch.step(k)
        out = (batch.read(cols) if k == 1 else batch.read_later(cols)()).tolist()  # both ways of reading
        finished = []
        for row, i in list(rows.items()):
            for t, token in zip(range(batch.tick - k, batch.tick), out[row], strict=True):
                if t >= joined[row] and got[i][-1] >= 0:
                    got[i].append(token)
            if got[i][-1] < 0 or len(got[i]) >= limits[i]:
                del rows[row]
                finished.append(row)
        batch.free(finished)
        for row in finished:
            if waiting:
                admit(row)

    admit(0)
    advance(2)
    admit(1)
    admit(2)
    while rows or waiting:
        advance(1 + batch.tick % 2)
    return [[t for t in got[i] if t >= 0] for i in range(len(prompts))]


def _join_leave_case(model):
    from glmtune.generate import RowSampling

    prompts = _prompts(model, seed=7) + _prompts(model, seed=8)
    settings = [RowSampling(), RowSampling(True, 0.8, 0.9, 11), RowSampling(True, 1.3, 1.0, 5)] * 2
    return prompts, settings, [6, 4, 7, 5, 6, 3]


@pytest.mark.parametrize("prefix", [False, True])
def test_decode_batch_rows_join_and_leave_and_give_what_they_give_alone(model, prefix):
    """Continuous batching on one DecodeBatch: every sequence gives what generate() gives it alone, greedy or
    seeded sampling, whatever joins and leaves beside it."""
    if prefix:  # a P-Tuning prefix in the first slots of every row
        if model.config.arch == "glm":
            pytest.skip("the prefix case runs on one family")
        model = build_model(model.config.replace(pre_seq_len=3, prefix_projection=True))
        model.init_weights(seed=2)
        model.eval()
    stop, pad = _stop_pad(model)
    prompts, settings, limits = _join_leave_case(model)
    want = []
    for p, s, n in zip(prompts, settings, limits, strict=True):
        cfg = GenerationConfig(max_new_tokens=n, do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p,
                               seed=s.seed)  # fmt: skip
        want.append(generate(model, [p], cfg, stop_ids=stop, pad_id=pad)[0])
    assert _drive_decode_batch(model, prompts, settings, limits, stop) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_batch_equals_eager():
    """The captured steps (one per cache window and step kind) replay what the eager steps compute, rows joining
    and leaving."""
    m = build_model(preset("tiny-chatglm2"))
    m.init_weights(seed=1)
    m = m.to("cuda").eval()
    stop, _ = _stop_pad(m)
    prompts, settings, limits = _join_leave_case(m)
    eager = _drive_decode_batch(m, prompts, settings, limits, stop, decode="eager")
    assert _drive_decode_batch(m, prompts, settings, limits, stop, decode="graph") == eager
