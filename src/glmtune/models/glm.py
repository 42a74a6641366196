"""ChatGLM-6B (v1, ``config.arch == "glm"``) in plain PyTorch, numerically the original ``modeling_chatglm.py``.

What the original computes, and this file with it:

- Embeddings, then ``num_layers`` GLM blocks, a final LayerNorm and ``lm_head`` (tied to the word embeddings).
- A block: ``x = LN1(h)``; ``h = x * alpha + attention(x)``; ``y = LN2(h)``; ``out = y * alpha + mlp(y)`` with
  ``alpha = sqrt(2 * 28)`` (the residual is the *normalised* input, scaled: DeepNorm style). The original meant
  sqrt(2 * num_layers) but never passes num_layers to its blocks, so every model size uses its default of 28.
- ``query_key_value`` is laid out per head: its output is viewed as (…, n_head, 3 * d) and each head's slice is
  split into q, k, v (not three (n_head * d) blocks as in v2).
- 2D rotary positions: each head is cut in two halves of d/2; the first half of q and k is rotated by the position
  id, the second by the block position id, each with ``rotate_half`` over its d/2 (pairs (i, i + d/4)).
  The original keeps ``inv_freq`` in float16 and builds the cos/sin table in the model's dtype from it (in float16
  for the usual ``.half()`` model: positions, angles and cos/sin all rounded to float16). We do the same for
  float16/float32/float64 models; a bfloat16 model gets the float16 table (the original would round positions above
  256 to bfloat16, an accident of its code, not something the weights were trained with).
- Attention: the prefix-LM mask (bidirectional over the tokens before ``<sop>``, causal from it on), softmax over
  ``q k^T / sqrt(d)``. The original scales by ``1 / (sqrt(d) * (layer_id + 1))``, fills masked scores with -10000
  and multiplies by ``layer_id + 1`` again in float32 before the softmax: the same probabilities (masked ones are
  exp(-10000 * (layer_id + 1)) = 0), so we call SDPA with a boolean mask.
- MLP: ``dense_h_to_4h`` -> GeLU (tanh form, as the original ``gelu_impl``) -> ``dense_4h_to_h``, all with biases.
- P-Tuning v2: the prefix encoder's output (b, P, num_layers * 2 * hidden) is read as (b, P, num_layers * 2, n_head,
  d); layer i takes entry 2i as keys and 2i + 1 as values. They are put before the keys/values of the tokens, with no
  rotary, and every query may attend to them. In training a dropout of 0.1 is applied to them, as in the original.

Positions (``prompt_position_ids``) follow the original ``get_position_ids`` / tokenizer ``_pad``: for a row whose
real tokens are ``seq``, ``context = seq.index(<sop>)``, ``mask = seq.index([gMASK] if present else [MASK])``;
position ids are ``0..context-1`` then ``mask`` repeated; block position ids are ``0`` over the context then
``1, 2, ...``. Left padding gets position 0 (the tokenizer pads the positions with zeros). A generated token keeps
the last position id and advances the block position by one (``next_position_ids``).

Parameter names are the original ones (``transformer.word_embeddings.weight``, ``transformer.layers.{i}...``,
``transformer.final_layernorm.*``, ``lm_head.weight``, ``transformer.prefix_encoder.*``), including the
``transformer.layers.{i}.attention.rotary_emb.inv_freq`` buffers the checkpoints carry (float16; kept for the file
format, not read: the original ignores them on load too).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.models.attention import KVCache, attend
from glmtune.models.base import CausalLMBase
from glmtune.models.config import GLMConfig
from glmtune.models.masks import AttentionMask
from glmtune.models.prefix import make_prefix_encoder

log = logging.getLogger(__name__)

ROPE_BASE = 10000.0
ORIGINAL_NUM_LAYERS = 28  # see GLMBlock: the residual scale uses this, not config.num_layers
PREFIX_DROPOUT = 0.1  # the original ChatGLMModel's dropout on the P-Tuning prefix keys/values


# ---- rotary ---------------------------------------------------------------------------------------------------------
def rope_inv_freq(rot_dim: int) -> torch.Tensor:
    """The original's ``inv_freq``: computed in float32, stored in float16. (rot_dim / 2,)"""
    return (1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))).half()


def rope_table(n: int, rot_dim: int, dtype: torch.dtype, device: torch.device | str | None = None):
    """cos, sin (n, rot_dim) in ``dtype`` for positions 0..n-1, as the original builds them in that dtype.

    The original: ``t = arange(n, dtype=inv_freq.dtype)``, ``freqs = outer(t, inv_freq)``, ``emb = cat(freqs,
    freqs)``, ``emb.cos()`` — all in the dtype the model (and so its ``inv_freq`` buffer) was cast to.
    Computed on ``device``, so cos/sin are that device's own (CUDA's float32 cos can differ from the CPU's by 1 ulp).
    """
    work = torch.float16 if dtype in (torch.float16, torch.bfloat16) else dtype
    opmath = torch.float32 if work == torch.float16 else work  # half cos/sin are computed in float32 and rounded
    inv = rope_inv_freq(rot_dim).to(torch.float64)
    t = torch.arange(n, dtype=torch.float64).to(work).to(torch.float64)
    freqs = (t[:, None] * inv[None, :]).to(work)  # one rounding of the exact product, as the einsum (on any device)
    emb = torch.cat([freqs, freqs], dim=-1).to(device=device, dtype=opmath)
    return emb.cos().to(work).to(dtype), emb.sin().to(work).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d); cos/sin (2, b, s, 1, d/2): row 0 rotates the first half of each head, row 1 the second."""
    x1, x2 = x.chunk(2, dim=-1)
    x1 = x1 * cos[0] + rotate_half(x1) * sin[0]
    x2 = x2 * cos[1] + rotate_half(x2) * sin[1]
    return torch.cat([x1, x2], dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds the original's per-layer ``inv_freq`` buffer (float16) so the checkpoint names round-trip."""

    def __init__(self, rot_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        self.register_buffer("inv_freq", rope_inv_freq(rot_dim).to(device), persistent=True)


# ---- layers ---------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.layer_id = layer_id
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        inner = self.n_head * self.head_dim
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2, device=device)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * inner, bias=True, **kw)
        self.dense = nn.Linear(inner, config.hidden_size, bias=True, **kw)

    def forward(
        self,
        x: torch.Tensor,  # (b, s, H)
        rope: torch.Tensor,  # (2, 2, b, s, 1, d/2): [cos, sin] x [position, block position]
        mask: AttentionMask,
        cache: KVCache | None,
        slots: torch.Tensor | None,  # (b, s) cache slots of the tokens, with a cache
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,  # (b, n_head, P, d) each, when there is no cache
    ) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.n_head, 3 * self.head_dim)  # per-head [q | k | v]
        q, k, v = qkv.split(self.head_dim, dim=-1)  # (b, s, h, d)
        q = apply_rope_2d(q, rope[0], rope[1])
        k = apply_rope_2d(k, rope[0], rope[1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, s, d)
        if cache is not None:
            k, v = cache.write(self.layer_id, k, v, slots)  # (b, h, max_len, d), prefix included
        elif prefix_kv is not None:
            k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        out = attend(q, k, v, mask)  # (b, h, s, d)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=True, **kw)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original gelu_impl: 0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2))).
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        # The original GLMBlock takes num_layers with a default of 28 and ChatGLMModel never passes it: the residual
        # scale is sqrt(2 * 28) whatever config.num_layers says (same thing for the released 28-layer model).
        self.alpha = (2 * ORIGINAL_NUM_LAYERS) ** 0.5
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, **kw)
        self.attention = SelfAttention(config, layer_id, **kw)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, **kw)
        self.mlp = MLP(config, **kw)

    def forward(self, h, rope, mask, cache, slots, prefix_kv):  # h (b, s, H)
        x = self.input_layernorm(h)
        h = x * self.alpha + self.attention(x, rope, mask, cache, slots, prefix_kv)
        y = self.post_attention_layernorm(h)
        return y * self.alpha + self.mlp(y)


class GLMTransformer(nn.Module):
    """The original ``ChatGLMModel``: embeddings, blocks, final LayerNorm, optional P-Tuning prefix encoder."""

    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(GLMBlock(config, i, **kw) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, **kw)
        self.prefix_encoder = make_prefix_encoder(config, **kw) if config.pre_seq_len is not None else None
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.gradient_checkpointing = False


# ---- the model ------------------------------------------------------------------------------------------------------
class GLMForCausalLM(CausalLMBase):
    """ChatGLM-6B v1. ``forward`` returns logits; see the module docstring for the semantics."""

    def __init__(
        self, config: GLMConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(config)
        if config.arch != "glm":
            raise ValueError(f"GLMForCausalLM is the ChatGLM-6B (v1) model; config.arch is {config.arch!r}")
        if not config.position_encoding_2d:
            raise ValueError(
                "config field 'position_encoding_2d' is false: only 2D positions (ChatGLM-6B) are supported"
            )
        if config.head_dim % 4:
            raise ValueError(f"config: head size {config.head_dim} must be a multiple of 4 (2D rotary on half heads)")
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError("config: hidden_size must equal num_attention_heads * head size for ChatGLM-6B")
        for name in ("bos_token_id", "mask_token_id", "gmask_token_id"):
            if not isinstance(getattr(config, name), int):
                raise ValueError(f"config field '{name}' must be an integer token id for ChatGLM-6B")
        self.transformer = GLMTransformer(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.tie_weights()

    # ---- weights --------------------------------------------------------------------------------------------------
    def output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``transformer.word_embeddings.weight``, as the original loads them."""
        self.lm_head.weight = self.transformer.word_embeddings.weight

    def checkpoint_rules(self) -> dict[str, Any]:
        """Keyword arguments for ``checkpoint.load_weights``: what an original checkpoint may lack."""
        return {
            "optional": [r"\.rotary_emb\.inv_freq$", r"^transformer\.prefix_encoder\."],
            "keep_dtype": [r"\.rotary_emb\.inv_freq$"],
        }

    def _inv_freq(self, rot_dim: int) -> torch.Tensor:
        return rope_inv_freq(rot_dim)

    # ---- the family's pieces of the forward (``CausalLMBase.hidden_states``) --------------------------------------
    def _num_cache_heads(self) -> int:
        return self.config.num_attention_heads

    def _build_rope(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_table(n, self.config.head_dim // 2, dtype, device)

    def _rope(self, positions: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = table
        pos = positions.transpose(0, 1)  # (2 [pos, block], b, s)
        return torch.stack([F.embedding(pos, cos), F.embedding(pos, sin)]).unsqueeze(-2)  # (2, 2, b, s, 1, d/2)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings(input_ids)

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.final_layernorm(h)

    def _after_materialize(self) -> None:
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.transformer.word_embeddings.weight:
            self.tie_weights()
