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
from typing import Any

import torch
from torch import nn

DECODE_MODES = ("auto", "dynamic", "static", "graph")


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
    decode: str = "auto",
    row_seeds: Sequence[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (b,) long on CPU, until each row has stopped or max_new_tokens.

    A row that has stopped keeps yielding ``-1``; the stop token itself is not yielded.
    decode: "dynamic" (attend over the filled part of the cache), "static" (fixed shapes: attend over the whole
    preallocated cache with a key mask), "graph" (static, each step replayed as one CUDA graph: removes the kernel
    launch cost that bounds small-batch decoding), "auto" (graph on CUDA, else dynamic). All give the same tokens.
    row_seeds: one sampling seed per prompt (default: every row uses ``cfg.seed``), e.g. seed + example index so
    examples of one batch draw independently while each row still gives what it gives alone with its seed.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
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
        seeds = list(row_seeds) if row_seeds is not None else [seed] * b
        if len(seeds) != b:
            raise ValueError(f"row_seeds has {len(seeds)} seeds for {b} prompts")
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    seen = torch.zeros((b, vocab), dtype=torch.bool, device=device)
    if cfg.repetition_penalty != 1.0:
        seen.scatter_(1, input_ids, attention_mask.bool())
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)

    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "dynamic"
    stepper = None
    if decode != "dynamic":
        max_position = int(position_ids.max()) + cfg.max_new_tokens + 1
        stepper = StaticDecodeStep(model, cache, attention_mask, max_position, use_graph=decode == "graph")
    for step in range(cfg.max_new_tokens):
        next_ids = choose_next(logits[:, -1].float(), cfg, seen, generators)
        done = done | torch.isin(next_ids, stop)
        out = torch.where(done, torch.full_like(next_ids, -1), next_ids)
        yield out.cpu()
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            return
        seen[torch.arange(b, device=device), next_ids] = True
        position_ids = model.next_position_ids(position_ids[..., -1:])
        if stepper is not None:
            logits = stepper(next_ids[:, None], position_ids)
            continue
        attention_mask = torch.cat([attention_mask, torch.ones((b, 1), dtype=attention_mask.dtype, device=device)], 1)
        logits = model(
            next_ids[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1
        )


class StaticDecodeStep:
    """One decode step with fixed shapes, optionally replayed as a CUDA graph.

    Keys/values go to the cache slot ``write_pos`` (a device tensor) and every step attends over the whole
    preallocated cache through a key mask (b, 1, 1, max_len): the prefix, the prompt's real tokens and each token
    written so far. Inputs are copied into static tensors, so a captured graph can be replayed step after step.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        attention_mask: torch.Tensor,  # (b, s) of the prompt
        max_position: int,
        *,
        use_graph: bool,
    ) -> None:
        device = attention_mask.device
        b, s = attention_mask.shape
        n_before = cache.length - s  # the P-Tuning prefix, if any
        self.model, self.cache = model, cache
        self.key_mask = torch.zeros((b, 1, 1, cache.max_len), dtype=torch.bool, device=device)
        self.key_mask[:, 0, 0, :n_before] = True
        self.key_mask[:, 0, 0, n_before : n_before + s] = attention_mask.bool()
        self.write_pos = torch.tensor([cache.length], dtype=torch.long, device=device)
        self.ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.graph: Any = None
        self.use_graph = use_graph and device.type == "cuda"
        model.prepare_static_decode(max_position, next(model.parameters()).dtype, device)

    def _forward(self) -> torch.Tensor:
        self.cache.write_pos = self.write_pos
        try:
            return self.model(self.ids, position_ids=self.positions, cache=self.cache, attn_mask=self.key_mask,
                              logits_to_keep=1)  # fmt: skip
        finally:
            self.cache.write_pos = None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (b, 1), positions (b, 1) or (b, 2, 1) -> logits (b, 1, vocab)."""
        if self.ids is None:
            self.ids, self.positions = ids.clone(), positions.clone()
        else:
            self.ids.copy_(ids)
            self.positions.copy_(positions)
        self.key_mask.index_fill_(3, self.write_pos, True)  # the new token sees itself
        if not self.use_graph:
            logits = self._forward()
        elif self.graph is None:
            # warm up on a side stream (this computes the real first step), then capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            logits = logits.clone()
        else:
            self.graph.replay()
            logits = self.logits.clone()
        self.write_pos += 1
        return logits


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    on_token: Callable[[torch.Tensor], None] | None = None,
    decode: str = "auto",
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts; returns each row's new tokens (stop token excluded)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(
        model, prompts, cfg, stop_ids=stop_ids, pad_id=pad_id, decode=decode, row_seeds=row_seeds
    ):
        if on_token is not None:
            on_token(step)
        for i, t in enumerate(step.tolist()):
            if t >= 0:
                outputs[i].append(t)
    return outputs
