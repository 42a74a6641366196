"""Decode speed of a ChatGLM3-6B-shaped model with random weights: glmtune's generate against HF transformers.

Both models are built in the same process with the same shapes (transformers' own port of the architecture,
``GlmForCausalLM``: partial rotary, grouped KV heads, SwiGLU) and random bf16 weights drawn on the device. For each
batch size, after a warm-up generation, greedy decoding of ``--new-tokens`` tokens after a ``--prompt-len`` prompt
(no stop token) is timed whole, and a 1-token generation of the same prompts gives the prefill time; decode
tok/s = (new tokens - 1) / (whole - prefill), per sequence and in total. glmtune's warm-up has the timed length
(it captures a CUDA graph per cache size, once; the warm-up time is reported). glmtune runs each ``--decode`` mode
("auto" is its default) with each ``--matvec`` path for one-row products ("auto" is its default: the Triton
kernel on CUDA; "torch" cuBLAS; "inductor" inductor's own, compiled mode only) and each ``--attention`` path over
the cache ("auto" is its default: the Triton split-over-the-keys kernel on CUDA; "sdpa" SDPA), or the
``--variants`` named (decode:matvec:attention, the last parts optional). Nothing is downloaded.

    PYTHONPATH=src python bench/decode_speed.py --json bench/results/decode_speed.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib import device_info, free_memory, markdown_table, random_fill, sync, write_json  # noqa: E402

from glmtune.generate import Decoder, GenerationConfig, generate_stream  # noqa: E402
from glmtune.models import build_model  # noqa: E402
from glmtune.models.config import preset  # noqa: E402

log = logging.getLogger("decode_speed")


def prompts_for(batch: int, prompt_len: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(10, vocab - 10, (batch, prompt_len), generator=g)


def timed(generate: Callable[[int], int], new_tokens: int, device: torch.device, warmup_tokens: int) -> dict:
    """Prefill (a 1-token run) and whole-run times of ``generate(n) -> tokens made per row``, after a warm-up run of
    ``warmup_tokens`` (its time is kept: it holds one-time costs such as capturing CUDA graphs for the shapes) and an
    untimed 1-token run. ``whole_tokens_per_s``: tokens per second over the whole run, prefill included (immune to an
    outlying 1-token run, which the decode rate subtracts)."""

    def run(n: int) -> tuple[float, int]:
        sync(device)
        t = time.perf_counter()
        made = generate(n)
        sync(device)
        return time.perf_counter() - t, made

    warmup_s, _ = run(warmup_tokens)
    run(1)  # the 1-token run's own shapes warmed too: a first one can take 0.7 s and inflate decode tok/s
    first, _ = run(1)
    whole, made = run(new_tokens)
    decode_s = whole - first
    return {"new_tokens": made, "warmup_s": warmup_s, "first_token_s": first, "whole_s": whole, "decode_s": decode_s,
            "tokens_per_s_per_seq": (made - 1) / decode_s,
            "whole_tokens_per_s": made / whole}  # fmt: skip


def glmtune_generate(model, ids: torch.Tensor, decode: str, matvec: str = "auto",
                     attention: str = "auto") -> Callable[..., int]:  # fmt: skip
    """glmtune as chat, eval and a server run it: one Decoder kept across calls (buffers and captured step reused).
    ``generate(n, stop_after)``: a generation of ``n`` new tokens, left after ``stop_after`` of them if given (the
    same cache size, hence the same captured step, as the whole run)."""
    prompts = ids.tolist()
    decoder = Decoder(model, decode=decode, matvec=matvec, attention=attention)

    def generate(n: int, stop_after: int | None = None) -> int:
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False)
        made = 0
        for _ in generate_stream(model, prompts, cfg, stop_ids=[], pad_id=0, decoder=decoder):
            made += 1
            if made == stop_after:
                break
        return made

    generate.decoder = decoder  # profiled() counts the steps it ran
    return generate


def hf_generate(model, ids: torch.Tensor) -> Callable[[int], int]:
    mask = torch.ones_like(ids)

    def generate(n: int) -> int:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
        return out.shape[1] - ids.shape[1]

    return generate


COLUMNS = [("impl", "impl", ""), ("batch", "batch", "d"), ("warm-up s", "warmup_s", ".2f"),
           ("first token s", "first_token_s", ".3f"),
           ("decode tok/s per seq", "tokens_per_s_per_seq", ",.1f"),
           ("whole-run tok/s per seq", "whole_tokens_per_s", ",.1f"),
           ("decode tok/s total", "tokens_per_s_total", ",.1f")]  # fmt: skip


def profiled(run: Callable[..., int], new_tokens: int, tokens: int, title: str) -> dict:
    """Kernel time and launches per token of ``run``'s first ``tokens`` tokens (prefill included) under the profiler,
    its top kernels printed. A token is the prefill's first one or a decode step run: the stream queues a group of
    steps ahead of the tokens it hands out, so stopping after ``tokens`` has run a few more steps, counted too."""
    from profile_decode import kernel_profile, top_kernels

    decoder = run.decoder
    before = decoder.steps
    totals, prof = kernel_profile(lambda: run(new_tokens, tokens), 1)
    made = 1 + decoder.steps - before
    summary = {k: v / made for k, v in totals.items()}
    print(f"== {title}: {summary}\n{top_kernels(prof, 12, 70)}", flush=True)
    return summary


def matvec_configs() -> dict[str, str]:
    """The Triton matrix-vector kernel's measured blocks, if it ran ((out, in, dtype, bias, device) -> config)."""
    gemv = sys.modules.get("glmtune.models.gemv")
    return {str(k): str(v) for k, v in gemv.tuned_configs().items()} if gemv is not None else {}


def table(rows: list[dict]) -> str:
    return markdown_table([r for r in rows if "error" not in r], COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--decode", nargs="+", default=["auto", "graph"], help="glmtune decode modes (auto: default)")
    ap.add_argument(
        "--matvec",
        nargs="+",
        default=["auto"],
        help="one-row product paths (auto, torch, triton, inductor; inductor with --decode compiled only)",
    )
    ap.add_argument("--attention", nargs="+", default=["auto"], help="cache attention paths (auto, sdpa, triton)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="DECODE[:MATVEC[:ATTENTION]]",
        help="glmtune runs as decode:matvec:attention (missing parts: auto), instead of every combination of "
        "--decode, --matvec and --attention",
    )
    ap.add_argument(
        "--profile-batch",
        type=int,
        nargs="*",
        default=[],
        help="batch sizes whose glmtune runs are also profiled (kernel time per token, top kernels)",
    )
    ap.add_argument("--profile-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None, help="kept in the JSON (e.g. the glmtune commit measured)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = preset(args.preset)
    info = {**device_info(device), "preset": args.preset, "dtype": str(dtype), "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "command": " ".join(sys.argv), "note": args.note}  # fmt: skip
    rows: list[dict] = []

    def save() -> None:
        if args.json:
            write_json(args.json, {"info": info, "rows": rows})
            args.json.with_suffix(".md").write_text(table(rows) + "\n")

    def add(row: dict) -> None:
        rows.append(row)
        log.info("%s", row)
        save()  # after every row: a command cut short keeps its rows

    model = build_model(cfg, device=device, dtype=dtype, generation="chatglm3")
    random_fill(model, device, dtype, seed=0)
    model.eval()
    info["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.variants:
        variants = [tuple((v.split(":") + ["auto", "auto"])[:3]) for v in args.variants]
    else:
        variants = [(d, m, a) for d in args.decode for m in args.matvec for a in args.attention
                    if m != "inductor" or d == "compiled"]  # fmt: skip
    for decode, matvec, attention in variants:
        for b in args.batch:
            ids = prompts_for(b, args.prompt_len, cfg.padded_vocab_size)
            # warm-up at the timed length: glmtune captures a CUDA graph per cache size, once
            run = glmtune_generate(model, ids, decode, matvec, attention)
            r = timed(run, args.new_tokens, device, warmup_tokens=args.new_tokens)
            if b in args.profile_batch:
                title = f"{decode} {matvec} {attention} batch {b}"
                r.update(profiled(run, args.new_tokens, args.profile_tokens, title))
            add(
                {
                    "impl": f"glmtune decode={decode}"
                    + (f" matvec={matvec}" if matvec != "auto" else "")
                    + (f" attention={attention}" if attention != "auto" else ""),
                    "batch": b,
                    **r,
                    "tokens_per_s_total": b * r["tokens_per_s_per_seq"],
                }
            )
    info["matvec_configs"] = matvec_configs()
    save()
    del model
    free_memory()
    if not args.no_hf:
        try:
            from peer_hf import hf_model

            hf = hf_model(cfg, device, dtype).eval()
            for b in args.batch:
                ids = prompts_for(b, args.prompt_len, cfg.padded_vocab_size).to(device)
                r = timed(hf_generate(hf, ids), args.new_tokens, device, warmup_tokens=8)  # no per-shape setup
                add({"impl": "transformers GlmForCausalLM", "batch": b, **r,
                     "tokens_per_s_total": b * r["tokens_per_s_per_seq"]})  # fmt: skip
        except Exception as e:  # the comparison is optional; the row says why it is missing
            log.exception("transformers run failed")
            add({"impl": "transformers GlmForCausalLM", "error": f"{type(e).__name__}: {e}"[:500]})
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
