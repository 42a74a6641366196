"""``glmtune data inspect``: what a data file becomes — format, counts, samples with their trained tokens marked,
token-length statistics and how many records the configured lengths would cut."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from glmtune.data.encode import encode_sample
from glmtune.data.messages import RecordError
from glmtune.data.readers import ReadOptions, read_samples
from glmtune.templates import IGNORE_INDEX, Encoded, EncodeOptions, Template
from glmtune.tokenizers.base import Tokenizer

MARK_OPEN, MARK_CLOSE = "\x1b[42m", "\x1b[0m"  # ANSI green background for trained tokens
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"


def render_example(tokenizer: Tokenizer, ex: Encoded, color: bool = False) -> str:
    """Decoded text of an example with each run of trained tokens (label != IGNORE_INDEX) wrapped in markers.

    A token counts as trained where its own label is set, i.e. it is a target predicted from the token before.
    """
    opened, closed = (MARK_OPEN, MARK_CLOSE) if color else (PLAIN_OPEN, PLAIN_CLOSE)
    out: list[str] = []
    run: list[int] = []
    run_trained = False
    for tok, lab in zip(ex.input_ids, ex.labels, strict=True):
        trained = lab != IGNORE_INDEX
        if run and trained != run_trained:
            out.append(_piece(tokenizer, run, run_trained, opened, closed))
            run = []
        run.append(tok)
        run_trained = trained
    if run:
        out.append(_piece(tokenizer, run, run_trained, opened, closed))
    return "".join(out)


def _piece(tokenizer: Tokenizer, ids: list[int], trained: bool, opened: str, closed: str) -> str:
    # Special tokens by name; the ordinary tokens between them decoded together, so multi-byte characters that
    # byte-fallback pieces split across tokens come out whole.
    parts: list[str] = []
    plain: list[int] = []
    for t in ids:
        if tokenizer.is_special(t):
            if plain:
                parts.append(tokenizer.decode(plain, skip_special_tokens=False))
                plain = []
            parts.append(_token_text(tokenizer, t))
        else:
            plain.append(t)
    if plain:
        parts.append(tokenizer.decode(plain, skip_special_tokens=False))
    text = "".join(parts)
    return f"{opened}{text}{closed}" if trained else text


def _token_text(tokenizer: Tokenizer, t: int) -> str:
    if tokenizer.is_special(t):
        to_piece = getattr(tokenizer, "id_to_piece", None)
        try:
            name = to_piece(t) if to_piece is not None else f"id {t}"
        except (KeyError, IndexError):
            name = f"id {t}"
        return name if name.startswith(("<", "[")) else f"<{name}>"
    return tokenizer.decode([t], skip_special_tokens=False)


def _stats(values: list[int]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return (f"max {ordered[-1]}  mean {statistics.fmean(ordered):.1f}  median {statistics.median(ordered):g}"
            f"  p95 {p95}")  # fmt: skip


def inspect_data(
    path: str | Path,
    tokenizer: Tokenizer,
    template: Template,
    *,
    read_options: ReadOptions | None = None,
    options: EncodeOptions | None = None,
    n_samples: int = 3,
    color: bool = False,
) -> str:
    """A text report on a data file: detected format, counts, the first samples rendered with trained tokens
    marked (``[[…]]``, or green with ``color``), prompt/response token-length statistics and truncation counts."""
    read_options = read_options or ReadOptions(skip_bad=True)
    options = options or EncodeOptions()
    samples, report = read_samples(path, read_options)
    unlimited = replace(options, max_source_length=None, max_target_length=None)
    lines = [report.summary(), f"template {template.name}; {len(samples)} samples"]
    lines += [f"  error: {e}" for e in report.first_errors]
    prompt_lens, response_lens, total_lens = [], [], []
    truncated = 0
    failed = 0
    shown = 0
    for s in samples:
        try:
            full = encode_sample(tokenizer, template, s, unlimited)
            cut = encode_sample(tokenizer, template, s, options)
        except RecordError as e:
            failed += 1
            if failed <= 3:
                lines.append(f"  cannot encode: {e}")
            continue
        n_trained = sum(1 for t in full.labels if t != IGNORE_INDEX)
        response_lens.append(n_trained)
        prompt_lens.append(len(full.input_ids) - n_trained)
        total_lens.append(len(full.input_ids))
        truncated += len(cut.input_ids) < len(full.input_ids)
        if shown < n_samples:
            shown += 1
            lines += ["", f"--- sample {shown} ({s.origin}): {len(cut.input_ids)} tokens, "
                          f"{sum(1 for t in cut.labels if t != IGNORE_INDEX)} trained ---",
                      render_example(tokenizer, cut, color)]  # fmt: skip
    lines += [
        "",
        "token lengths (untruncated; prompt = untrained tokens, response = trained tokens):",
        f"  prompt    {_stats(prompt_lens)}",
        f"  response  {_stats(response_lens)}",
        f"  total     {_stats(total_lens)}",
        f"truncated at max_source_length={options.max_source_length}, max_target_length="
        f"{options.max_target_length}: {truncated} of {len(total_lens)}",
    ]
    if failed:
        lines.append(f"{failed} samples cannot be encoded with template {template.name}")
    return "\n".join(lines)
