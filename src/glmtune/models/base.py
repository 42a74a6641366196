"""What both architecture families (``glm.py``, ``chatglm.py``) share, so neither file repeats the other.

``CausalLMBase`` holds the family-independent parts of a model: random and missing-tensor initialisation, the KV
cache (which starts with the P-Tuning prefix keys/values), the rotary-table cache, the checks every forward makes on
its inputs, and ``forward`` = ``hidden_states`` + output layer. A family supplies the rest through a few hooks:
``hidden_states``, ``output_embeddings``, ``_inv_freq``, ``_build_rope``, ``_num_cache_heads`` and
``_position_shape``, plus ``_after_materialize`` where it must re-tie weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from glmtune.models.attention import KVCache, cached_tokens
from glmtune.models.config import GLMConfig


class CausalLMBase(nn.Module):
    config: GLMConfig

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self._rope: dict[tuple[torch.dtype, torch.device], tuple[int, Any]] = {}  # -> (positions covered, table)

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def output_embeddings(self) -> nn.Linear:
        raise NotImplementedError

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, attn_mask=None):
        raise NotImplementedError

    def _inv_freq(self, rot_dim: int) -> torch.Tensor:
        """The ``inv_freq`` buffer as the family's original checkpoints store it."""
        raise NotImplementedError

    def _build_rope(self, n: int, dtype: torch.dtype, device: torch.device) -> Any:
        raise NotImplementedError

    def _num_cache_heads(self) -> int:
        raise NotImplementedError

    def _position_shape(self, b: int, s: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _after_materialize(self) -> None:
        """Called after tensors were (re)created, e.g. to re-tie shared weights."""

    # ---- weights --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(
        self, seed: int | None = None, *, std: float = 0.02, device: torch.device | str | None = None
    ) -> None:
        """Random weights (N(0, std) matrices, zero biases, unit norms; the prefix encoder as PyTorch's defaults).

        A model built on "meta" is first materialised on ``device`` (CPU by default). Values are drawn on the CPU
        from ``seed``, so they do not depend on the device.
        """
        if any(t.is_meta for t in self._tensors()):
            self.to_empty(device=device or "cpu")
            self._after_materialize()
            self._rope.clear()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, t in self._named_tensors():
            t.copy_(self._initial_value(name, t, std, gen))

    @torch.no_grad()
    def init_missing(
        self,
        names: list[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> None:
        """Initialise the tensors a checkpoint did not hold (``LoadReport.missing_optional``), still on meta."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            old = getattr(module, attr)
            if not old.is_meta:
                continue
            keep = old.dtype if (not old.is_floating_point() or attr == "inv_freq") else (dtype or old.dtype)
            value = self._initial_value(name, old, 0.02, gen).to(device=device, dtype=keep)
            if isinstance(old, nn.Parameter):
                setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
            else:
                module._buffers[attr] = value
        self._after_materialize()

    def _initial_value(self, name: str, t: torch.Tensor, std: float, gen: torch.Generator | None) -> torch.Tensor:
        """Initial value of tensor ``name`` (drawn on the CPU): N(0, std) matrices, zero biases, unit norms; the
        prefix encoder as PyTorch initialises nn.Embedding (N(0, 1)) and nn.Linear (uniform +-1/sqrt(fan_in))."""
        shape = tuple(t.shape)
        if name.endswith("inv_freq"):
            return self._inv_freq(2 * shape[0])
        if name.startswith("transformer.prefix_encoder."):
            if "embedding" in name:
                return torch.empty(shape).normal_(0.0, 1.0, generator=gen)
            fan_in = shape[-1] if len(shape) == 2 else self.get_parameter(name[: -len("bias")] + "weight").shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            return torch.empty(shape).uniform_(-bound, bound, generator=gen)
        if name.endswith("layernorm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        return torch.empty(shape).normal_(0.0, std, generator=gen)

    def _tensors(self):
        yield from self.parameters()
        yield from self.buffers()

    def _named_tensors(self):
        yield from self.named_parameters()
        yield from self.named_buffers()

    # ---- P-Tuning prefix and KV cache ------------------------------------------------------------------------------
    def n_prefix(self) -> int:
        """P-Tuning prefix length (0 without a prefix encoder)."""
        if getattr(self.transformer, "prefix_encoder", None) is None:
            return 0
        return self.config.pre_seq_len or 0

    def prefix_key_values(
        self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """P-Tuning v2 keys/values per layer, each (b, heads, P, d), as the original ``get_prompt``: the encoder's
        (b, P, L * 2 * heads * d) read as (b, P, L * 2, heads, d), layer i taking entries 2i (keys), 2i + 1."""
        cfg, tr = self.config, self.transformer
        if self.n_prefix() == 0:
            raise RuntimeError("this model has no prefix encoder (config.pre_seq_len is not set)")
        flat = tr.prefix_encoder(batch_size).to(device=device, dtype=dtype)
        kv = flat.view(batch_size, cfg.pre_seq_len, cfg.num_layers * 2, self._num_cache_heads(), cfg.head_dim)
        kv = tr.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # (L * 2, b, heads, P, d)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_layers)]

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A KV cache for ``max_len`` tokens; with P-Tuning it also holds (and starts with) the prefix keys/values."""
        ref = self.output_embeddings().weight
        device = device if device is not None else ref.device
        dtype = dtype if dtype is not None else ref.dtype
        cfg = self.config
        n_prefix = self.n_prefix()
        cache = KVCache(
            cfg.num_layers, batch_size, self._num_cache_heads(), max_len + n_prefix, cfg.head_dim,
            dtype=dtype, device=device,
        )  # fmt: skip
        if n_prefix:
            for i, (k, v) in enumerate(self.prefix_key_values(batch_size, dtype=dtype, device=device)):
                cache.update(i, k, v)
            cache.advance(n_prefix)
        return cache

    # ---- rotary tables --------------------------------------------------------------------------------------------
    def prepare_static_decode(self, max_position: int, dtype: torch.dtype, device: torch.device) -> None:
        """Build the rotary table up to ``max_position`` now, so fixed-shape decode steps never resize it."""
        self._rope_table(max_position + 1, dtype, device)

    def _rope_table(self, n: int, dtype: torch.dtype, device: torch.device) -> Any:
        """The family's rotary table for at least ``n`` positions, built once per dtype/device and grown by doubling."""
        key = (dtype, device)
        entry = self._rope.get(key)
        if entry is None or entry[0] < n:
            size = max(n, self.config.seq_length, 2 * (entry[0] if entry is not None else 0))
            entry = (size, self._build_rope(size, dtype, device))
            self._rope[key] = entry
        return entry[1]

    # ---- forward --------------------------------------------------------------------------------------------------
    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, int, bool]:
        """Validate a forward's inputs; returns (position_ids, tokens already cached, static decode step)."""
        b, s = input_ids.shape
        static = cache is not None and cache.write_pos is not None  # fixed-shape decode step (see KVCache)
        past = cached_tokens(cache, self.n_prefix())
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + s):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                f"{(b, past + s)}"
            )
        if position_ids is None:
            if past:
                raise ValueError("position_ids are required once the cache holds tokens (use next_position_ids)")
            position_ids = self.prompt_position_ids(input_ids, attention_mask)
        want = self._position_shape(b, s)
        if tuple(position_ids.shape) != want:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {want}")
        return position_ids, past, static

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> logits (b, s', vocab) in the model's dtype (s' = logits_to_keep or s).

        The arguments are those of :meth:`hidden_states`.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, attn_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.output_embeddings()(h)
