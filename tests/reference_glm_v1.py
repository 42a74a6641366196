"""An independent, deliberately naive float64 ChatGLM-6B (v1) forward, written from the original's description.

One sequence at a time, explicit loops over tokens, heads and rotary pairs, the original's score scaling
(divide by sqrt(d) * (layer + 1), fill masked scores with -10000, multiply back by layer + 1, softmax), an explicit
prefix-LM mask and explicit 2D positions. Reads the weights by their original checkpoint names from a state dict,
so it also checks the model's parameter names. Used only by tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def ref_positions(seq: list[int], bos: int, mask: int, gmask: int) -> tuple[list[int], list[int]]:
    """The original get_position_ids for one unpadded sequence: (position ids, block position ids)."""
    n = len(seq)
    context = n
    for i, tok in enumerate(seq):
        if tok == bos:
            context = i
            break
    target = gmask if gmask in seq else mask
    mask_pos = None
    for i, tok in enumerate(seq):
        if tok == target:
            mask_pos = i
            break
    pos, block = [], []
    for i in range(n):
        if i < context:
            pos.append(i)
            block.append(0)
        else:
            pos.append(mask_pos if mask_pos is not None else i)
            block.append(i - context + 1)
    return pos, block


def ref_inv_freq(rot_dim: int) -> list[float]:
    """1 / 10000^(2i / rot_dim), rounded to float16 as the original stores it."""
    return [float(np.float16(1.0 / 10000.0 ** (2 * i / rot_dim))) for i in range(rot_dim // 2)]


def _rotate(vec: torch.Tensor, p: int, inv: list[float]) -> torch.Tensor:
    """Rotate one half-head vector (d/2,) by position p: pairs (i, i + d/4) turned by angle p * inv[i]."""
    r = len(inv)
    out = vec.clone()
    for i in range(r):
        c, s = math.cos(p * inv[i]), math.sin(p * inv[i])
        a, b = float(vec[i]), float(vec[i + r])
        out[i] = a * c - b * s
        out[i + r] = b * c + a * s
    return out


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / math.sqrt(float(var) + eps) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def ref_prefix_kv(sd: dict[str, torch.Tensor], cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (P, n_head, d), from the original prefix encoder weights."""
    g = {k[len("transformer.prefix_encoder.") :]: v.double() for k, v in sd.items() if "prefix_encoder." in k}
    emb = g["embedding.weight"]  # (P, H) with projection, (P, L*2*H) without
    if cfg.prefix_projection:
        hidden = torch.tanh(emb @ g["trans.0.weight"].T + g["trans.0.bias"])
        flat = hidden @ g["trans.2.weight"].T + g["trans.2.bias"]
    else:
        flat = emb
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    d = H // nh
    out = []
    for i in range(cfg.num_layers):
        k = flat[:, (2 * i) * H : (2 * i + 1) * H].reshape(-1, nh, d)
        v = flat[:, (2 * i + 1) * H : (2 * i + 2) * H].reshape(-1, nh, d)
        out.append((k, v))
    return out


def ref_forward(
    sd: dict[str, torch.Tensor],
    cfg,
    seq: list[int],
    positions: tuple[list[int], list[int]] | None = None,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Logits (n, vocab) in float64 for one unpadded sequence."""
    w = {k: v.double() for k, v in sd.items()}
    n = len(seq)
    H, nh, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_layers
    d = H // nh
    eps = cfg.layernorm_epsilon
    alpha = math.sqrt(2 * 28)  # the original GLMBlock's default num_layers=28, never overridden by ChatGLMModel
    pos, block = (
        positions
        if positions is not None
        else ref_positions(seq, cfg.bos_token_id, cfg.mask_token_id, cfg.gmask_token_id)
    )
    context = seq.index(cfg.bos_token_id) if cfg.bos_token_id in seq else n
    inv = ref_inv_freq(d // 2)
    n_prefix = prefix_kv[0][0].shape[0] if prefix_kv else 0

    hs = [w["transformer.word_embeddings.weight"][t].clone() for t in seq]
    for layer in range(L):
        p = f"transformer.layers.{layer}."
        xs = [_layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps) for h in hs]
        qs, ks, vs = [], [], []  # [token][head] -> (d,)
        for x in xs:
            mixed = w[p + "attention.query_key_value.weight"] @ x + w[p + "attention.query_key_value.bias"]
            q_t, k_t, v_t = [], [], []
            for head in range(nh):
                chunk = mixed[head * 3 * d : (head + 1) * 3 * d]  # this head's [q | k | v]
                q_t.append(chunk[:d])
                k_t.append(chunk[d : 2 * d])
                v_t.append(chunk[2 * d :])
            qs.append(q_t)
            ks.append(k_t)
            vs.append(v_t)
        for t in range(n):
            for head in range(nh):
                for which in ("q", "k"):
                    vec = (qs if which == "q" else ks)[t][head]
                    first = _rotate(vec[: d // 2], pos[t], inv)
                    second = _rotate(vec[d // 2 :], block[t], inv)
                    (qs if which == "q" else ks)[t][head] = torch.cat([first, second])
        coeff = float(layer + 1)
        attn_out = []
        for i in range(n):
            heads = []
            for head in range(nh):
                keys = [prefix_kv[layer][0][j, head] for j in range(n_prefix)] if prefix_kv else []
                vals = [prefix_kv[layer][1][j, head] for j in range(n_prefix)] if prefix_kv else []
                allowed = [True] * n_prefix
                for j in range(n):
                    keys.append(ks[j][head])
                    vals.append(vs[j][head])
                    allowed.append(j < context or j <= i)
                q = qs[i][head] / (math.sqrt(d) * coeff)
                scores = []
                for kvec, ok in zip(keys, allowed, strict=True):
                    score = float(q @ kvec)
                    scores.append((score if ok else -10000.0) * coeff)
                top = max(scores)
                exps = [math.exp(sc - top) for sc in scores]
                total = sum(exps)
                ctx = sum((e / total) * val for e, val in zip(exps, vals, strict=True))
                heads.append(ctx)
            merged = torch.cat(heads)
            attn_out.append(w[p + "attention.dense.weight"] @ merged + w[p + "attention.dense.bias"])
        new_hs = []
        for t in range(n):
            h = xs[t] * alpha + attn_out[t]
            y = _layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
            inner = _gelu(w[p + "mlp.dense_h_to_4h.weight"] @ y + w[p + "mlp.dense_h_to_4h.bias"])
            mlp = w[p + "mlp.dense_4h_to_h.weight"] @ inner + w[p + "mlp.dense_4h_to_h.bias"]
            new_hs.append(y * alpha + mlp)
        hs = new_hs
    final = [
        _layer_norm(h, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], eps) for h in hs
    ]
    return torch.stack([w["lm_head.weight"] @ f for f in final])
