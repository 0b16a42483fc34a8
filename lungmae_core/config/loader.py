"""The generic configuration loader: a mapping into a frozen, self-checking dataclass, with errors that name
the file, the key and what was allowed.

Every configuration in LungMAE-FL (model, preprocessing, training, ``site.yaml``, ``federation.yaml``) is
a frozen dataclass of plain values that checks itself in ``__post_init__``. This module turns a mapping
(from YAML, from Flower's ``run_config`` or from the command line) into such a dataclass and makes every
error name the file, the key and what was allowed, as nanoGPT's configurator rejects unknown keys.

Examples:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Demo:
    ...     lr: float = 3e-4
    ...     mask_ratio: float = 0.75
    >>> from_mapping(Demo, {"mask-ratio": 0.5}, source="demo.yaml")
    Demo(lr=0.0003, mask_ratio=0.5)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lungmae_core.errors import ConfigError, read_text

__all__ = ["check", "from_mapping", "load_yaml", "norm_key", "to_mapping"]

T = TypeVar("T")


def norm_key(key: str) -> str:
    """A kebab-case key (``mask-ratio``, as in YAML and Flower's run config) as the field name (``mask_ratio``)."""
    return str(key).replace("-", "_")


def _where(source: str, key: str) -> str:
    return f"{source}: '{key}'" if key else source


def check(condition: bool, message: str, error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition``; the helper ``__post_init__`` methods use."""
    if not condition:
        raise error(message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, error: type[ConfigError]) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``error`` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise error(f"{where} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, error)
            except ConfigError as exc:
                last = exc
        raise error(f"{where} must be {_type_name(tp)}; got {value!r}") from last
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise error(f"{where} must be a mapping of keys to values; got {value!r}")
        return from_mapping(tp, value, source=where, error=error)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise error(f"{where} must be a list; got {value!r}")
        args = get_args(tp)
        homogeneous = origin is list or not args or args[-1] is Ellipsis
        if not homogeneous and len(args) != len(value):
            raise error(f"{where} must have {len(args)} items; got {len(value)}: {value!r}")
        item_types = [args[0] if args else Any] * len(value) if homogeneous else list(args)
        items = [_coerce(v, t, f"{where}[{i}]", error) for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise error(f"{where} must be a mapping; got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{where} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise error(f"{where} must be an integer; got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-5" as a string
                except ValueError:
                    pass
            raise error(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{where} must be a string; got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise error(f"{where} must be a path (string); got {value!r}")
        return Path(os.path.expanduser(os.fspath(value)))
    return value


def from_mapping(
    cls: type[T],
    mapping: Mapping[str, Any] | None,
    *,
    source: str = "config",
    error: type[ConfigError] = ConfigError,
) -> T:
    """Build the frozen dataclass ``cls`` from ``mapping``, rejecting unknown keys and bad types.

    Keys may be kebab-case (``mask-ratio``, as in Flower's run config and our YAML) or snake_case.
    Missing keys take the dataclass defaults; a field without a default is required.

    Args:
        cls: a dataclass type whose fields are annotated with plain types (int, float, bool, str, Path,
            Literal, Optional, tuple/list of those, or nested dataclasses).
        mapping: the values; ``None`` means all defaults.
        source: where the values came from, quoted in every error (e.g. ``"site.yaml: 'privacy'"``).
        error: the ``ConfigError`` subclass to raise.

    Raises:
        ConfigError: naming ``source``, the key and the allowed keys or values.
    """
    assert dataclasses.is_dataclass(cls), cls
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise error(f"{source} must be a mapping of keys to values; got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = norm_key(raw_key)
        if key not in fields:
            allowed = ", ".join(sorted(k.replace("_", "-") for k in fields))
            raise error(f"{_where(source, str(raw_key))} is not a known key; allowed keys: {allowed}")
        values[key] = _coerce(value, hints[key], _where(source, str(raw_key)), error)
    for name, field in fields.items():
        if name not in values and field.default is dataclasses.MISSING \
                and field.default_factory is dataclasses.MISSING:
            raise error(f"{_where(source, name.replace('_', '-'))} is required but missing")
    try:
        return cls(**values)
    except ConfigError as exc:
        if str(exc).startswith(source):
            raise
        raise error(f"{source}: {exc}") from exc


def to_mapping(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_mapping`: a JSON/YAML-ready dict with kebab-case keys."""
    assert dataclasses.is_dataclass(obj), obj
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_mapping(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[f.name.replace("_", "-")] = value
    return out


def load_yaml(path: str | os.PathLike[str], error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file and the line."""
    path = Path(path)
    text = read_text(path, error)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"Unable to parse {path}{at} as it is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping of keys to values at the top level; got {type(data).__name__}")
    return data
