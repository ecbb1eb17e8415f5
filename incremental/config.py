"""Typed, validated run configurations from YAML with ``--set key=value`` overrides.

Configs are nested dataclasses. Loading checks every key against the dataclass fields (an unknown key
is a typo that would otherwise silently run the default), every value against the field's type, and
then calls the dataclass's ``validate()`` for values that are impossible together. Every error is one
line naming the dotted key, raised as :class:`ConfigError` (the CLI turns it into exit code 2).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule.

    PyYAML implements YAML 1.1, where a float needs a dot: ``1e-3`` (how most people write a
    learning rate) is read as the *string* ``'1e-3'``. YAML 1.2 reads ``1e-3``, ``5e2`` and ``.5`` as
    numbers. Only the float rule changes; integers, booleans and the rest stay as PyYAML reads them.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) if tag != _FLOAT_TAG else (tag, _YAML12_FLOAT) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, with YAML 1.2's float rule (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``): an error message
    quotes file names, keys and values the user wrote, and must stay one line whatever they hold."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class InputError(ValueError):
    """Base of the project's bad-input errors (config, data, model package, command line): the message
    is one line naming the file, key or value; the CLI prints it and exits with code 2."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(_unwrap_worker_message(str(message))))


def _unwrap_worker_message(text: str) -> str:
    """A DataLoader re-raises a worker's error as ``type(error)(message)`` where the message holds the
    worker's traceback; the user-facing message is its last line, after the exception's name."""
    if "Traceback (most recent call last)" not in text:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    name, sep, rest = last.partition(": ")
    return rest if sep and name.rsplit(".", 1)[-1].endswith("Error") else last


class ConfigError(InputError):
    """A bad configuration value; ``str(error)`` is one line naming the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise ConfigError("", f"{path}: nested too deeply to be a config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``[3,1,2,0]``, ``true``, ``0.1``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = parse_yaml(raw)
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(key, f"cannot parse value {raw!r} as YAML") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # ``mem_size: 5e2`` is how people write 500
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise ConfigError(key, f"{value} is out of range (64-bit integers)")
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(key, f"{value} is out of range") from None
            if not math.isfinite(number):
                raise ConfigError(key, f"expected a finite number, got {value!r}")
            return number
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types; runs ``validate()`` if defined."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a section (mapping), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key (known here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    obj = cls(**kwargs)
    if prefix == "":
        _validate_tree(obj, "")
    return obj


def _validate_tree(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{prefix}{f.name}.")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def check(condition: bool, key: str, message: str) -> None:
    """Raise a one-line :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one value against a type hint, as config loading does for every key
    (used for options that are not dataclass fields: plugin options in ``strategy.plugins``)."""
    return _coerce(value, tp, key)
