"""What both architecture families (``glm.py``, ``chatglm.py``) share, so neither file repeats the other.

``CausalLMBase`` holds the family-independent parts of a model: random and missing-tensor initialisation, the KV
cache (which starts with the P-Tuning prefix keys/values), the rotary-table cache, the forward pass over a
:class:`~glmtune.models.layout.SequenceLayout` (layout -> mask -> blocks -> final norm) and ``forward`` =
``hidden_states`` + output layer. A family supplies the rest through a few hooks: ``output_embeddings``,
``_embed``, ``_blocks``, ``_final_norm``, ``_rope``, ``_inv_freq``, ``_build_rope`` and ``_num_cache_heads``, plus
``_after_materialize`` where it must re-tie weights.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from glmtune.models.attention import KVCache
from glmtune.models.config import GLMConfig
from glmtune.models.layout import (
    SequenceLayout,
    context_from_ids,
    next_positions,
    positions_from_mask,
)
from glmtune.models.masks import BACKENDS, AttentionMask, build_mask


class CausalLMBase(nn.Module):
    config: GLMConfig

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self._rope_tables: dict[tuple[torch.dtype, torch.device], tuple[int, Any]] = {}  # -> (positions, table)
        self.attention_backend = "sdpa"  # or "flex" / "varlen" (masks.BACKENDS; they pay off under torch.compile)

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def output_embeddings(self) -> nn.Linear:
        raise NotImplementedError

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rope(self, positions: torch.Tensor, table: Any) -> Any:
        """The family's rotary operands for ``positions`` from its ``table``."""
        raise NotImplementedError

    def _inv_freq(self, rot_dim: int) -> torch.Tensor:
        """The ``inv_freq`` buffer as the family's original checkpoints store it."""
        raise NotImplementedError

    def _build_rope(self, n: int, dtype: torch.dtype, device: torch.device) -> Any:
        raise NotImplementedError

    def _num_cache_heads(self) -> int:
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
            self._rope_tables.clear()
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
            cache.write_prefix(self.prefix_key_values(batch_size, dtype=dtype, device=device))
        return cache

    # ---- positions and rotary tables ------------------------------------------------------------------------------
    def prompt_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Positions of (b, s) prompt ids, left-padded where ``attention_mask`` is 0 (``positions_from_mask``)."""
        return positions_from_mask(input_ids, attention_mask, self.config)

    def next_position_ids(self, last: torch.Tensor) -> torch.Tensor:
        """Positions of the last token -> those of the next (``layout.next_positions``)."""
        return next_positions(last)

    def reserve_positions(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """Build the rotary table for ``n`` positions now, so later steps (captured, compiled) never resize it."""
        self._rope_table(n, dtype, torch.device(device))

    def _rope_table(self, n: int, dtype: torch.dtype, device: torch.device) -> Any:
        """The family's rotary table for at least ``n`` positions (and ``seq_length``), built once per dtype/device
        and grown by doubling."""
        key = (dtype, device)
        entry = self._rope_tables.get(key)
        if entry is None or entry[0] < n:
            size = max(n, self.config.seq_length, 2 * (entry[0] if entry is not None else 0))
            entry = (size, self._build_rope(size, dtype, device))
            self._rope_tables[key] = entry
        return entry[1]

    def set_attention_backend(self, backend: str) -> None:
        """The form masks take (``masks.build_mask``): "sdpa" (default), "flex" or "varlen" (compiled, on CUDA)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.attention_backend = backend

    # ---- forward --------------------------------------------------------------------------------------------------
    def make_layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> SequenceLayout:
        """The layout of a forward given the convenience arguments (one sample per row, left padding marked 0 in
        ``attention_mask`` (b, cached + s); or packed rows through ``segment_ids`` (b, s), -1 on padding)."""
        b, s = input_ids.shape
        if max_seqlen is not None and cu_seqlens is None:
            raise ValueError("max_seqlen bounds the runs of cu_seqlens: give both (the collator's) or neither")
        n_prefix = self.n_prefix()
        past = 0 if cache is None else cache.length - n_prefix
        if past < 0:
            raise ValueError(f"the KV cache holds {cache.length} tokens, fewer than the {n_prefix} P-Tuning prefix "
                             "tokens; create it with model.new_cache()")  # fmt: skip
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + s):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new tokens) = "
                f"{(b, past + s)}"
            )
        new_mask = attention_mask[:, past:] if attention_mask is not None else None
        max_position = None
        if position_ids is None:
            if past:
                raise ValueError("position_ids are required once the cache holds tokens (use next_position_ids)")
            position_ids = positions_from_mask(input_ids, new_mask, self.config)
            max_position = s
        want = (b, 2, s) if self.config.arch == "glm" else (b, s)
        if tuple(position_ids.shape) != want:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {want}")
        if context is None and segment_ids is None:  # one sample per row: v1's context ends at its <sop>
            context = context_from_ids(input_ids, self.config, starts_sample=past == 0)
        if segment_ids is None and new_mask is not None:
            segment_ids = torch.where(new_mask.bool(), 0, -1)
        return SequenceLayout(position_ids, segment_ids, context, max_position=max_position, runs=cu_seqlens,
                              max_run=max_seqlen)  # fmt: skip

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        layout: SequenceLayout | None = None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> final hidden states (b, s, H) (after the final norm), in the model's dtype.

        Give ``layout`` (``glmtune.models.layout``), or let :meth:`make_layout` build it: attention_mask (b, cached +
        s), 1 for real tokens, 0 for padding; position_ids (b, s) / (b, 2, s), computed when None and nothing is
        cached; segment_ids (b, s) for packed rows (sample index in the row, -1 on padding); context (b, s) bool for
        v1's bidirectional prompt (computed from ``<sop>`` when None); cu_seqlens: the collator's runs of packed 1-D
        rows and max_seqlen, a bound on their lengths (``masks.packed_runs``), used by the "varlen" attention
        backend. With ``cache`` the tokens' keys/values go to the layout's slots (default: the cache's next free
        slots) and attention covers the whole cache.
        """
        if layout is None:
            layout = self.make_layout(input_ids, attention_mask, position_ids, cache, segment_ids, context, cu_seqlens,
                                      max_seqlen)  # fmt: skip
        b, s = input_ids.shape
        if layout.shape != (b, s):
            raise ValueError(f"layout is for {layout.shape} tokens, input_ids are {(b, s)}")
        n_prefix = self.n_prefix()
        h = self._embed(input_ids)  # (b, s, H)
        n = layout.max_position + 1 if layout.max_position is not None else 0
        rope = self._rope(layout.positions, self._rope_table(n, h.dtype, h.device))
        slots = None
        if cache is not None:
            slots = layout.slots if layout.slots is not None else cache.next_slots(s)
            segments = layout.segments if layout.segments is not None else torch.zeros_like(slots)
            cache.write_tokens(slots, segments, layout.context)
            layout = replace(layout, slots=slots, segments=segments)
        backend = self.attention_backend if cache is None else "sdpa"  # decode steps: a small dense mask
        mask = build_mask(layout, n_prefix=n_prefix, cache=cache, backend=backend, device=h.device)
        prefix = None
        if n_prefix and cache is None:
            prefix = self.prefix_key_values(b, dtype=h.dtype, device=h.device)
        checkpointing = self.transformer.gradient_checkpointing and self.training and cache is None
        for i, layer in enumerate(self._blocks()):
            layer_prefix = prefix[i] if prefix is not None else None
            if checkpointing:
                h = checkpoint(layer, h, rope, mask, None, None, layer_prefix, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache, slots, layer_prefix)
        return self._final_norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        layout: SequenceLayout | None = None,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> logits (b, s', vocab) in the model's dtype (s' = logits_to_keep or s).

        The arguments are those of :meth:`hidden_states`.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, segment_ids=segment_ids,
                               context=context, layout=layout)  # fmt: skip
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.output_embeddings()(h)


__all__ = ["AttentionMask", "CausalLMBase"]
