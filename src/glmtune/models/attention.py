"""Attention pieces shared by both architecture families: the KV cache and the SDPA call.

Layouts: queries (b, n_head, s, d); keys/values (b, n_kv, t, d). A boolean mask is True where a query may
attend (SDPA's convention), shaped (b, 1, s, t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated keys/values for every layer; ``length`` tokens (prefix included) are filled.

    Shape per layer: (b, n_kv, max_len, d). Filling writes in place, so decoding does not reallocate.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens stored so far, the same in every layer
        self.max_len = max_len
        # Static mode (fixed-shape decode steps, CUDA-graph friendly): a (1,) long tensor on the cache's device,
        # the slot the next token goes to; ``update`` then writes there and returns the whole buffers.
        self.write_pos: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, n_kv, s, d) after the current ``length`` and return all keys/values so far.

        ``length`` is advanced by :meth:`advance` once every layer has been updated.
        """
        if self.write_pos is not None:
            self.keys[layer].index_copy_(2, self.write_pos, k)
            self.values[layer].index_copy_(2, self.write_pos, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. to drop finished sequences)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def cached_tokens(cache: KVCache | None, n_prefix: int) -> int:
    """Tokens already in ``cache`` besides the P-Tuning prefix (0 without a cache, or in static mode)."""
    if cache is None or cache.write_pos is not None:
        return 0
    past = cache.length - n_prefix
    if past < 0:
        raise ValueError(
            f"the KV cache holds {cache.length} tokens, fewer than the {n_prefix} P-Tuning prefix tokens; "
            "create it with model.new_cache()"
        )
    return past


def explicit_mask(attn_mask: torch.Tensor, cache: KVCache | None, past: int, s: int, n_prefix: int) -> torch.Tensor:
    """A caller's bool mask (b, 1, s, past + s) or (b, 1, s, P + past + s) -> with the prefix columns, and no empty
    rows. In static mode it must cover the whole cache: (b, 1, s, cache.max_len)."""
    mask = attn_mask.bool()
    if cache is not None and cache.write_pos is not None:
        if mask.shape[-1] != cache.max_len:
            raise ValueError(f"attn_mask has {mask.shape[-1]} key columns, expected the cache's {cache.max_len}")
        return mask
    if mask.shape[-1] == past + s and n_prefix:
        ones = torch.ones((*mask.shape[:-1], n_prefix), dtype=torch.bool, device=mask.device)
        mask = torch.cat([ones, mask], dim=-1)
    if mask.shape[-1] != n_prefix + past + s:
        raise ValueError(f"attn_mask has {mask.shape[-1]} key columns, expected {past + s} (+ prefix)")
    return mask | ~mask.any(-1, keepdim=True)


def expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(b, n_kv, t, d) -> (b, n_head, t, d): query head h uses KV group h // (n_head // n_kv)."""
    n_kv = x.shape[1]
    if n_kv == n_head:
        return x
    b, _, t, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_head // n_kv, t, d).reshape(b, n_head, t, d)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool = False
) -> torch.Tensor:
    """SDPA with grouped KV heads. q (b, h, s, d); k, v (b, n_kv, t, d); mask bool (b, 1, s, t) or None."""
    n_head = q.shape[1]
    k, v = expand_kv(k, n_head), expand_kv(v, n_head)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
