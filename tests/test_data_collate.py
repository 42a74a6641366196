"""Batching: dynamic padding, positions per generation, packing that never lets a sample see another."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from glmtune.data.collate import collate, collate_packed, pack, sample_positions
from glmtune.models.layout import SequenceLayout
from glmtune.models.masks import build_mask
from glmtune.templates import IGNORE_INDEX, Encoded


def rand_examples(rng: random.Random, n: int, prefix: bool = False) -> list[Encoded]:
    out = []
    for _ in range(n):
        length = rng.randint(2, 12)
        ids = [rng.randint(10, 99) for _ in range(length)]
        labels = [IGNORE_INDEX] + [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids[1:]]
        out.append(Encoded(ids, labels, prefix_length=rng.randint(1, length - 1) if prefix else 0))
    return out


def test_dynamic_padding_left_and_right():
    exs = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8], [IGNORE_INDEX])]
    b = collate(exs, pad_id=0, pad_side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    r = collate(exs, pad_id=0, pad_side="right", pad_to_multiple_of=4)
    assert r["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert r["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_v1_2d_positions_match_original_rule():
    # X X [gMASK] <sop> Y Y <eop>: prefix_length = 3 (index of <sop>), mask position = 2
    ex = Encoded([1, 2, 3, 4, 5, 6, 7], [IGNORE_INDEX] * 3 + [4, 5, 6, 7], prefix_length=3)
    assert sample_positions(ex, "2d") == [[0, 1, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4]]
    b = collate([ex, Encoded([1, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 4], prefix_length=2)], pad_id=0, positions="2d",
                pad_side="left")  # fmt: skip
    assert b["position_ids"].shape == (2, 2, 7)
    assert b["position_ids"][1].tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1]]
    assert b["context"].tolist()[1] == [False] * 4 + [True, True, False]  # right-padded: <sop> at 2


def batch_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense mask the models build from a batch's layout tensors: bool (b, 1, t, t)."""
    layout = SequenceLayout(batch["position_ids"], batch.get("segment_ids"), batch.get("context"))
    return build_mask(layout).dense


def naive_mask(seg: list[int], prefix: dict[int, int] | None) -> list[list[bool]]:
    t = len(seg)
    start = {}
    for i, s in enumerate(seg):
        start.setdefault(s, i)
    m = [[False] * t for _ in range(t)]
    for q in range(t):
        for k in range(t):
            if seg[q] < 0:
                m[q][k] = True  # a padding query sees everything (never read; no empty softmax row)
            elif seg[q] == seg[k]:
                in_prefix = prefix is not None and k - start[seg[k]] < prefix.get(seg[k], 0)
                m[q][k] = k <= q or in_prefix
    return m


@pytest.mark.parametrize("seed", range(6))
def test_packed_mask_matches_naive_reference(seed):
    rng = random.Random(seed)
    exs = rand_examples(rng, 9, prefix=seed % 2 == 1)
    rows = pack(exs, max_tokens=24)
    positions = "2d" if seed % 2 else "1d"
    batch = collate_packed(rows, pad_id=0, positions=positions)
    for i, row in enumerate(rows):
        seg = batch["segment_ids"][i].tolist()
        prefix = {j: e.prefix_length for j, e in enumerate(row.examples)} if positions == "2d" else None
        assert batch_mask(batch)[i, 0].tolist() == naive_mask(seg, prefix)


def test_pack_budget_order_and_errors():
    rng = random.Random(0)
    exs = rand_examples(rng, 30)
    rows = pack(exs, max_tokens=20)
    assert all(r.length <= 20 for r in rows)
    assert sorted(id(e) for r in rows for e in r.examples) == sorted(id(e) for e in exs)  # each exactly once
    assert pack(exs, 20)[0].length == rows[0].length  # deterministic
    with pytest.raises(ValueError, match="more than the packing budget"):
        pack([Encoded([1] * 5, [IGNORE_INDEX] * 5)], max_tokens=4)


def test_packed_labels_positions_and_first_label_ignored():
    a = Encoded([1, 2, 3], [7, 2, 3])  # a (bad) first label must not leak into the previous sample's loss
    b = Encoded([4, 5], [IGNORE_INDEX, 5])
    batch = collate_packed([pack([a, b], 10)[0]], pad_id=0, pad_to=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0]]


@pytest.mark.parametrize("positions", ["1d", "2d"])
def test_packing_never_lets_a_sample_see_another(positions):
    """Attention over a packed row with the mask gives each sample exactly what it gets alone (float64)."""
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(0)
    exs = rand_examples(rng, 7, prefix=positions == "2d")
    rows = pack(exs, max_tokens=30)
    batch = collate_packed(rows, pad_id=0, positions=positions)
    b, t = batch["input_ids"].shape
    table = torch.randn(100, 3, 8, dtype=torch.float64, generator=gen)  # per token id: q, k, v (head dim 8)
    qkv = table[batch["input_ids"]]  # (b, t, 3, d)
    q, k, v = (qkv[:, None, :, i] for i in range(3))  # (b, 1, t, d)
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=batch_mask(batch))  # (b, 1, t, d)
    for i, row in enumerate(rows):
        start = 0
        for e in row.examples:
            n = len(e.input_ids)
            alone = table[torch.tensor(e.input_ids)]  # (n, 3, d)
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            if positions == "2d":
                allowed[:, : e.prefix_length] = True
            ref = F.scaled_dot_product_attention(alone[None, None, :, 0], alone[None, None, :, 1],
                                                 alone[None, None, :, 2], attn_mask=allowed)  # fmt: skip
            torch.testing.assert_close(packed[i, 0, start : start + n], ref[0, 0])
            start += n
        assert not torch.isnan(packed[i]).any()


def test_unpacked_left_padded_prefix_mask():
    ex = [Encoded([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4], 2), Encoded([1, 2], [IGNORE_INDEX, 2], 1)]
    b = collate(ex, pad_id=0, positions="2d", pad_side="left")
    m = batch_mask(b)
    assert m[1, 0].tolist() == naive_mask([-1, -1, 0, 0], {0: 1})
    assert m[0, 0].tolist() == naive_mask([0, 0, 0, 0], {0: 2})
