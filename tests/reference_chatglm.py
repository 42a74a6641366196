"""An independent, naive float64 ChatGLM2/3/GLM-4 forward for tests, written from the original's description.

It reads a state dict by the original parameter names and computes one sequence at a time with explicit loops
over heads, complex-number rotary, and softmax over an explicit list of visible keys. Slow; tiny models only.
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rotate(x, pos, base, ratio_positions):
    """x (s, d_rot) rotated in adjacent pairs as complex numbers; pos (s,)"""
    d = x.shape[-1]
    theta = torch.tensor([base ** (-(2 * i) / d) for i in range(d // 2)], dtype=torch.float64)
    angle = (pos.double() / ratio_positions)[:, None] * theta[None]  # (s, d/2)
    z = torch.complex(x[:, 0::2], x[:, 1::2]) * torch.polar(torch.ones_like(angle), angle)
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def reference_logits(
    sd: dict[str, torch.Tensor],
    cfg,
    ids: list[int],
    positions: list[int],
    visible: list[list[int]],
    *,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    rope_style: str = "chatglm3",
) -> torch.Tensor:
    """Logits (s, vocab) for one sequence. visible[q] lists the token indices query q attends to; prefix_kv, per
    layer, (n_kv, P, d) keys and values every query also attends to (before the tokens)."""
    w = {k: v.double() for k, v in sd.items()}
    n_h, n_kv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.layernorm_epsilon
    r = d // 2
    if rope_style == "chatglm2":
        base, ratio = 10000.0, cfg.rope_ratio
    else:
        base, ratio = 10000.0 * cfg.rope_ratio, 1.0
    pos = torch.tensor(positions)

    def norm(x, name):
        if cfg.rmsnorm:
            return _rms(x, w[name + ".weight"], eps)
        return _ln(x, w[name + ".weight"], w[name + ".bias"], eps)

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    h = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]  # (s, H)
    s = len(ids)
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        x = norm(h, p + "input_layernorm")
        qkv = linear(x, p + "self_attention.query_key_value")
        if cfg.multi_query_attention:
            q = qkv[:, : n_h * d].reshape(s, n_h, d)
            k = qkv[:, n_h * d : (n_h + n_kv) * d].reshape(s, n_kv, d)
            v = qkv[:, (n_h + n_kv) * d :].reshape(s, n_kv, d)
        else:
            per = qkv.reshape(s, n_h, 3 * d)
            q, k, v = per[..., :d], per[..., d : 2 * d], per[..., 2 * d :]
        q, k = q.clone(), k.clone()
        for j in range(n_h):
            q[:, j, :r] = _rotate(q[:, j, :r], pos, base, ratio)
        for j in range(n_kv):
            k[:, j, :r] = _rotate(k[:, j, :r], pos, base, ratio)
        out = torch.zeros(s, n_h, d, dtype=torch.float64)
        group = n_h // n_kv
        for j in range(n_h):
            g = j // group
            for t in range(s):
                keys = [k[u, g] for u in visible[t]]
                vals = [v[u, g] for u in visible[t]]
                if prefix_kv is not None:
                    pk, pv = prefix_kv[i]
                    keys = list(pk[g].double()) + keys
                    vals = list(pv[g].double()) + vals
                scores = torch.stack([q[t, j] @ kk for kk in keys]) / math.sqrt(d)
                prob = torch.softmax(scores, 0)
                out[t, j] = sum(pp * vv for pp, vv in zip(prob, vals, strict=True))
        attn = linear(out.reshape(s, n_h * d), p + "self_attention.dense")
        h2 = attn + (x if cfg.apply_residual_connection_post_layernorm else h)
        y = norm(h2, p + "post_attention_layernorm")
        a = linear(y, p + "mlp.dense_h_to_4h")
        half = a.shape[-1] // 2
        m = linear(a[:, :half] * torch.sigmoid(a[:, :half]) * a[:, half:], p + "mlp.dense_4h_to_h")
        h = m + (y if cfg.apply_residual_connection_post_layernorm else h2)
    if cfg.post_layer_norm:
        h = norm(h, "transformer.encoder.final_layernorm")
    return h @ w["transformer.output_layer.weight"].T


def reference_prefix_kv(sd: dict[str, torch.Tensor], cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (n_kv, P, d), from the prefix encoder weights, in float64."""
    w = {k: v.double() for k, v in sd.items()}
    e = w["transformer.prefix_encoder.embedding.weight"]  # (P, emb)
    if cfg.prefix_projection:
        pre = "transformer.prefix_encoder.trans."
        t = torch.tanh(e @ w[pre + "0.weight"].T + w[pre + "0.bias"])
        e = t @ w[pre + "2.weight"].T + w[pre + "2.bias"]
    P = e.shape[0]
    kv = e.reshape(P, cfg.num_layers * 2, cfg.num_kv_heads, cfg.head_dim)
    return [(kv[:, 2 * i].transpose(0, 1), kv[:, 2 * i + 1].transpose(0, 1)) for i in range(cfg.num_layers)]
