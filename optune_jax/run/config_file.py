"""Loading a run configuration: YAML files and `--set` overrides into the frozen schema.

    cfg = load_config("configs/run.yaml", ["optune.rho=0.7", "data.train_files=[a.jsonl, b.jsonl]"])

Every field has a default, so `load_config(None, [])` is a complete run. Loading is strict:
unknown keys (with the nearest valid name), wrong types, out-of-range values and unknown choices
are each one-line `ConfigError`s, checked against the fields' metadata (`schema.option`) by one
validator (`_build`). Ints are accepted for float fields; `null` only for optional ones. YAML
lists become tuples (the config is frozen and hashable).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from optune_jax.run.errors import ConfigError, describe_os_error
from optune_jax.run.schema import RunConfig


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-7` as a float (PyYAML's YAML 1.1 rule wants `5.0e-7`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"cannot parse {where}: {problem}{at}") from None


# ------------------------------------------------------------------------------------ validation


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).splitlines()[0]  # null, true, false
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def _type_name(tp: Any) -> str:
    if _optional_inner(tp) is not None:
        return f"{_type_name(_optional_inner(tp))} | None"
    if typing.get_origin(tp) is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return tp.__name__


def _optional_inner(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _parse_range(spec: str) -> tuple[float, float, bool, bool]:
    low, high = (float(x) for x in spec[1:-1].split(","))
    return low, high, spec[0] == "(", spec[-1] == ")"


def _in_range(value: float, spec: str) -> bool:
    low, high, low_open, high_open = _parse_range(spec)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below  # False for NaN


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` checked against the annotation `tp` (ints widened to float, lists to tuples)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, root)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, root)

    def wrong() -> ConfigError:
        if value is None:
            return ConfigError(f"{key}=null is not allowed: expected {_type_name(tp)} "
                               "(null is allowed only for optional fields)")
        return ConfigError(f"{key}={_show(value)} has the wrong type: expected "
                           f"{_type_name(tp)}, got {type(value).__name__}")

    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise wrong()
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(item, item_tp, f"{key}[{i}]", root) for i, item in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp is int and isinstance(value, bool):  # bool is an int subclass; `true` is no count
        raise wrong()
    if not isinstance(value, tp):
        raise wrong()
    return value


def _check(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    if "range" in meta and not _in_range(value, meta["range"]):
        raise ConfigError(f"{key}={_show(value)} is out of range {meta['range']}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}={_show(value)} is not one of: {', '.join(meta['choices'])}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
    return keys


def _unknown(key: str, siblings: Sequence[str], root: type) -> ConfigError:
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        guess = f"{section}.{close[0]}" if section else close[0]
    else:  # the right name in the wrong section?
        guess = next((k for k in _all_keys(root) if k.rpartition(".")[2] == leaf), None)
    hint = f"did you mean {guess!r}?" if guess else f"valid keys here: {', '.join(siblings)}"
    return ConfigError(f"unknown key {key!r}; {hint}")


def _build(cls: type, raw: Any, prefix: str = "", root: type | None = None) -> Any:
    """An instance of the dataclass `cls` from the mapping `raw`, validated field by field.

    `root` is the whole schema (default `cls`), searched for a key given in the wrong section.
    """
    root = root or cls
    where = prefix.rstrip(".")
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where}={_show(raw)} has the wrong type: expected a mapping of keys, "
            f"got {type(raw).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            raise _unknown(f"{where}.{name}" if where else str(name), list(fields), root)
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key, root)
        _check(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------- public


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    value = _parse_yaml(text, f"override {override!r}")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _read_error(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    return describe_os_error(error)


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, schema: type = RunConfig
) -> Any:
    """The validated run configuration (a `schema` instance: RunConfig, or another trainer's).

    Args:
      path: a YAML file of sections (`optune: {rho: 0.5}`, ...); None for all defaults.
      overrides: `section.key=value` strings applied after the file; value is YAML
        (`0.5`, `null`, `[a.jsonl, b.jsonl]`).
    Returns:
      the frozen `schema` instance. Raises ConfigError (one line) for any invalid input, an
      unreadable file, or an empty one.
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {_read_error(e)}") from None
        raw = _parse_yaml(text, f"config file {path}")
        if raw is None:  # empty, or only comments: most likely the wrong file or a lost edit
            raise ConfigError(
                f"config file {path} is empty; give at least one section (an empty mapping "
                "`{}` runs every default)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(raw).__name__}"
            )
    for override in overrides:
        _apply_override(raw, override)
    return _build(schema, raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples as lists), for YAML: `load_config` reads it back equal."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def describe_options(cls: type = RunConfig, prefix: str = "") -> str:
    """One line per key: `key  type = default  allowed values` (the CLI's --help epilog)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            lines.append(describe_options(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = ""
        if "range" in f.metadata:
            allowed = f"in {f.metadata['range']}"
        elif "choices" in f.metadata:
            allowed = f"one of: {', '.join(f.metadata['choices'])}"
        lines.append(f"  {key:<32} {_type_name(tp):<12} = {_show(default):<28} {allowed}".rstrip())
    return "\n".join(lines)

