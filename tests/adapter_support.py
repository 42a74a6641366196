"""Helpers shared by the adapter tests: tiny models of both architecture families and random inputs."""

from __future__ import annotations

import torch
from torch import nn

from glmtune.models import build_model
from glmtune.models.config import preset

# (preset, generation): ChatGLM-6B v1 and ChatGLM3 (the ChatGLM2+/GLM-4 architecture).
PRESETS = [("tiny-chatglm", "chatglm"), ("tiny-chatglm3", "chatglm3")]
PRESET_IDS = ["v1", "chatglm3"]


def tiny_model(preset_name: str, *, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """A random tiny model in eval mode (v1 with larger weights so its logits are not all alike)."""
    config = preset(preset_name)
    model = build_model(config, generation="chatglm2" if preset_name == "tiny-chatglm2" else None)
    model.init_weights(seed=seed, std=0.3 if config.arch == "glm" else 0.05)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def random_ids(model: nn.Module, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids below the special tokens of the tiny presets' vocabularies (and in range of the
    smaller vocabularies of tiny model folders)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(400, model.config.padded_vocab_size), (batch, length), generator=gen)


@torch.no_grad()
def randomize(params: list[tuple[str, nn.Parameter]], seed: int, std: float = 0.2) -> None:
    """Give adapter parameters random values (LoRA starts with B = 0, which would hide every mistake)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in params:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))


def make_adapter(base, out, seed: int, rank: int, targets: str) -> None:
    """A PEFT LoRA folder for ``base`` with random A and B (large enough to change the replies)."""
    from glmtune.adapters.lora import LoraSpec, find_targets, inject_lora
    from glmtune.adapters.peft_format import save_lora_adapter
    from glmtune.pretrained import load_pretrained

    p = load_pretrained(base, dtype="float32", device="cpu")
    layers = inject_lora(p.model, dict.fromkeys(find_targets(p.model, targets), LoraSpec(rank, 2.0 * rank)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    save_lora_adapter(p.model, out, target_modules=targets, dropout=0.0, base_model_name_or_path=str(base))
