"""Fine-tuning methods (``lora``, ``ptuning``, ``freeze``, ``full``) behind one surface (``base.Method``).

``build_method(name, options)`` turns a method name and its options (from the YAML config's ``method:`` section)
into a ready method object; the option dataclasses below list what each method accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from glmtune.adapters.base import Method


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LoraOptions:
    """rank, alpha (scale = alpha / rank, or alpha / sqrt(rank) with use_rslora), dropout on the adapter's input,
    target_modules: module names (PEFT's rule: the full name or its last parts), comma-separated or a list; ``all`` =
    every linear layer except the output layer."""

    rank: int = 8
    alpha: float = 32
    dropout: float = 0.1
    target_modules: str | list[str] = "query_key_value"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"lora option 'rank' must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"lora option 'alpha' must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora option 'dropout' must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t.strip() for t in self.target_modules):
                raise ValueError(f"lora option 'target_modules' must name modules, got {self.target_modules!r}")
            self.target_modules = [t.strip() for t in self.target_modules]
        elif not isinstance(self.target_modules, str) or not self.target_modules.strip():
            raise ValueError(f"lora option 'target_modules' must name modules, got {self.target_modules!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"lora option 'use_rslora' must be true or false, got {self.use_rslora!r}")


@dataclass
class PTuningOptions:
    """pre_seq_len: prefix positions; prefix_projection: a two-layer MLP over the prefix embedding."""

    pre_seq_len: int = 128
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.pre_seq_len) or self.pre_seq_len <= 0:
            raise ValueError(f"ptuning option 'pre_seq_len' must be a positive integer, got {self.pre_seq_len!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(
                f"ptuning option 'prefix_projection' must be true or false, got {self.prefix_projection!r}"
            )


@dataclass
class FreezeOptions:
    """trainable_layers: the last N layers (negative: the first N; 0: none); patterns: regexes of further parameter
    names to train (e.g. ``final_layernorm``)."""

    trainable_layers: int = 2
    patterns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _is_int(self.trainable_layers):
            raise ValueError(f"freeze option 'trainable_layers' must be an integer, got {self.trainable_layers!r}")
        if isinstance(self.patterns, str):
            self.patterns = [p.strip() for p in self.patterns.split(",") if p.strip()]
        if not isinstance(self.patterns, (list, tuple)) or not all(isinstance(p, str) for p in self.patterns):
            raise ValueError(f"freeze option 'patterns' must be a list of regular expressions, got {self.patterns!r}")
        self.patterns = list(self.patterns)


@dataclass
class FullOptions:
    """No options: every weight is trained."""


_OPTIONS: dict[str, type] = {"lora": LoraOptions, "ptuning": PTuningOptions, "freeze": FreezeOptions,
                             "full": FullOptions}  # fmt: skip
METHOD_NAMES: tuple[str, ...] = tuple(_OPTIONS)


def options_class(name: str) -> type:
    """The option dataclass of method ``name`` (ValueError naming the nearest method for an unknown name)."""
    if name not in _OPTIONS:
        close = difflib.get_close_matches(str(name), METHOD_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}{hint} (choose one of {', '.join(METHOD_NAMES)})")
    return _OPTIONS[name]


def method_options(name: str, options: Mapping[str, Any] | Any | None = None) -> Any:
    """The option dataclass of method ``name`` from a mapping (unknown keys: ValueError naming them)."""
    cls = options_class(name)
    if isinstance(options, cls):
        return options
    values = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid options: {', '.join(known) or 'none'}"
            raise ValueError(f"unknown option {key!r} for method {name!r}{hint}")
    return cls(**values)


def build_method(name: str, options: Mapping[str, Any] | Any | None = None) -> Method:
    """A ready method object: ``lora``, ``ptuning``, ``freeze`` or ``full`` with its options."""
    opts = method_options(name, options)
    if name == "lora":
        from glmtune.adapters.lora import LoraMethod

        return LoraMethod(opts)
    if name == "ptuning":
        from glmtune.adapters.ptuning import PTuningMethod

        return PTuningMethod(opts)
    if name == "freeze":
        from glmtune.adapters.freeze import FreezeMethod

        return FreezeMethod(opts)
    from glmtune.adapters.full import FullMethod

    return FullMethod(opts)


__all__ = [
    "METHOD_NAMES",
    "FreezeOptions",
    "FullOptions",
    "LoraOptions",
    "Method",
    "PTuningOptions",
    "build_method",
    "method_options",
    "options_class",
]
