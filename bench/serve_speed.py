"""Serving speed of ``glmtune serve`` over HTTP: a ChatGLM3-6B-shaped model with random weights behind the real
FastAPI/uvicorn server (in this process, on 127.0.0.1), driven by streaming clients in a separate process.

For each concurrency N (``--streams``), N clients send their chat requests at once (each its own prompt of about
``--prompt-len`` tokens, ``--new-tokens`` tokens greedy, streamed, usage included); after a warm-up round of the
same shape, the round is timed. Reported per N:

- aggregate tok/s: all completion tokens / the round's wall time (first request sent to last token received);
- decode tok/s: all completion tokens after each stream's first / (last token of any stream - first token of any
  stream), the steady rate once streams are running;
- time to first token (first content chunk) p50 / p99 over the N requests.

Side by side, in the same run: sequential serving, the same server one request at a time (``--sequential`` requests,
a client waiting for each reply before it sends the next), and a server whose batch has one row
(``--max-concurrent 1``, the one-at-a-time server glmtune had before continuous batching) under the same N clients.

The model's tokenizer is a tiny one trained on the spot (nothing downloaded); the model's ids beyond its vocabulary
are decoded as ``id % vocab`` (text for the stream, at a similar cost). ``--tiny``: a tiny ChatGLM3 on the CPU, to
smoke-test this script.

    PYTHONPATH=src python3 bench/serve_speed.py --json bench/results/serve_speed.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("serve_speed")

WORDS = "我们 今天 天气 很好 你是 谁 人工 智能 模型 训练 数据 中文 hello world the model token train data chat".split()


# ---- the client process ---------------------------------------------------------------------------------------------
async def _one(client, body: dict, t0: float) -> dict:
    sent = time.perf_counter() - t0
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": str(event["error"])}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    now = time.perf_counter() - t0
                    first = now if first is None else first
                    last = now
    return {"sent": sent, "first": first, "last": last, "tokens": tokens}


async def _client(url: str, bodies: list[dict], concurrency: int) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrency == 1:
            return [await _one(client, b, t0) for b in bodies]
        return list(await asyncio.gather(*(_one(client, b, t0) for b in bodies)))


def client_main(args: argparse.Namespace) -> None:
    bodies = json.loads(Path(args.client_bodies).read_text(encoding="utf-8"))
    print(json.dumps(asyncio.run(_client(args.client, bodies, args.client_concurrency))))


# ---- the server process ---------------------------------------------------------------------------------------------
class FoldedTokenizer:
    """A tokenizer whose ``decode`` takes any id (``id % vocab_size``): text for a model with a larger vocabulary."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        n = self._inner.vocab_size
        return self._inner.decode([i % n for i in ids], skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def build_pretrained(args: argparse.Namespace, workdir: Path):
    import torch

    from glmtune.demo_data import corpus_lines
    from glmtune.pretrained import Pretrained, load_pretrained
    from glmtune.tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(workdir / "tiny-chatglm3", corpus_lines(seed=0), generation="chatglm3",
                                 vocab_size=600, sizes={"seq_length": 2048} if args.tiny else None)  # fmt: skip
    tiny = load_pretrained(folder, dtype="float32", device="cpu")
    if args.tiny:
        return tiny
    from benchlib import random_fill

    from glmtune.models import build_model
    from glmtune.models.config import preset

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = preset("chatglm3-6b")
    model = build_model(config, device="meta", generation="chatglm3")
    random_fill(model, device, dtype, seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Pretrained(Path("chatglm3-6b-random"), config, "chatglm3", model, FoldedTokenizer(tiny.tokenizer),
                      tiny.template)  # fmt: skip


def request_bodies(pretrained, n: int, prompt_len: int, new_tokens: int, seed: int) -> list[dict]:
    """``n`` chat requests whose prompts are about ``prompt_len`` tokens, each different."""
    import random

    from glmtune.templates import Message

    rng = random.Random(seed)
    p = pretrained
    bodies = []
    for _ in range(n):
        words: list[str] = []
        while len(p.template.encode_prompt(p.tokenizer, [Message("user", " ".join(words))])) < prompt_len:
            words += rng.choices(WORDS, k=8)
        bodies.append({"model": "bench", "messages": [{"role": "user", "content": " ".join(words)}],
                       "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})  # fmt: skip
    return bodies


def run_clients(url: str, bodies: list[dict], concurrency: int, workdir: Path) -> list[dict]:
    path = workdir / "bodies.json"
    path.write_text(json.dumps(bodies, ensure_ascii=False), encoding="utf-8")
    out = subprocess.run([sys.executable, __file__, "--client", url, "--client-bodies", str(path),
                          "--client-concurrency", str(concurrency)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"the client failed: {out.stderr[-2000:]}")
    results = json.loads(out.stdout)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return results


def summarize(results: list[dict]) -> dict:
    firsts = [r["first"] - r["sent"] for r in results if r["first"] is not None]
    tokens = sum(r["tokens"] for r in results)
    start = min(r["sent"] for r in results)
    end = max(r["last"] for r in results if r["last"] is not None)
    t_first = min(r["first"] for r in results if r["first"] is not None)
    after_first = sum(max(r["tokens"] - 1, 0) for r in results)

    def pct(q: float) -> float:
        xs = sorted(firsts)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"requests": len(results), "tokens": tokens, "wall_s": end - start,
            "aggregate_tok_s": tokens / (end - start), "decode_tok_s": after_first / max(end - t_first, 1e-9),
            "ttft_p50_s": statistics.median(firsts), "ttft_p99_s": pct(0.99)}  # fmt: skip


def table(rows: list[dict]) -> str:
    cols = [("server", "server", ""), ("clients", "clients", "d"), ("requests", "requests", "d"),
            ("aggregate tok/s", "aggregate_tok_s", ",.0f"), ("decode tok/s", "decode_tok_s", ",.0f"),
            ("TTFT p50 s", "ttft_p50_s", ".3f"), ("TTFT p99 s", "ttft_p99_s", ".3f"),
            ("wall s", "wall_s", ".1f")]  # fmt: skip
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) for _, k, f in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=None, help="concurrent clients (default 1 8 32 64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per reply (default 256)")
    ap.add_argument("--sequential", type=int, default=4, help="requests of the one-at-a-time round (default 4)")
    ap.add_argument("--one-row-clients", type=int, default=8,
                    help="clients against the one-row server (0: skip; default 8)")  # fmt: skip
    ap.add_argument("--decode", default="auto", help="the server's decode mode (auto: a CUDA graph on CUDA)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a tiny ChatGLM3 on the CPU (a smoke test of this script)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--note", default=None, help="kept in the JSON (e.g. the glmtune commit measured)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--client-bodies", help=argparse.SUPPRESS)
    ap.add_argument("--client-concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        client_main(args)
        return []
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    streams = args.streams or ([1, 4, 8] if args.tiny else [1, 8, 32, 64])
    prompt_len = args.prompt_len or (32 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    if args.tiny:
        args.device, args.dtype = "cpu", "float32"
    from glmtune.serve.app import create_app, serving
    from glmtune.serve.engine import Limits

    rows: list[dict] = []
    info = {"command": " ".join(sys.argv), "note": args.note, "tiny": args.tiny, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "device": args.device, "dtype": args.dtype, "decode": args.decode}  # fmt: skip

    def add(row: dict) -> None:
        rows.append(row)
        log.info("%s", row)
        if args.json:  # after every row: a command cut short keeps its rows
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n", encoding="utf-8")
            args.json.with_suffix(".md").write_text(table(rows) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="serve-speed-") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        pretrained = build_pretrained(args, workdir)
        info["build_s"] = time.perf_counter() - t
        if not args.tiny:
            import torch

            info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        total = prompt_len + new_tokens + 64
        servers = [("batched", max(streams), streams, args.sequential)]
        if args.one_row_clients:
            servers.append(("one row", 1, [args.one_row_clients], 0))
        for label, rows_n, clients, sequential in servers:
            app = create_app(pretrained, model_name="bench", decode=args.decode,
                             limits=Limits(max_concurrent=rows_n, max_total_tokens=total, max_queue=1024))  # fmt: skip
            with serving(app) as url:
                t = time.perf_counter()  # warm-up: every cache window's step captured, at the largest batch
                run_clients(url, request_bodies(pretrained, max(clients), prompt_len, new_tokens, 99), max(clients),
                            workdir)  # fmt: skip
                info[f"warmup_s_{label}"] = time.perf_counter() - t
                for n in clients:
                    results = run_clients(url, request_bodies(pretrained, n, prompt_len, new_tokens, n), n, workdir)
                    add({"server": f"{label} ({rows_n} rows)", "clients": n, **summarize(results)})
                if sequential:
                    bodies = request_bodies(pretrained, sequential, prompt_len, new_tokens, 7)
                    add({"server": f"{label} ({rows_n} rows), one request at a time", "clients": 1,
                         **summarize(run_clients(url, bodies, 1, workdir))})  # fmt: skip
            app.state.engine.close()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
