"""One config dataclass for every ChatGLM generation, read from and written back to the original config.json.

Two architecture families share it:
- ``arch="glm"``: ChatGLM-6B (v1), config keys ``vocab_size``, ``inner_hidden_size``, ``max_sequence_length``,
  ``position_encoding_2d``.
- ``arch="chatglm"``: ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat, config keys ``padded_vocab_size``,
  ``ffn_hidden_size``, ``kv_channels``, ``multi_query_group_num``, ``rope_ratio``.

Fields use the v2 names; the v1 keys are mapped onto them when reading and back when writing. Keys this
module does not interpret are kept in ``extra`` and written back untouched, so a config survives a round
trip unchanged in meaning.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmtune.generations import GENERATIONS, Generation  # noqa: F401 (re-exported)

Arch = Literal["glm", "chatglm"]


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model; the message names the file and field."""


@dataclass
class GLMConfig:
    arch: Arch = "chatglm"
    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_attention_heads: int = 32
    kv_channels: int | None = 128  # head dim; None -> hidden_size // num_attention_heads
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    padded_vocab_size: int = 65024  # v1: vocab_size
    seq_length: int = 2048  # v1: max_sequence_length
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    rope_ratio: float = 1.0
    original_rope: bool = True
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    torch_dtype: str | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    # Token ids the model config carries (v1 has all of these; v2+ only eos/pad).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    gmask_token_id: int | None = None
    # v1 only
    position_encoding_2d: bool = True
    quantization_bit: int = 0
    # Not a config.json key: the rotary variant (``spec.RopeStyle``), which v2 and v3 config files do not tell
    # apart; ``spec.configure`` sets it from the generation. None = the architecture's default.
    rope_style: str | None = None
    # Everything else from config.json, written back as it was.
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def rope(self) -> str:
        """The rotary variant: ``rope_style``, else "glm2d" for v1 and "chatglm3" for ChatGLM2+."""
        if self.rope_style is not None:
            return self.rope_style
        return "glm2d" if self.arch == "glm" else "chatglm3"

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    def validate(self, source: str = "<config>") -> None:
        def bad(field_name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field_name}' {why}")

        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise bad("num_attention_heads", "must divide hidden_size when kv_channels is not given")
        if self.num_attention_heads % self.num_kv_heads:
            raise bad("multi_query_group_num", "must divide num_attention_heads")
        if self.head_dim % 4 and self.arch == "chatglm":
            raise bad("kv_channels", "must be a multiple of 4 (rotary covers half of each head in pairs)")
        if self.pre_seq_len is not None and self.pre_seq_len <= 0:
            raise bad("pre_seq_len", f"must be positive or null, got {self.pre_seq_len}")
        allowed = ("glm2d",) if self.arch == "glm" else ("chatglm2", "chatglm3")
        if self.rope_style is not None and self.rope_style not in allowed:
            raise bad("rope_style", f"must be one of {allowed} for arch {self.arch!r}, got {self.rope_style!r}")

    # ---- JSON in/out ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> GLMConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type != "chatglm":
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; glmtune reads ChatGLM checkpoints "
                "(model_type 'chatglm': ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat)"
            )
        arch: Arch = "chatglm" if "padded_vocab_size" in raw or "ffn_hidden_size" in raw else "glm"
        key_map = _V1_KEYS if arch == "glm" else {}
        required = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
        values: dict[str, Any] = {"arch": arch}
        extra: dict[str, Any] = {}
        field_names = {f.name for f in dataclasses.fields(cls)} - {"arch", "extra", "rope_style"}
        inverse = {v: k for k, v in key_map.items()}
        for key, value in raw.items():
            name = key_map.get(key, key)
            if name in field_names and (arch == "glm" or key not in _V1_ONLY):
                values[name] = value
            else:
                extra[key] = value
        for name in required:
            if name not in values:
                raise ConfigError(f"{source}: missing required field '{inverse.get(name, name)}'")
        if arch == "glm":
            values.setdefault("rmsnorm", False)
            values.setdefault("kv_channels", None)
            values.setdefault("add_bias_linear", True)
            values.setdefault("tie_word_embeddings", True)
            if "ffn_hidden_size" not in values:
                values["ffn_hidden_size"] = 4 * values["hidden_size"]
        values["extra"] = extra
        for name, expected in _TYPES.items():
            if name in values and values[name] is not None and not _type_ok(values[name], expected):
                raise ConfigError(
                    f"{source}: field '{inverse.get(name, name)}' should be {expected}, got {values[name]!r}"
                )
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> GLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a model folder needs the original config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The original config.json keys: v1 names for v1, v2 names for v2+, unknown keys as read."""
        out: dict[str, Any] = {"model_type": "chatglm"}
        out.update(self.extra)
        skip = {"arch", "extra", "rope_style"} | (set() if self.arch == "glm" else set(_V1_ONLY))
        if self.arch == "glm":
            skip |= _V2_ONLY
        inverse = {v: k for k, v in _V1_KEYS.items()} if self.arch == "glm" else {}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("pre_seq_len", "kv_channels"):
                continue
            out[inverse.get(f.name, f.name)] = value
        return out

    def to_json(self, path: str | Path) -> None:
        from glmtune.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def replace(self, **changes: Any) -> GLMConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg


# v1 config.json key -> field name
_V1_KEYS = {
    "vocab_size": "padded_vocab_size",
    "inner_hidden_size": "ffn_hidden_size",
    "max_sequence_length": "seq_length",
}
_V1_ONLY = ("position_encoding_2d", "bos_token_id", "mask_token_id", "gmask_token_id", "quantization_bit")
_V2_ONLY = {
    "kv_channels", "multi_query_attention", "multi_query_group_num", "rmsnorm",
    "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear", "add_qkv_bias",
    "rope_ratio", "original_rope", "hidden_dropout", "attention_dropout", "tie_word_embeddings",
}  # fmt: skip
_TYPES: dict[str, type | tuple[type, ...]] = {
    "num_layers": int, "hidden_size": int, "ffn_hidden_size": int, "num_attention_heads": int,
    "kv_channels": int, "multi_query_group_num": int, "padded_vocab_size": int, "seq_length": int,
    "layernorm_epsilon": (int, float), "rope_ratio": (int, float), "pre_seq_len": int,
    "multi_query_attention": bool, "rmsnorm": bool, "post_layer_norm": bool, "add_bias_linear": bool,
    "add_qkv_bias": bool, "prefix_projection": bool, "apply_residual_connection_post_layernorm": bool,
}  # fmt: skip


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    if expected is int or expected == (int, float):
        if isinstance(value, bool):
            return False
    return isinstance(value, expected)


# ---- named presets ------------------------------------------------------------------------------------
def _chatglm_base(**kw: Any) -> GLMConfig:
    base = dict(
        arch="chatglm", num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32,
        kv_channels=128, multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024,
        seq_length=32768, layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True, add_bias_linear=False,
        add_qkv_bias=True, torch_dtype="float16", eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    base.update(kw)
    return GLMConfig(**base)


def _glm_v1(**kw: Any) -> GLMConfig:
    base = dict(
        arch="glm", num_layers=28, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=32,
        kv_channels=None, padded_vocab_size=130528, seq_length=2048, layernorm_epsilon=1e-5, rmsnorm=False,
        add_bias_linear=True, tie_word_embeddings=True, position_encoding_2d=True, torch_dtype="float16",
        bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3,
    )  # fmt: skip
    base.update(kw)
    return GLMConfig(**base)


def preset(name: str) -> GLMConfig:
    """A named config: the released sizes, and ``tiny-*`` sizes for tests and the demo."""
    presets = {
        "chatglm-6b": lambda: _glm_v1(),
        "chatglm2-6b": lambda: _chatglm_base(),
        "chatglm3-6b": lambda: _chatglm_base(seq_length=8192),
        "chatglm3-6b-base": lambda: _chatglm_base(seq_length=32768),
        "chatglm3-6b-32k": lambda: _chatglm_base(seq_length=32768, rope_ratio=50),
        "glm-4-9b-chat": lambda: _chatglm_base(
            num_layers=40, padded_vocab_size=151552, seq_length=131072, rope_ratio=500, layernorm_epsilon=1.5625e-07,
            torch_dtype="bfloat16", eos_token_id=[151329, 151336, 151338], pad_token_id=151329,
        ),
        "tiny-chatglm": lambda: _glm_v1(
            num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, padded_vocab_size=512,
            seq_length=256, torch_dtype="float32", mask_token_id=500, gmask_token_id=501, bos_token_id=504,
            eos_token_id=505, pad_token_id=3,
        ),
        "tiny-chatglm2": lambda: _chatglm_base(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
            multi_query_group_num=2, padded_vocab_size=512, seq_length=256, torch_dtype="float32",
        ),
        "tiny-glm4": lambda: _chatglm_base(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
            multi_query_group_num=2, padded_vocab_size=512, seq_length=256, rope_ratio=500, torch_dtype="float32",
        ),
    }  # fmt: skip
    presets["tiny-chatglm3"] = presets["tiny-chatglm2"]
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    return presets[name]()
