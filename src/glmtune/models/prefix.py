"""P-Tuning v2 prefix encoder, shared by every generation.

The original ``PrefixEncoder`` maps the prefix positions 0..P-1 to one long vector per position holding, for every
layer, a key and a value: (b, P, num_layers * 2 * kv_dim). The models read it as (b, P, num_layers * 2, n_kv, d),
layer i taking entry 2i as keys and 2i + 1 as values.

Parameter names are the original ones (``embedding.weight``; with projection ``trans.0.*`` and ``trans.2.*``), so a
checkpoint holding only ``transformer.prefix_encoder.*`` (the official P-Tuning v2 format) loads as is.

The two generations differ in the projection's input width: ChatGLM-6B embeds the prefix in ``hidden_size`` and
projects hidden -> hidden -> layers * 2 * hidden; ChatGLM2/3 and GLM-4 embed it in the full key/value width and
project kv -> hidden -> kv. ``embedding_dim`` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from glmtune.models.config import GLMConfig


class PrefixEncoder(nn.Module):
    def __init__(
        self,
        *,
        pre_seq_len: int,
        num_layers: int,
        kv_dim: int,
        hidden_size: int,
        prefix_projection: bool = False,
        embedding_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """kv_dim: width of one layer's keys (n_kv * d). embedding_dim: width of the embedding when projecting
        (default ``hidden_size``, ChatGLM-6B; ChatGLM2+ pass ``num_layers * 2 * kv_dim``)."""
        super().__init__()
        if pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive, got {pre_seq_len}")
        kw = {"device": device, "dtype": dtype}
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.out_dim = num_layers * 2 * kv_dim
        if prefix_projection:
            emb = embedding_dim if embedding_dim is not None else hidden_size
            self.embedding = nn.Embedding(pre_seq_len, emb, **kw)
            self.trans = nn.Sequential(
                nn.Linear(emb, hidden_size, **kw),
                nn.Tanh(),
                nn.Linear(hidden_size, self.out_dim, **kw),
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, self.out_dim, **kw)
            self.trans = None

    def forward(self, batch_size: int) -> torch.Tensor:
        """-> (b, P, num_layers * 2 * kv_dim), in the encoder's own dtype (fp32 while training)."""
        ids = torch.arange(self.pre_seq_len, device=self.embedding.weight.device)
        out = self.embedding(ids)  # (P, emb)
        if self.trans is not None:
            out = self.trans(out)  # (P, out_dim)
        return out.unsqueeze(0).expand(batch_size, -1, -1)


def make_prefix_encoder(
    config: GLMConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> PrefixEncoder:
    """The prefix encoder the original model of ``config``'s generation builds (``config.pre_seq_len`` set).

    ChatGLM-6B embeds the prefix in ``hidden_size``; ChatGLM2+ in the full key/value width of all layers."""
    if config.pre_seq_len is None:
        raise ValueError("config.pre_seq_len is not set")
    kv_dim = config.num_kv_heads * config.head_dim
    return PrefixEncoder(
        pre_seq_len=config.pre_seq_len,
        num_layers=config.num_layers,
        kv_dim=kv_dim,
        hidden_size=config.hidden_size,
        prefix_projection=config.prefix_projection,
        embedding_dim=None if config.arch == "glm" else config.num_layers * 2 * kv_dim,
        device=device,
        dtype=dtype,
    )
