"""Tokenized datasets cached on disk, keyed by everything that decides the ids: file content, tokenizer files,
template, read and encode options. A changed file or setting gives another key, so a stale cache is never read.
Beside the examples a cache file keeps the encoding's notes (what was dropped or cut, as JSON), so a run that
reads the cache reports the same as the run that wrote it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glmtune.io import atomic_write_bytes
from glmtune.templates import Encoded

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the encoding code changes what it produces


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


def cache_key(
    data_files: Iterable[str | Path],
    tokenizer_files: Iterable[str | Path],
    template: str,
    settings: dict[str, Any],
) -> str:
    """Hex digest of the data files' bytes, the tokenizer files' bytes, the template name and the settings
    (dataclasses are turned into dicts; values must be JSON-serialisable)."""
    doc = {
        "format": CACHE_FORMAT,
        "data": [_file_digest(Path(p)) for p in data_files],
        "tokenizer": sorted(_file_digest(Path(p)) for p in tokenizer_files),
        "template": template,
        "settings": {k: _plain(v) for k, v in sorted(settings.items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def save_encoded(path: str | Path, examples: list[Encoded], notes: dict[str, Any] | None = None) -> None:
    """Examples (and JSON-serialisable ``notes``) into one .npz file, written atomically."""
    lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(
        buf,
        input_ids=np.array([t for e in examples for t in e.input_ids], dtype=np.int64),
        labels=np.array([t for e in examples for t in e.labels], dtype=np.int64),
        lengths=lengths,
        prefix_lengths=np.array([e.prefix_length for e in examples], dtype=np.int64),
        notes=np.frombuffer(json.dumps(notes or {}, ensure_ascii=False).encode(), dtype=np.uint8),
    )
    atomic_write_bytes(path, buf.getvalue())


def load_notes(path: str | Path) -> dict[str, Any]:
    """The notes saved with the examples ({} when there are none)."""
    with np.load(path) as z:
        return json.loads(z["notes"].tobytes().decode()) if "notes" in z.files else {}


def load_encoded(path: str | Path) -> list[Encoded]:
    with np.load(path) as z:
        ids, labels, lengths, prefix = z["input_ids"], z["labels"], z["lengths"], z["prefix_lengths"]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [
        Encoded(ids[s:e].tolist(), labels[s:e].tolist(), int(p)) for s, e, p in zip(starts, ends, prefix, strict=True)
    ]


def cached_encode(
    cache_dir: str | Path | None, key: str, build: Callable[[], tuple[list[Encoded], dict[str, Any]]]
) -> tuple[list[Encoded], dict[str, Any], bool]:
    """(examples, notes, hit): the cached ones under ``key`` if present (hit=True), else ``build()`` -> (examples,
    notes) saved there. No dir: no cache."""
    if cache_dir is None:
        return *build(), False
    path = Path(cache_dir) / f"tokenized-{key}.npz"
    if path.is_file():
        try:
            examples, notes = load_encoded(path), load_notes(path)
            log.info("tokenized data from cache %s (%d examples)", path, len(examples))
            return examples, notes, True
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable cache %s (%s); encoding again", path, e)
    examples, notes = build()
    save_encoded(path, examples, notes)
    return examples, notes, False
