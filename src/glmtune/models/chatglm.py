"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat (``config.arch == "chatglm"``) in plain PyTorch.

Numerically what the original ``modeling_chatglm.py`` of these generations computes:

- Embeddings, ``num_layers`` blocks, a final RMSNorm (``post_layer_norm``) and an untied ``output_layer``.
- A block (pre-norm): ``x = norm1(h)``; ``h2 = attention(x) + (x if apply_residual_connection_post_layernorm else
  h)``; ``y = norm2(h2)``; ``out = mlp(y) + (y if ... else h2)``. RMSNorm is computed in float32 and cast back.
- ``query_key_value`` with grouped KV heads (``multi_query_attention``): its output is [q (n_head * d) | k (n_kv * d)
  | v (n_kv * d)]; query head h uses KV group h // (n_head / n_kv). Without grouped KV the original lays the output
  out per head ((n_head, 3 * d), each head's slice split into q, k, v), and so do we.
- Rotary embedding on the first half of each head (d / 2 dims), rotating adjacent pairs (2i, 2i + 1) by
  ``position * theta_i``, ``theta_i = base ** (-2i / (d / 2))``. The table is built in float32 and rounded to the
  compute dtype when that is float16/bfloat16 ("to mimic complex32"), and applied in the compute dtype.
  ChatGLM3 and GLM-4 use ``base = 10000 * rope_ratio``. ChatGLM2's original builds the table in the compute dtype
  itself (angles and positions rounded to fp16/bf16) and, for its -32k model, interpolates positions
  (``position / rope_ratio``, base 10000); ``rope_style="chatglm2"`` reproduces that.
- Attention through SDPA with the default 1/sqrt(d) scale; SwiGLU MLP (``dense_h_to_4h`` -> silu(a) * b ->
  ``dense_4h_to_h``).
- Masks as the original ``get_masks``: causal; padded keys hidden; with nothing cached (no prefix either) a padding
  query row sees every key (its output is never used). With no padding and nothing cached, SDPA's causal path.
- P-Tuning v2: the prefix encoder output (b, P, num_layers * 2 * n_kv * d) read as (b, P, num_layers * 2, n_kv, d),
  layer i taking entry 2i as keys and 2i + 1 as values, placed before the tokens' keys/values with no rotary,
  visible to every query; dropout 0.1 in training, as the original.

Positions: a prompt's real tokens get 0, 1, …; left padding gets 0 (the original tokenizer pads positions with
zeros); every generated token the next position. Parameter names are the original ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.models.attention import KVCache, KVRepeat, attend
from glmtune.models.base import CausalLMBase
from glmtune.models.config import GLMConfig
from glmtune.models.masks import AttentionMask
from glmtune.models.prefix import make_prefix_encoder

log = logging.getLogger(__name__)

ROPE_BASE = 10000.0
PREFIX_DROPOUT = 0.1  # the original ChatGLMModel's dropout on the P-Tuning prefix keys/values
RopeStyle = Literal["chatglm2", "chatglm3"]
_HALF = (torch.float16, torch.bfloat16)


# ---- rotary ---------------------------------------------------------------------------------------------------------
def rope_inv_freq(rot_dim: int) -> torch.Tensor:
    """The ``inv_freq`` buffer the original checkpoints carry (not read: the table is rebuilt). (rot_dim / 2,)"""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def rope_table(
    n: int, rot_dim: int, dtype: torch.dtype, device: torch.device | str | None, *, rope_ratio: float, style: RopeStyle
) -> torch.Tensor:
    """(n, rot_dim / 2, 2) [cos, sin] for positions 0..n-1, in ``dtype`` when it is half precision, else float32."""
    if style == "chatglm2":
        # The original computes in the buffer's dtype: fp16/bf16 positions and angles for half-precision models.
        work = dtype if dtype in _HALF else torch.float32
        theta = 1.0 / (ROPE_BASE ** (torch.arange(0, rot_dim, 2, dtype=work, device=device) / rot_dim))
        pos = torch.arange(n, dtype=work, device=device) / rope_ratio
    else:
        base = ROPE_BASE * rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
        pos = torch.arange(n, dtype=torch.float32, device=device)
    angles = torch.outer(pos, theta).float()
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return table.to(dtype) if dtype in _HALF else table


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d); rope (b, s, 1, r/2, 2) with r = rot_dim <= d: rotate pairs (2i, 2i+1) of the first r dims."""
    b, s, h, d = x.shape
    r = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :r], x[..., r:]
    xs = x_rot.reshape(b, s, h, r // 2, 2)
    c, sn = rope[..., 0], rope[..., 1]  # (b, s, 1, r/2)
    out = torch.stack([xs[..., 0] * c - xs[..., 1] * sn, xs[..., 1] * c + xs[..., 0] * sn], dim=-1)
    return torch.cat([out.flatten(3), x_pass], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(var + self.eps))).to(x.dtype)


def _norm(config: GLMConfig, kw: dict[str, Any]) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon, **kw)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, **kw)


class RotaryEmbedding(nn.Module):
    """Holds only the original ``inv_freq`` buffer, so checkpoints keep their layout."""

    def __init__(self, rot_dim: int, device=None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rot_dim).to(device), persistent=True)


class Embedding(nn.Module):
    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


# ---- layers ---------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.layer_id = layer_id
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_kv_heads
        self.grouped = config.multi_query_attention
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, config.qkv_size, bias=config.add_bias_linear or config.add_qkv_bias, **kw
        )
        self.dense = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.add_bias_linear, **kw)
        self.kv_repeat = KVRepeat()  # how flash varlen gets K/V repeated to every head; set by set_kv_repeat

    def forward(
        self,
        x: torch.Tensor,  # (b, s, H)
        rope: torch.Tensor,  # (b, s, 1, r/2, 2)
        mask: AttentionMask,
        cache: KVCache | None,
        slots: torch.Tensor | None,  # (b, s) cache slots of the tokens, with a cache
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,  # (b, n_kv, P, d) each, when there is no cache
    ) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        qkv = self.query_key_value(x)
        if self.grouped:
            q, k, v = qkv.split([self.n_head * d, self.n_kv * d, self.n_kv * d], dim=-1)
            q = q.view(b, s, self.n_head, d)
            k, v = k.view(b, s, self.n_kv, d), v.view(b, s, self.n_kv, d)
        else:
            q, k, v = qkv.view(b, s, self.n_head, 3 * d).split(d, dim=-1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, s, d)
        if cache is not None:
            k, v = cache.write(self.layer_id, k, v, slots)  # (b, n_kv, max_len, d), prefix included
        elif prefix_kv is not None:
            k = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
        out = attend(q, k, v, mask, kv_repeat=self.kv_repeat)  # (b, h, s, d)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.n_head * d))


def set_kv_repeat(model: nn.Module, repeat: KVRepeat | None = None, *, fused: bool | None = None) -> int:
    """How every ChatGLM attention in ``model`` repeats its K/V heads for flash's varlen kernel (torch < 2.13 takes
    no grouped heads; ``attention.KVRepeat``): ``recompute``, the compiled backward keeps the grouped heads and
    repeats them again instead of saving the copies (``attention.kv_for_flash``); ``fused``, the repeat as glmtune's
    Triton ops (``models/repeat_kv.py``; needs Triton) instead of expand + reshape. ``fused=`` alone changes only that
    field of each attention's setting (``train.compile.compile_blocks``' default on CUDA). Returns how many attentions
    have grouped K/V heads, where it can matter. Set it before the first compiled call (a change recompiles)."""
    if (repeat is None) == (fused is None):
        raise TypeError("set_kv_repeat takes an attention.KVRepeat or fused=, one of the two")
    if repeat is not None and not isinstance(repeat, KVRepeat):
        raise TypeError(f"set_kv_repeat takes an attention.KVRepeat, got {repeat!r}")
    if (repeat.fused if repeat is not None else fused) and importlib.util.find_spec("triton") is None:
        raise ValueError("set_kv_repeat with fused=True needs Triton (models/repeat_kv.py): pip install triton")
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    for attention in attentions:
        attention.kv_repeat = repeat if repeat is not None else dataclasses.replace(attention.kv_repeat, fused=fused)
    return sum(a.n_kv != a.n_head for a in attentions)


class MLP(nn.Module):
    """``dense_4h_to_h(silu(a) * g)`` for ``[a | g] = dense_h_to_4h(x)``. ``fused_swiglu`` (set by
    ``use_fused_swiglu``; ``train.compile.compile_blocks`` sets it on CUDA): in training, the activation and its
    backward as glmtune's fused ops (``models/swiglu.py``: one bf16 rounding instead of two, as Inductor fuses it);
    evaluation and generation keep PyTorch's expression, so a run's dev numbers equal a later ``glmtune eval``."""

    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=bias, **kw)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=bias, **kw)
        self.fused_swiglu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_swiglu and self.training:
            from glmtune.models.swiglu import swiglu  # imports Triton: only for models switched on

            return self.dense_4h_to_h(swiglu(self.dense_h_to_4h(x)))
        a, g = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * g)


def use_fused_swiglu(model: nn.Module, on: bool = True) -> int:
    """Switch every ChatGLM ``MLP`` in ``model`` to the fused SwiGLU ops (``on``) or back; returns how many MLPs
    are switched on. Without Triton the MLPs keep PyTorch's expressions (logged) and 0 is returned. Call it before
    ``torch.compile`` (compiled code keeps the path it traced)."""
    if on:
        try:
            import glmtune.models.swiglu  # noqa: F401  (the ops need Triton)
        except ImportError:
            log.warning("Triton is not installed: the MLPs keep PyTorch's SwiGLU")
            on = False
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    for mlp in mlps:
        mlp.fused_swiglu = on
    return len(mlps) if on else 0


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(config, kw)
        self.self_attention = SelfAttention(config, layer_id, **kw)
        self.post_attention_layernorm = _norm(config, kw)
        self.mlp = MLP(config, **kw)

    def forward(self, h, rope, mask, cache, slots, prefix_kv):  # h (b, s, H)
        x = self.input_layernorm(h)
        h = self.self_attention(x, rope, mask, cache, slots, prefix_kv) + (x if self.post_ln_residual else h)
        y = self.post_attention_layernorm(h)
        return self.mlp(y) + (y if self.post_ln_residual else h)


class GLMTransformer(nn.Module):
    """The original ``GLMTransformer`` (``transformer.encoder``): the blocks and the final norm."""

    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(GLMBlock(config, i, **kw) for i in range(config.num_layers))
        self.final_layernorm = _norm(config, kw) if config.post_layer_norm else None


class ChatGLMModel(nn.Module):
    """The original ``ChatGLMModel`` (``transformer``)."""

    def __init__(self, config: GLMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = Embedding(config, **kw)
        self.rotary_pos_emb = RotaryEmbedding(config.head_dim // 2, device=device)
        self.encoder = GLMTransformer(config, **kw)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, **kw)
        self.prefix_encoder: nn.Module | None = None
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        if config.pre_seq_len is not None:
            self.prefix_encoder = make_prefix_encoder(config, **kw)
        self.gradient_checkpointing = False


# ---- the model ------------------------------------------------------------------------------------------------------
class ChatGLMForCausalLM(CausalLMBase):
    """ChatGLM2/3 and GLM-4. ``forward`` returns logits; see the module docstring for the semantics.

    The rotary variant is ``config.rope`` ("chatglm2" or "chatglm3"; ``spec.configure`` sets it per generation)."""

    def __init__(self, config: GLMConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:  # fmt: skip
        super().__init__(config)
        if config.arch != "chatglm":
            raise ValueError(f"ChatGLMForCausalLM is the ChatGLM2+ model; config.arch is {config.arch!r}")
        self.transformer = ChatGLMModel(config, device=device, dtype=dtype)

    @property
    def rope_style(self) -> str:
        return self.config.rope

    # ---- weights --------------------------------------------------------------------------------------------------
    def output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def checkpoint_rules(self) -> dict[str, Any]:
        """Keyword arguments for ``checkpoint.load_weights``: what an original checkpoint may lack."""
        return {
            "optional": [r"^transformer\.rotary_pos_emb\.inv_freq$", r"^transformer\.prefix_encoder\."],
            "keep_dtype": [r"^transformer\.rotary_pos_emb\.inv_freq$"],
        }

    def _inv_freq(self, rot_dim: int) -> torch.Tensor:
        return rope_inv_freq(rot_dim)

    # ---- the family's pieces of the forward (``CausalLMBase.hidden_states``) --------------------------------------
    def _num_cache_heads(self) -> int:
        return self.config.num_kv_heads

    def _build_rope(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        cfg = self.config
        return rope_table(n, cfg.head_dim // 2, dtype, device, rope_ratio=cfg.rope_ratio, style=self.rope_style)

    def _rope(self, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return table[positions].unsqueeze(2)  # (b, s, 1, r/2, 2)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embedding(input_ids)

    def _blocks(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.transformer.encoder.final_layernorm
        return norm(h) if norm is not None else h
