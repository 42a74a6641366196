"""What a compiled training forward keeps for its backward, tensor by tensor, per transformer block.

A ChatGLM3-6B-shaped model cut to ``--layers`` blocks (the weights are random), the ADGEN recipe's LoRA (r 8,
alpha 32, dropout 0.1, query_key_value) or full training, ``compile_blocks`` with its defaults (``--recompute-kv``:
as ``train.recompute_kv``, which the recipe's example config sets), one forward over packed rows of ADGEN-like
samples under ``torch.autograd.graph.saved_tensors_hooks``. Each saved tensor is listed once (by storage),
parameters left out, with its bytes per token, under the block that saved it (``after``: the final norm, past the
last block): the reading behind a peak (bench/RESULTS.md) and the check that a change to what is kept did what it
meant to on the GPU's compiled graphs (they can differ from the CPU's).

    PYTHONPATH=src python bench/saved_activations.py --layers 3 --json bench/results/saved_activations.json
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import torch
from benchlib import write_json

from glmtune.adapters import build_method
from glmtune.models import build_model
from glmtune.models.config import preset
from glmtune.train.compile import compile_blocks, transformer_blocks

log = logging.getLogger("saved_activations")
LORA = {"rank": 8, "alpha": 32, "dropout": 0.1, "target_modules": "query_key_value"}


def packed_rows(rows: int, width: int, seed: int) -> list[list[int]]:
    """ADGEN-like sample lengths (70-190 tokens: a prompt of 20-60 and a response of 50-130) packed into rows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        row, left = [], width
        while left > 0:
            n = int(torch.randint(70, 191, (1,), generator=gen))
            row.append(min(n, left))
            left -= row[-1]
        out.append(row)
    return out


def saved_by_block(args) -> dict:
    device = torch.device(args.device)
    cfg = preset("chatglm3-6b").replace(num_layers=args.layers)
    model = build_model(cfg)
    model.init_weights(seed=0)
    model = model.to(device, torch.bfloat16)
    if args.method == "lora":
        build_method("lora", dict(LORA)).setup(model)
    else:
        model.requires_grad_(True)
    model.train()
    if args.compile:
        compile_blocks(model, recompute_kv=args.recompute_kv)
    lengths = packed_rows(args.rows, args.width, args.seed)
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]).to(device)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    ids = torch.randint(10, cfg.padded_vocab_size - 10, (args.rows, args.width), device=device)
    tokens = args.rows * args.width
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    blocks = transformer_blocks(model)
    current = [-1]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i))
    blocks[-1].register_forward_hook(lambda *_: current.__setitem__(0, len(blocks)))  # (what follows: "after")
    saved: dict[int, list[tuple[int, tuple[int, ...], str, int]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, []).append((current[0], tuple(t.shape), str(t.dtype), t.untyped_storage().nbytes()))
        return t

    for _ in range(2):  # the first call compiles
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model.hidden_states(ids, position_ids=pos, segment_ids=seg)
        h.float().mean().backward()
    rows, per_block = [], Counter()
    for uses in saved.values():
        block, shape, dtype, nbytes = uses[0]
        per_block[block] += nbytes
        rows.append({"block": block, "shape": list(shape), "dtype": dtype, "bytes_per_token": nbytes / tokens})
    rows.sort(key=lambda r: (r["block"], -r["bytes_per_token"]))
    name = {-1: "before", len(blocks): "after"}
    return {"tokens": tokens, "layers": args.layers, "method": args.method, "compiled": args.compile,
            "recompute_kv": args.recompute_kv,
            "per_block_bytes_per_token": {name.get(k, str(k)): v / tokens for k, v in sorted(per_block.items())},
            "tensors": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=187)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--recompute-kv", action="store_true", help="as train.recompute_kv (compiled runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = saved_by_block(args)
    for block, per_token in result["per_block_bytes_per_token"].items():
        log.info("block %s: %.0f bytes a token", block, per_token)
    for row in result["tensors"]:
        log.info("block %s %s %s %.0f B/token", row["block"], row["dtype"], row["shape"], row["bytes_per_token"])
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
