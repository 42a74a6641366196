"""Decode speed of a ChatGLM3-6B-shaped model with random weights: glmtune's generate against HF transformers.

Builds glmtune's model from a preset (random bf16 weights, drawn on the device), generates ``--new-tokens`` tokens
greedily after a ``--prompt-len`` prompt for each batch size, and reports tokens/s per sequence and in total
(prefill excluded: the time to the first token is reported separately). The same shapes are then run through
transformers' own GLM port (``GlmForCausalLM``: the same architecture, partial rotary, grouped KV heads, SwiGLU)
when transformers is installed, as the alternative a user would otherwise reach for. Nothing is downloaded.

    python bench/decode_speed.py --preset chatglm3-6b --batch 1 8 --decode dynamic graph --json decode.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from glmtune.generate import GenerationConfig, generate_stream
from glmtune.models import build_model
from glmtune.models.config import preset


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def random_fill(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Materialise a meta model on ``device`` with N(0, 0.02) weights and unit norms (fast: drawn on the device)."""
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            n = b.shape[0] * 2
            b.copy_(1.0 / (10000 ** (torch.arange(0, n, 2, dtype=torch.float32) / n)))
    model.to(dtype)


def time_glmtune(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, decode: str) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, vocab - 10, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    _sync()
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in generate_stream(model, prompts, cfg, stop_ids=[], pad_id=0, decode=decode):
        steps += 1
        if first is None:
            _sync()
            first = time.perf_counter()
    _sync()
    end = time.perf_counter()
    decode_s = end - first
    return {
        "impl": f"glmtune decode={decode}", "batch": batch, "prompt_len": prompt_len, "new_tokens": steps,
        "first_token_s": first - start, "decode_s": decode_s,
        "tokens_per_s_per_seq": (steps - 1) / decode_s, "tokens_per_s_total": batch * (steps - 1) / decode_s,
    }  # fmt: skip


def hf_model(cfg, device, dtype):
    from transformers import GlmConfig, GlmForCausalLM

    hf_cfg = GlmConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, partial_rotary_factor=0.5,
        attention_bias=cfg.add_qkv_bias, rms_norm_eps=cfg.layernorm_epsilon, max_position_embeddings=cfg.seq_length,
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    with torch.device("meta"):
        model = GlmForCausalLM(hf_cfg)
    random_fill(model, device, dtype, seed=0)
    return model.eval()


def time_hf(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, vocab - 10, (batch, prompt_len), generator=g).to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n: int) -> float:
        _sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        _sync()
        return time.perf_counter() - t

    one = run(1)  # prefill + first token
    full = run(new_tokens)
    decode_s = full - one
    return {
        "impl": "transformers GlmForCausalLM", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "first_token_s": one, "decode_s": decode_s,
        "tokens_per_s_per_seq": (new_tokens - 1) / decode_s, "tokens_per_s_total": batch * (new_tokens - 1) / decode_s,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--decode", nargs="+", default=["dynamic", "graph"], help="glmtune decode modes to time")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    cfg = preset(args.preset)
    rows = []
    model = build_model(cfg, device="meta", generation="chatglm3")
    random_fill(model, device, dtype, seed=0)
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for decode in args.decode:
        for b in args.batch:
            time_glmtune(model, b, 16, 8, cfg.padded_vocab_size, decode)  # warm-up
            rows.append(time_glmtune(model, b, args.prompt_len, args.new_tokens, cfg.padded_vocab_size, decode))
            print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    if not args.no_hf:
        try:
            hf = hf_model(cfg, device, dtype)
            for b in args.batch:
                time_hf(hf, b, 16, 8, cfg.padded_vocab_size, device)  # warm-up
                rows.append(time_hf(hf, b, args.prompt_len, args.new_tokens, cfg.padded_vocab_size, device))
                print(rows[-1], flush=True)
        except Exception as e:  # the comparison is optional; say why it is missing
            rows.append({"impl": "transformers GlmForCausalLM", "error": repr(e)[:500]})
            print(rows[-1], flush=True)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "preset": args.preset, "dtype": args.dtype, "weight_bytes": weight_bytes,
    }  # fmt: skip
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    print("| impl | batch | first token s | decode tok/s per seq | decode tok/s total |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['impl']} | {r['batch']} | {r['first_token_s']:.3f} | {r['tokens_per_s_per_seq']:.1f} | "
                  f"{r['tokens_per_s_total']:.1f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
