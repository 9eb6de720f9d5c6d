"""Load a :class:`Config` from TOML plus ``--set`` overrides, validate it in one place,
and write the resolved result back as TOML."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from farflung.config.schema import SECTIONS, Config, ModelConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    choices: Mapping[str, Iterable[str]] | None = None,
) -> Config:
    """Read ``path`` (TOML), apply ``section.key=value`` overrides, validate.

    ``choices`` adds allowed values that live in higher layers (for instance
    ``{"parallel.algorithm": registry names}``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, choices)


def read_json(path: str | Path, what: str, hint: str = "") -> Any:
    """The JSON value in file ``path``; a missing, unreadable or malformed file is a
    ConfigError naming ``what`` (e.g. "placement file") and the path, plus ``hint``."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}") from None
    except OSError as e:
        raise ConfigError(f"{what} {p}: cannot read it: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {p}: not valid JSON ({e}){hint}") from None


def config_from_dict(
    raw: Mapping[str, Any], choices: Mapping[str, Iterable[str]] | None = None
) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] (allowed: {', '.join(SECTIONS)})")
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table of keys, got {value!r}")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name, {}))
    cfg = Config(**sections)
    validate(cfg, choices)
    return cfg


def validate(cfg: Config, choices: Mapping[str, Iterable[str]] | None = None) -> None:
    """Check bounds, choices and cross-field rules; raise :class:`ConfigError`."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            # NaN passes every bound check (all comparisons are false), so ask first
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name}.{f.name} = {v!r} is not allowed; a finite number is")
        for key, allowed in section.CHOICES.items():
            _check_choice(f"{name}.{key}", getattr(section, key), allowed)
        for key, (lo, hi) in section.BOUNDS.items():
            v = getattr(section, key)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{name}.{key} = {v!r} is out of range; allowed {rng}")
    for dotted, allowed in (choices or {}).items():
        section, key = dotted.split(".")
        _check_choice(dotted, getattr(getattr(cfg, section), key), tuple(allowed))
    _validate_model(cfg.model)
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"optim.min_lr = {cfg.optim.min_lr} must not exceed optim.lr = {cfg.optim.lr}"
        )
    if cfg.elastic.enabled and cfg.pipeline.stages > 1:
        raise ConfigError(
            "elastic.enabled = true works with data parallelism only; allowed: "
            "pipeline.stages = 1 (or elastic.enabled = false)"
        )
    if cfg.train.precision == "fp16" and cfg.parallel.algorithm == "compressed":
        raise ConfigError(
            "train.precision = 'fp16' does not work with parallel.algorithm = 'compressed' "
            "yet (its codecs cannot carry an overflow to every rank); allowed: bf16 or "
            "fp32 with it, or fp16 with allreduce, cocktail, diloco or gossip"
        )
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty; allowed: 'bundled' and/or file paths")
    _validate_pipeline(cfg)


def _validate_model(m: ModelConfig) -> None:
    if m.recompute_every() is None:
        raise ConfigError(
            f"model.activation_checkpointing = {m.activation_checkpointing!r}; allowed: "
            "'none', 'blocks' or 'every:K' (K >= 1)"
        )
    if m.d_model % m.n_head:
        raise ConfigError(f"model.n_head = {m.n_head} must divide model.d_model = {m.d_model}")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_kv_head = {m.n_kv_head} must divide model.n_head = {m.n_head}")
    if m.n_kv_head and m.arch != "llama":
        raise ConfigError("model.n_kv_head is for arch = 'llama'; allowed with arch = 'gpt2': 0")
    if m.max_positions and m.max_positions < m.context:
        raise ConfigError(
            f"model.context = {m.context} exceeds model.max_positions = {m.max_positions}"
        )
    if m.init_from and not m.init_from.startswith(("hf:", "run:")):
        raise ConfigError(
            f"model.init_from = {m.init_from!r}; allowed: '' (random), 'hf:PATH' or 'run:PATH'"
        )


def _validate_pipeline(cfg: Config) -> None:
    p, n = cfg.pipeline, cfg.model.n_layer
    if p.stages > n:
        raise ConfigError(
            f"pipeline.stages = {p.stages} exceeds model.n_layer = {n}: every stage needs "
            f"at least one block; allowed: 1..{n}"
        )
    if p.layers and (len(p.layers) != p.stages or min(p.layers) < 1 or sum(p.layers) != n):
        raise ConfigError(
            f"pipeline.layers = {p.layers} must list {p.stages} block counts (one per "
            f"pipeline.stages), each >= 1, summing to model.n_layer = {n}"
        )


def check_pipeline(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """Shape of a pipeline run on ``world_size`` workers.

    Returns ``(dp, local_batch, micro_batch)``: data-parallel replicas per stage, the
    sequences each pipeline trains on per step, and the sequences per micro-batch."""
    p, b = cfg.pipeline, cfg.train.batch_size
    if world_size % p.stages:
        raise ConfigError(
            f"the {world_size} workers do not divide into pipeline.stages = {p.stages}; "
            f"allowed: a world size that is a multiple of {p.stages}"
        )
    dp = world_size // p.stages
    if b % (dp * p.micro_batches):
        raise ConfigError(
            f"train.batch_size = {b} must divide into {dp} data-parallel replica(s) x "
            f"pipeline.micro_batches = {p.micro_batches}; allowed: a multiple of "
            f"{dp * p.micro_batches}"
        )
    local = b // dp
    micro = local // p.micro_batches
    if cfg.train.micro_batch_size not in (0, micro):
        raise ConfigError(
            f"train.micro_batch_size = {cfg.train.micro_batch_size} conflicts with the "
            f"pipeline's micro-batch of {micro} (train.batch_size / dp / "
            "pipeline.micro_batches); allowed: 0"
        )
    return dp, local, micro


def check_batch(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """Split the global batch over ``world_size`` workers.

    Returns ``(local_batch, micro_batch, accumulation_steps)``; with pipeline stages,
    the local batch is a pipeline's and the accumulation steps its micro-batches."""
    if cfg.pipeline.stages > 1:
        _, local, micro = check_pipeline(cfg, world_size)
        return local, micro, cfg.pipeline.micro_batches
    b, mb = cfg.train.batch_size, cfg.train.micro_batch_size
    if cfg.elastic.enabled:  # shares follow the membership: any split is allowed
        if b < world_size:
            raise ConfigError(
                f"train.batch_size = {b} is smaller than the {world_size} workers; "
                f"allowed: at least {world_size}"
            )
        return b // world_size, mb or b // world_size, 1
    if b % world_size:
        raise ConfigError(
            f"train.batch_size = {b} must be divisible by the {world_size} data-parallel "
            f"workers; allowed: a multiple of {world_size}"
        )
    local = b // world_size
    mb = mb or local
    if local % mb:
        raise ConfigError(
            f"train.micro_batch_size = {mb} must divide the local batch {local} "
            f"(train.batch_size {b} / {world_size} workers)"
        )
    return local, mb, local // mb


def config_to_toml(cfg: Config) -> str:
    """Serialise the resolved config (every field, defaults included)."""
    lines = []
    for name in SECTIONS:
        lines.append(f"[{name}]")
        for f in dataclasses.fields(getattr(cfg, name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a config dataclass's fields (the string after each field)."""
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:], strict=False):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key} (allowed: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} must be a list of {item.__name__}")
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} = {value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # a choice such as optim.fused = true
            return "true" if value else "false"
        raise ConfigError(f"{key} = {value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    section, key = parts
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"--set {item!r}: [{section}] is not a table")
    raw[section][key] = _parse_scalar(text.strip())


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as an algorithm name


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")  # pragma: no cover
