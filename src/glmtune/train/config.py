"""The training configuration: typed dataclasses, read from YAML with ``key=value`` command-line overrides.

Everything is checked before any model is loaded: an unknown key names the nearest valid one, a value of the
wrong type names the expected type, a missing model folder or data file names the file; every message starts
with where the key came from (the YAML file, or the command line).

Paths: input paths written in the YAML file (``model``, ``data.train``, ``data.dev``, ``data.cache_dir``) are
relative to the file's folder, those given on the command line to the current folder; ``output_dir`` is always
relative to the current folder. The resolved config (absolute paths, every default filled in) is what a run
folder's ``config.yaml`` holds, so a run can be resumed from anywhere.

Method options sit beside ``method.name`` (``method: {name: lora, rank: 8}``); they are checked against the
method's option dataclass (``glmtune.adapters``). Options of another method (LoRA's ``rank`` after
``method.name=ptuning`` on the command line) are dropped with a warning.

Lengths: ``data.max_source_length``/``max_target_length`` left unset (null) are the generation's official defaults
(v1/v2 1024/128 as ``ptuning/arguments.py``, ChatGLM3 256/512 and GLM-4 512/512 as ``finetune_demo``); no example
and no packed row is ever longer than the model's ``seq_length`` (config.json).
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from glmtune.adapters import METHOD_NAMES, options_class

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Scheduler = Literal["linear", "cosine", "constant"]
CLI = "command line"


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the file (or the command line) and the key."""


# ---- the schema ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # training files (JSON, JSONL, CSV, Parquet)
    dev: list[str] = field(default_factory=list)  # dev files; empty: none, or a split of train (dev_split)
    dev_split: float = 0.0  # fraction of the training records held out as dev set when no dev file is given
    format: Literal["auto", "columns", "alpaca", "conversations"] = "auto"
    columns: dict[str, str] | None = None  # {"prompt": ..., "response": ..., "history": ..., "system": ...}
    source_prefix: str = ""
    role_tag: str | None = None
    content_tag: str | None = None
    role_map: dict[str, str] | None = None
    skip_bad: bool = False  # leave out records that cannot be used (logged, listed in dropped_samples.jsonl)
    encoding: str = "utf-8"  # text encoding of the data files (gb18030 for GBK files from Excel); a BOM wins
    max_samples: int | None = None  # use only the first N training records
    max_dev_samples: int | None = None
    # encoding (defaults reproduce each generation's official script); every example is cut to the model's seq_length
    max_source_length: int | None = None  # v1/v2 max_source_length, v3/GLM-4 max_input_length; null: the official
    max_target_length: int | None = None  # default (v1/v2 1024/128, ChatGLM3 256/512, GLM-4 512/512)
    train_on_prompt: bool = False
    mask_history: bool = False
    truncation: Literal["official", "keep_question"] = "official"
    ignore_pad_token_for_loss: bool = True
    # batching
    packing: bool = True  # several examples per row (attention kept per example); false: dynamic padding
    pack_length: int | None = None  # tokens per packed row (at most seq_length); default: the longest example
    cache_dir: str | None = None  # tokenized-data cache; default: <output_dir>/tokenized


@dataclass
class MethodConfig:
    name: Literal["lora", "ptuning", "freeze", "full"] = "lora"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (rank, alpha, pre_seq_len, ...)


@dataclass
class OptimConfig:
    precision: Precision = "auto"  # auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU
    device: str = "auto"
    batch_size: int = 4  # rows per micro-batch and device (packed rows with packing)
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; None: run `epochs` epochs
    epochs: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0  # never applied to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    scheduler: Scheduler = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the schedule's floor, as a fraction of learning_rate
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    gradient_checkpointing: Literal["mlp", "half"] | bool = False  # true: every block; mlp, half: less
    # with gradient_checkpointing: only the first N blocks (or their MLPs) are recomputed; null: every block. All
    # saved activations live until the backward, so N of L blocks save ~N/L of the mode's memory for N/L of its cost
    recompute_layers: int | None = None
    # compiled on CUDA where flash attention takes no grouped K/V heads (torch < 2.13): keep the grouped heads and
    # repeat them again in the backward instead of saving the copies (ChatGLM2/3, GLM-4: ~0.15 GiB less on 4 ADGEN
    # samples of ChatGLM3-6B, ~1 % of the step); elsewhere nothing to do
    recompute_kv: bool = False
    compile: Literal["auto"] | bool = "auto"  # torch.compile each block; auto: on CUDA (YAML on/off = true/false)
    # the whole step replayed as CUDA graphs (train/graph_step.py); auto: with compile, one process, no fp16, an
    # unquantized base, no gradient checkpointing that restores the RNG state (mlp over MLPs without dropout is fine)
    cuda_graph: Literal["auto"] | bool = "auto"
    loss_chunk_tokens: int = 1024  # tokens per chunk of the output layer + loss (memory ~ chunk * vocab)
    # the loss chunks' logits recomputed in the backward (true), or kept (false: one output-layer product less a
    # step, ~6 bytes x vocab more memory a target: ChatGLM3, 4,000 targets ~1.5 GB); auto: with compiled blocks on
    # one GPU the chunk loss is compiled and kept while its bf16 logits take <= 1 GiB a micro-batch (2 bytes x vocab
    # a target), else recomputed
    loss_recompute: Literal["auto"] | bool = "auto"
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    # several processes: fsdp shards weights, gradients and optimizer state, ddp copies them; auto: fsdp for
    # full/freeze, ddp for adapters (train/fsdp.py)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_offload: bool = False  # fsdp: parameters and optimizer state kept on the CPU (GPU runs only)
    # fsdp: the last N transformer blocks keep their gathered (bf16) weights from forward to backward: no second
    # all-gather for them, one block's weights more memory each (ChatGLM3-6B: 0.34 GiB a block)
    fsdp_keep_gathered: int = 1


@dataclass
class EvalConfig:
    every_steps: int | None = None  # dev loss every N steps (and at the end); None: only at the end
    batch_size: int = 8
    metric: str = "loss"  # the best checkpoint's measure: "loss" (lower is better) or rouge-1/rouge-2/rouge-l/bleu-4
    patience: int | None = None  # stop after this many evaluations without improvement
    generate_every_steps: int | None = None  # ROUGE/BLEU on generated replies every N steps
    generate_examples: int = 50
    generate_batch_size: int = 8
    max_new_tokens: int = 128


@dataclass
class SaveConfig:
    every_steps: int | None = 500  # a checkpoint every N steps (null: only the best and the last)
    keep_last: int = 2  # checkpoints kept (the best one is kept as well)


@dataclass
class LogConfig:
    every_steps: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass
class TrainConfig:
    model: str = ""  # the base model folder (original layout)
    output_dir: str = "runs/run"
    generation: Literal["chatglm", "chatglm2", "chatglm3", "glm4"] | None = None  # default: detected
    template: Literal["chatglm", "chatglm2", "chatglm3", "glm4"] | None = None  # default: the generation's
    # a frozen quantized base (models/quant.py: THUDM's int8/int4; models/nf4.py: QLoRA's NF4), for lora/ptuning
    quantize: Literal["none", "int8", "int4", "nf4"] = "none"
    seed: int = 42
    overwrite: bool = False  # replace a run already in output_dir
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for config.yaml; method options sit beside method.name as in the user's file."""
        out = dataclasses.asdict(self)
        method = out.pop("method")
        out["method"] = {"name": method["name"], **method["options"]}
        order = ["model", "output_dir", "generation", "template", "quantize", "seed", "overwrite", "data", "method",
                 "train", "eval", "save", "log"]  # fmt: skip
        return {k: out[k] for k in order}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---- loading ------------------------------------------------------------------------------------------------
class _Raw(str):
    """A command-line value: parsed as YAML unless the key is text."""


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, check_files: bool = True
) -> TrainConfig:
    """Read ``path`` (YAML; None: start from the defaults), apply ``key=value`` overrides, check, resolve paths.

    ``check_files``: also check that the model folder and the data files exist (the default).
    """
    origins: dict[str, str] = {}
    raw: dict[str, Any] = {}
    source = CLI
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_yaml(path)
        _mark_origins(raw, "", str(path), origins)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, _Raw(value), item)
        origins[key] = f"{CLI} ({item!r})"
        parts = key.split(".")
        for i in range(1, len(parts)):  # a section the file does not have (a typo: trian.x=1) came from here
            origins.setdefault(".".join(parts[:i]), f"{CLI} ({item!r})")
    cfg = _build(TrainConfig, raw, "", origins, source)
    _resolve_paths(cfg, origins, path.parent if path is not None else None)
    validate(cfg, origins, source, check_files=check_files)
    return cfg


def parse_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{CLI}: {item!r} is not a key=value override (e.g. train.learning_rate=2e-2)")
    return key, value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {where}invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _mark_origins(d: dict[str, Any], prefix: str, source: str, origins: dict[str, str]) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        origins[key] = source
        if isinstance(v, dict) and key != "data.columns" and key != "data.role_map":
            _mark_origins(v, f"{key}.", source, origins)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{CLI}: {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def _build(cls: type, raw: Any, prefix: str, origins: dict[str, str], source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if isinstance(raw, _Raw):
        raw = _parse_raw(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{_origin(origins, prefix.rstrip('.'), source)}: key '{where}' must be a section "
                          f"(a mapping), got {raw!r}")  # fmt: skip
    if cls is MethodConfig:
        return _build_method(raw, prefix, origins, source)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(_unknown(str(key), names, prefix, _origin(origins, full, source)))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.", origins, source)
        else:
            values[key] = coerce(value, tp, full, _origin(origins, full, source))
    return cls(**values)


def _build_method(raw: dict[str, Any], prefix: str, origins: dict[str, str], source: str) -> MethodConfig:
    raw = dict(raw)
    options = raw.pop("options", None)
    name_src = _origin(origins, f"{prefix}name", source)
    name = coerce(raw.pop("name", "lora"), typing.get_type_hints(MethodConfig)["name"], f"{prefix}name", name_src)
    opts: dict[str, Any] = {}
    if options is not None:
        if isinstance(options, _Raw):
            options = _parse_raw(options)
        if not isinstance(options, dict):
            raise ConfigError(f"{_origin(origins, prefix + 'options', source)}: key '{prefix}options' must be a "
                              "mapping of the method's options")  # fmt: skip
        raw = {**options, **raw}
    fields = method_option_fields(name)
    for key, value in raw.items():
        full = f"{prefix}{key}"
        src = _origin(origins, full, source)
        if key not in fields:
            owners = [m for m in METHOD_NAMES if m != name and key in method_option_fields(m)]
            if owners:  # e.g. the file's LoRA options after method.name=ptuning on the command line
                log.warning("%s: '%s' is an option of method %s, not of %r: dropped", src, full,
                            " and ".join(repr(m) for m in owners), name)  # fmt: skip
                continue
            raise ConfigError(_unknown(str(key), ["name", *fields], prefix, src, what=f"option of method {name!r}"))
        opts[key] = coerce(value, fields[key], full, src)
    return MethodConfig(name=name, options=opts)


def method_option_fields(name: str) -> dict[str, Any]:
    """{option: type} of a method's option dataclass (``glmtune.adapters``)."""
    return dict(typing.get_type_hints(options_class(name)))


def _unknown(key: str, names: list[str], prefix: str, source: str, what: str = "key") -> str:
    msg = f"{source}: unknown {what} '{prefix}{key}'"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f"{msg}; did you mean '{prefix}{close[0]}'?"
    return f"{msg}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"


# ---- types --------------------------------------------------------------------------------------------------
_NULLS = ("null", "none", "~", "")


def _parse_raw(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null",
            Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))  # fmt: skip


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked (and converted where unambiguous, e.g. "2e-2" to 0.02) against the type ``tp``."""

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{source}: key '{key}' should be {_type_name(tp)}, got {value!r}{extra}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        raw_text = value if isinstance(value, _Raw) else None
        if raw_text is not None:
            if raw_text.strip().lower() in _NULLS and type(None) in args:
                return None
            value = _parse_raw(raw_text)  # "[a, b]" is a list for `str | list[str]`; "123" stays text below
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, source)
            except ConfigError:
                continue
        if raw_text is not None and str in args:
            return str(raw_text)
        raise bad()
    if tp is Any:
        return _parse_raw(value) if isinstance(value, _Raw) else value
    if origin is Literal:
        v = _parse_raw(value) if isinstance(value, _Raw) else value
        if v in args:
            return v
        close = difflib.get_close_matches(str(v), [str(a) for a in args], n=1, cutoff=0.5)
        raise bad(f"; did you mean {close[0]!r}?" if close else "")
    if tp is str:
        if isinstance(value, _Raw):
            return str(value)
        if isinstance(value, str):
            return value
        raise bad()
    if isinstance(value, _Raw):
        value = _parse_raw(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad() from None
            if f.is_integer():
                return int(f)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-2 (no dot) as text
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if origin is list:
        (item_tp,) = args
        if not isinstance(value, list):
            value = [value]  # a single file where a list is expected
        return [coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = args
        if not isinstance(value, dict):
            raise bad()
        return {coerce(k, key_tp, key, source): coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


# ---- paths and checks ---------------------------------------------------------------------------------------
def _resolve_paths(cfg: TrainConfig, origins: dict[str, str], file_dir: Path | None) -> None:
    def resolve(p: str, key: str) -> str:
        src = _origin(origins, key, CLI)
        base = file_dir if (file_dir is not None and not src.startswith(CLI)) else Path.cwd()
        return str((base / Path(p).expanduser()).resolve())

    if cfg.model:
        cfg.model = resolve(cfg.model, "model")
    cfg.data.train = [resolve(p, "data.train") for p in cfg.data.train]
    cfg.data.dev = [resolve(p, "data.dev") for p in cfg.data.dev]
    if cfg.data.cache_dir:
        cfg.data.cache_dir = resolve(cfg.data.cache_dir, "data.cache_dir")
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())


def validate(cfg: TrainConfig, origins: dict[str, str], source: str, *, check_files: bool = True) -> None:
    """Value and file checks that need more than one key's type."""

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(f"{_origin(origins, key, source)}: key '{key}': {why}")

    t, d, e = cfg.train, cfg.data, cfg.eval
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.epochs": t.epochs,
                "train.loss_chunk_tokens": t.loss_chunk_tokens, "train.max_bad_steps": t.max_bad_steps,
                "eval.batch_size": e.batch_size, "eval.generate_examples": e.generate_examples,
                "eval.generate_batch_size": e.generate_batch_size, "eval.max_new_tokens": e.max_new_tokens,
                "save.keep_last": cfg.save.keep_last, "log.every_steps": cfg.log.every_steps}  # fmt: skip
    optional_positive = {"train.max_steps": t.max_steps, "eval.every_steps": e.every_steps,
                         "eval.patience": e.patience, "eval.generate_every_steps": e.generate_every_steps,
                         "save.every_steps": cfg.save.every_steps, "data.max_samples": d.max_samples,
                         "data.max_dev_samples": d.max_dev_samples, "data.pack_length": d.pack_length,
                         "data.max_source_length": d.max_source_length,
                         "data.max_target_length": d.max_target_length,
                         "train.recompute_layers": t.recompute_layers}  # fmt: skip
    for key, v in positive.items():
        if v < 1:
            raise fail(key, f"must be at least 1, got {v}")
    for key, v in optional_positive.items():
        if v is not None and v < 1:
            raise fail(key, f"must be at least 1 or null, got {v}")
    if t.recompute_layers is not None and t.gradient_checkpointing is False:
        raise fail("train.recompute_layers", "needs train.gradient_checkpointing (true, mlp or half) to choose from")
    if t.learning_rate <= 0:
        raise fail("train.learning_rate", f"must be positive, got {t.learning_rate}")
    for key, v in (("train.warmup_ratio", t.warmup_ratio), ("train.adam_beta1", t.adam_beta1),
                   ("train.adam_beta2", t.adam_beta2)):  # fmt: skip
        if not 0.0 <= v < 1.0:
            raise fail(key, f"must be in [0, 1), got {v}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise fail("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    for key, v in (("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay)):
        if v < 0:
            raise fail(key, f"must not be negative, got {v}")
    if t.adam_eps <= 0:
        raise fail("train.adam_eps", f"must be positive, got {t.adam_eps}")
    if not 0.0 <= d.dev_split < 1.0:
        raise fail("data.dev_split", f"must be in [0, 1), got {d.dev_split}")
    if d.dev and d.dev_split:
        raise fail("data.dev_split", "cannot be used together with data.dev files; choose one")
    if (e.patience or e.every_steps) and not (d.dev or d.dev_split):
        key = "eval.patience" if e.patience else "eval.every_steps"
        raise fail(key, "needs a dev set: set data.dev (files) or data.dev_split")
    _check_metric(e, fail)
    if t.fsdp_keep_gathered < 0:
        raise fail("train.fsdp_keep_gathered", f"must be 0 or more (blocks), got {t.fsdp_keep_gathered}")
    if t.fsdp_offload and t.distributed == "ddp":
        raise fail("train.fsdp_offload", "needs train.distributed fsdp (or auto); ddp keeps everything on the GPU")
    if cfg.quantize != "none" and cfg.method.name in ("full", "freeze"):
        raise fail("quantize", f"{cfg.quantize} keeps the base frozen and quantized; method {cfg.method.name!r} trains "
                               "base weights: use method lora or ptuning, or quantize: none")  # fmt: skip
    try:
        is_text = getattr(codecs.lookup(d.encoding), "_is_text_encoding", True)
    except LookupError:
        is_text = None
    if not is_text:
        raise fail("data.encoding", f"{d.encoding!r} is not a text encoding Python knows; e.g. utf-8, gb18030 "
                                    "(GBK files), utf-16, big5")  # fmt: skip
    if d.format == "columns" and not d.columns:
        raise fail("data.columns", "is needed with data.format 'columns' (prompt/response[/history] field names)")
    if not check_files:
        return
    if not cfg.model:
        raise fail("model", "is required: the folder of the base model (config.json, weights, tokenizer)")
    model = Path(cfg.model)
    if not model.is_dir():
        raise fail("model", f"names no folder: {model}")
    if not (model / "config.json").is_file():
        raise fail("model", f"{model} is not a model folder (no config.json)")
    if not d.train:
        raise fail("data.train", "is required: one or more training files")
    for key, files in (("data.train", d.train), ("data.dev", d.dev)):
        for f in files:
            if not Path(f).is_file():
                raise fail(key, f"file not found: {f}")


GENERATION_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")  # what eval.generate_every_steps measures


def _check_metric(e: EvalConfig, fail: typing.Callable[[str, str], ConfigError]) -> None:
    """``eval.metric`` must be one that will be measured: the dev loss, or a generation metric when generation
    evaluation is on. Another name (a custom eval hook's, through the Python API) only gets a warning."""
    known = ("loss", *GENERATION_METRICS)
    if e.metric == "loss":
        return
    if e.metric in GENERATION_METRICS:
        if not e.generate_every_steps:
            raise fail("eval.metric", f"is {e.metric!r}, a generation metric: set eval.generate_every_steps too")
        return
    plain = e.metric.lower().replace("_", "-").replace(" ", "")
    close = [k for k in known if k.replace("-", "") == plain.replace("-", "")]
    close = close or difflib.get_close_matches(plain, known, n=1, cutoff=0.6)
    if close or not e.generate_every_steps or "rouge" in plain or "bleu" in plain or "loss" in plain:
        hint = f"did you mean {close[0]!r}? " if close else ""
        names = ", ".join(map(repr, GENERATION_METRICS))
        raise fail("eval.metric", f"unknown metric {e.metric!r}; {hint}the metrics are 'loss' (the dev loss) and, "
                                  f"with eval.generate_every_steps, {names}")  # fmt: skip
    log.warning("eval.metric %r is none of the built-in metrics (loss, %s): only a custom eval hook can measure it",
                e.metric, ", ".join(GENERATION_METRICS))  # fmt: skip


# ---- resume -------------------------------------------------------------------------------------------------
# What a resumed run may change: how long it runs, how it evaluates, saves and logs, and the device.
# A resume with another number of processes may split the same global batch otherwise (batch_size, grad_accum: the
# checkpoint's global batch is checked).
RESUMABLE = ("output_dir", "overwrite", "train.max_steps", "train.epochs", "train.max_bad_steps", "train.device",
             "train.batch_size", "train.grad_accum", "train.distributed", "train.fsdp_offload",
             "train.fsdp_keep_gathered", "train.loss_recompute", "eval.", "save.",
             "log.")  # fmt: skip


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in ("data.columns", "data.role_map"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The saved config of the run in ``run_dir`` with ``overrides`` that a resume may change (others: an error)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a glmtune run folder (no config.yaml) to resume")
    saved = load_config(path, check_files=False)
    cfg = load_config(path, overrides)
    before, after = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    frozen = [k for k in changed if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)]
    if frozen:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in frozen)
        raise ConfigError(
            f"{CLI}: a resumed run keeps its model, data, method and batch settings; cannot change {details} "
            f"(start a new run in another output_dir instead)"
        )
    cfg.output_dir = str(run_dir.resolve())
    return cfg
