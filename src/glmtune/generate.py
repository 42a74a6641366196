"""Token generation with a KV cache: greedy and sampling, stop sets, left-padded batches, streaming.

Works for every model family through four model methods: ``new_cache``, ``prompt_position_ids``,
``next_position_ids`` and ``forward(input_ids, attention_mask, position_ids, cache, logits_to_keep)``.

A batch gives exactly the tokens each prompt gives alone: prompts are left-padded (padding is masked out and
positions restart at each prompt's first real token) and every row samples from its own random generator
seeded from ``seed``, so what a row draws never depends on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


# ---- logits processing (one row or a batch, float32 logits (b, V)) ------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """As in CTRL / HF: a seen token's logit is divided by ``penalty`` if positive, multiplied if negative.

    ``seen`` is a bool (b, V) mask of tokens present in the row's prompt or output.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False  # keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_next(
    logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Next token per row from float32 logits (b, V) -> (b,)."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(dim=-1)
    assert generators is not None
    # One draw per row from that row's own generator: a row's samples do not depend on the batch.
    return torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0] for i in range(probs.shape[0])])


# ---- the loop ------------------------------------------------------------------------------------------
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (b, s), attention_mask (b, s) with padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.inference_mode()
def generate_stream(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (b,) long on CPU, until each row has stopped or max_new_tokens.

    A row that has stopped keeps yielding ``-1``; the stop token itself is not yielded.
    """
    cfg.validate()
    device, dtype = _model_device_dtype(model)
    input_ids, attention_mask = left_pad(prompts, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    b, s = input_ids.shape
    vocab = model.config.padded_vocab_size

    cache = model.new_cache(b, s + cfg.max_new_tokens, device=device, dtype=dtype)
    position_ids = model.prompt_position_ids(input_ids, attention_mask)
    generators = None
    if cfg.do_sample:
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(b)]
    seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)
    if cfg.repetition_penalty != 1.0:
        seen.scatter_(1, input_ids, attention_mask.bool())
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
    for _ in range(cfg.max_new_tokens):
        next_ids = choose_next(logits[:, -1].float(), cfg, seen, generators)
        done = done | torch.isin(next_ids, stop)
        out = torch.where(done, torch.full_like(next_ids, -1), next_ids)
        yield out.cpu()
        if bool(done.all()):
            return
        seen[torch.arange(b, device=device), next_ids] = True
        attention_mask = torch.cat([attention_mask, torch.ones((b, 1), dtype=attention_mask.dtype, device=device)], 1)
        position_ids = model.next_position_ids(position_ids[..., -1:])
        logits = model(
            next_ids[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1
        )


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts; returns each row's new tokens (stop token excluded)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, cfg, stop_ids=stop_ids, pad_id=pad_id):
        if on_token is not None:
            on_token(step)
        for i, t in enumerate(step.tolist()):
            if t >= 0:
                outputs[i].append(t)
    return outputs
