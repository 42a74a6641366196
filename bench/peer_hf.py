"""The peer the benchmarks compare with: transformers' own port of this architecture (``GlmForCausalLM``: partial
rotary, grouped KV heads, SwiGLU, RMSNorm) with PEFT adapters, as a user of the transformers stack would train it.

Shapes come from glmtune's ``GLMConfig``; weights are random, drawn on the device. The training step is the plain
loop a user writes (HF's loss from ``labels``, AdamW fused, clipping at 1.0); HF's Trainer is not used, so neither
side pays for a framework's bookkeeping.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from benchlib import random_fill

from glmtune.models.config import GLMConfig

HF_QKV = ["q_proj", "k_proj", "v_proj"]  # HF's names for the layers inside ChatGLM's fused query_key_value


def hf_config(cfg: GLMConfig, *, use_cache: bool = True):
    from transformers import GlmConfig

    if cfg.arch != "chatglm":
        raise ValueError("transformers' GlmForCausalLM ports ChatGLM2/3 and GLM-4 (arch 'chatglm'), not ChatGLM-6B v1")
    return GlmConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, partial_rotary_factor=0.5,
        attention_bias=cfg.add_qkv_bias, rms_norm_eps=cfg.layernorm_epsilon, max_position_embeddings=cfg.seq_length,
        pad_token_id=0, eos_token_id=None, bos_token_id=None, use_cache=use_cache,
    )  # fmt: skip


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def hf_model(
    cfg: GLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, *, use_cache: bool = True
) -> torch.nn.Module:
    """``GlmForCausalLM`` with ``cfg``'s shapes, random weights in ``dtype`` on ``device`` (SDPA attention).

    ``use_cache=False`` for training: without a cache, transformers reads packed rows from the position ids."""
    from transformers import GlmForCausalLM

    hf_cfg = hf_config(cfg, use_cache=use_cache)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"), _default_dtype(dtype):  # allocated once, in the target dtype
        model = GlmForCausalLM(hf_cfg)
    random_fill(model, device, dtype, seed=seed)
    return model


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """glmtune's ChatGLM2+ weights under ``GlmForCausalLM``'s names: the fused query_key_value split into q/k/v,
    dense_h_to_4h is HF's gate_up_proj (gate first in both), the rest renamed. For the parity test: the same
    weights must give the same loss in both implementations, or the benchmark would compare different models."""
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        parts = name.split(".")
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = t
        elif name.startswith("transformer.encoder.final_layernorm."):
            out["model.norm." + parts[-1]] = t
        elif name.startswith("transformer.encoder.layers."):
            layer, rest = f"model.layers.{parts[3]}.", ".".join(parts[4:])
            if rest.startswith("self_attention.query_key_value."):
                kind = parts[-1]
                for proj, part in zip(HF_QKV, t.split([q, kv, kv]), strict=True):
                    out[f"{layer}self_attn.{proj}.{kind}"] = part
            else:
                renames = {"self_attention.dense.": "self_attn.o_proj.", "mlp.dense_h_to_4h.": "mlp.gate_up_proj.",
                           "mlp.dense_4h_to_h.": "mlp.down_proj.", "input_layernorm.": "input_layernorm.",
                           "post_attention_layernorm.": "post_attention_layernorm."}  # fmt: skip
                prefix = next(k for k in renames if rest.startswith(k))
                out[layer + renames[prefix] + rest[len(prefix) :]] = t
        else:
            raise KeyError(f"no transformers name for glmtune weight {name!r}")
    return out


class HFStep:
    """One optimizer step of ``GlmForCausalLM`` (+ PEFT LoRA unless ``method="full"``), bf16 autocast."""

    def __init__(
        self,
        cfg: GLMConfig,
        *,
        method: str,
        device: torch.device,
        precision: torch.dtype,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        lr: float = 3e-4,
        max_grad_norm: float = 1.0,
    ) -> None:
        if method not in ("lora", "full"):
            raise ValueError(f"the transformers peer runs lora or full, not {method!r}")
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)
        model = hf_model(cfg, device, torch.float32 if method == "full" else precision, use_cache=False)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = lora or {}
            # PEFT keeps the adapter weights in float32 over a bf16 base (autocast_adapter_dtype), as glmtune does
            model = get_peft_model(model, LoraConfig(
                r=lora.get("rank", 8), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.1),
                target_modules=HF_QKV, task_type="CAUSAL_LM",
            ))  # fmt: skip
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, fused=device.type == "cuda")
        self.max_grad_norm = max_grad_norm
        self.forward = torch.compile(model) if compile else model

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast:
            loss = self.forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def hf_batch(batch: dict[str, torch.Tensor], packed: bool) -> dict[str, torch.Tensor]:
    """The inputs HF takes from one of glmtune's collated batches: the same ids, labels (unshifted, -100 where
    untrained; HF shifts them as glmtune does) and positions. Padded rows keep their attention mask; packed rows
    pass position ids that restart at every sample and no mask, from which transformers builds the block-diagonal
    causal mask of packed sequences."""
    out = {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
    if not packed:
        out["attention_mask"] = batch["attention_mask"]
    return out
