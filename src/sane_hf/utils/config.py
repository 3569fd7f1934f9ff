"""The one config mechanism of sane-hf: dataclasses, one loader, flags generated from the fields.

Every run config (`PretrainingConfig`, `ZooConfig`, `SamplingSettings`, `DemoConfig`) is a
dataclass loaded the same way, later sources winning:

1. a **preset name** (a YAML file shipped in ``sane_hf/presets/<kind>/<name>.yaml``) or a
   **YAML/JSON file path**; a mapping may name a ``base`` (preset or file) that it extends;
2. **explicit flags**, one per scalar field, generated from the dataclass (``--learning-rate``);
3. dotted **``key=value`` overrides** (``--set model.latent_dim=64``).

Command-line values are read as YAML 1.2 (``1e-3`` is a float, ``[64, 8]`` a list, ``null`` is
None). Validation lives on the config classes themselves (``__post_init__``), so the Python API
and the CLI refuse the same values with the same one-line message; this module only adds what
a loader must check: unknown keys and value types, each error naming the key and the source.

Why not transformers' ``HfArgumentParser``: it writes every field's default into the parsed
namespace, so a flag the user did not give is indistinguishable from one that repeats the
default, and a preset could never sit underneath the flags. The generator here gives each field
a flag whose absence means "not given".

This is the lowest layer: it imports nothing from sane_hf.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

C = TypeVar("C")

# The key of a mapping that names the preset (or file) the mapping extends.
BASE_KEY = "base"


class LoadableConfig:
    """Mixin of the run configs: ``load`` (preset or file, flags, overrides), ``from_dict``,
    ``to_dict`` and ``save``. ``CONFIG_KIND`` names the preset folder; ``DEFAULT_PRESET`` (if any) is what
    ``load()`` without a source reads."""

    CONFIG_KIND: ClassVar[str]
    DEFAULT_PRESET: ClassVar[str | None] = None

    @classmethod
    def load(
        cls,
        source: str | Path | Mapping[str, Any] | None = None,
        flags: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ):
        """A preset name or YAML/JSON file (default ``DEFAULT_PRESET``, else the field
        defaults), then ``flags`` (field values), then dotted ``key=value`` overrides."""
        return load_config(cls, cls.DEFAULT_PRESET if source is None else source, flags, overrides)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config"):
        """Build from plain values, keys and types checked; ``source`` names where the values
        came from in error messages."""
        return build_config(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        save_config(self, path)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string YAML 1.1 makes
    of a number without a dot."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML 1.2: numbers, ``true``, ``null``, ``[1, 2]``, or a string."""
    return yaml.load(text, Loader=_YamlLoader)


# ----------------------------------------------------------------------------------------------
# Sources: presets and files


def preset_dir(kind: str) -> Path:
    """The folder of the shipped presets of one config kind (``pretraining``, ``zoo``, ...)."""
    return Path(str(resources.files("sane_hf") / "presets" / kind))


def preset_names(kind: str) -> list[str]:
    """Names of the shipped presets of ``kind``."""
    folder = preset_dir(kind)
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.load(text, _YamlLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"config file {path} is not valid {path.suffix[1:]}: {reason}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(values).__name__}")
    return values


def load_values(source: str | Path | Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Plain values of a preset name, a file path or a mapping, with ``base`` resolved.

    A string with a path separator or a ``.yaml``/``.yml``/``.json`` suffix is a file; any other
    string is a preset of ``kind``. Nested ``base`` keys of sections are resolved by
    `build_config`, which knows each section's kind.
    """
    if isinstance(source, Mapping):
        values = copy.deepcopy(dict(source))
    else:
        text = str(source)
        is_file = isinstance(source, Path) or "/" in text or Path(text).suffix in _SUFFIXES
        if is_file:
            values = read_config_file(text)
        elif (path := preset_dir(kind) / f"{text}.yaml").is_file():
            values = read_config_file(path)
        else:
            raise ValueError(
                f"unknown {kind} preset {text!r}: choose one of {preset_names(kind)} or give a "
                "YAML/JSON file path"
            )
    if BASE_KEY in values:
        base = values.pop(BASE_KEY)
        values = merge(load_values(base, kind), values)
    return values


_SUFFIXES = (".yaml", ".yml", ".json")


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a (nested) config dict; dotted keys reach into sections."""
    values = copy.deepcopy(dict(values))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {override!r}")
        *sections, name = key.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {override!r}: {section!r} is not a section")
        target[name] = parse_value(text)
    return values


# ----------------------------------------------------------------------------------------------
# Values -> dataclass


def build_config(cls: type[C], values: Mapping[str, Any], source: str = "config") -> C:
    """``cls(**values)`` after checking keys and types; nested dataclass sections are built
    the same way (a section may name its own ``base`` preset). ``source`` names where the
    values came from in error messages."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(values) - set(known)):
        raise ValueError(f"unknown key(s) {unknown} in {source}; valid keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(value, hints[name], name, source) for name, value in values.items()}
    return cls(**kwargs)


def _convert(value: Any, hint: Any, name: str, source: str) -> Any:
    """``value`` checked against the annotation ``hint``: ints become floats where a float is
    expected, lists become tuples where a tuple is, mappings become nested dataclasses."""
    options = _union_options(hint)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise ValueError(f"{name} in {source} must not be null")
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping | str):
            kind = getattr(option, "CONFIG_KIND", name)
            return build_config(option, load_values(value, kind), f"{source} [{name}]")
    for option in options:
        converted = _as_type(value, option, name, source)
        if converted is not _NO_MATCH:
            return converted
    expected = " or ".join(_type_name(option) for option in options)
    raise ValueError(f"{name} in {source} must be {expected}, got {value!r}")


_NO_MATCH = object()


def _as_type(value: Any, hint: Any, name: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if typing.get_origin(hint) is typing.Literal:
        return value if value in args else _NO_MATCH
    if hint is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if hint is float:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if is_number else _NO_MATCH
    if hint is str:
        return value if isinstance(value, str) else _NO_MATCH
    if hint is dict or origin is dict:
        return dict(value) if isinstance(value, Mapping) else _NO_MATCH
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return _NO_MATCH
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            return _NO_MATCH
        item_hints = [args[0] if args else Any] * len(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            item_hints = list(args)
        items = [
            _convert(v, h, f"{name}[{i}]", source)
            for i, (v, h) in enumerate(zip(value, item_hints))
        ]
        return tuple(items) if (origin or hint) is tuple else items
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _NO_MATCH
    return value


def _union_options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON/YAML data (tuples become lists); a section whose class defines its
    own ``to_dict`` (a model section listing only the fields it sets) is written by it."""
    return json.loads(json.dumps(_plain(config)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(type(value), "to_dict", None)
        if own is not None and own is not LoadableConfig.to_dict:
            return own(value)
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML (the format every loader reads back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config(
    cls: type[C],
    source: str | Path | Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """``cls`` from a preset name or file (or a mapping), then flags, then ``key=value``
    overrides; the one loader of every run config (``cls.CONFIG_KIND`` names its presets)."""
    kind = getattr(cls, "CONFIG_KIND", cls.__name__)
    values = {} if source is None else load_values(source, kind)
    values = merge(values, dict(flags or {}))
    values = apply_overrides(values, overrides)
    where = "arguments" if source is None else f"{source}"
    if flags or overrides:
        where += " or the flags/--set"
    return build_config(cls, values, source=where)


# ----------------------------------------------------------------------------------------------
# Command-line flags generated from the fields


def _flag_type(hint: Any) -> Any | None:
    """The argparse ``type`` of a field that gets a flag: scalars and lists of scalars, read as
    YAML 1.2; None for fields that only ``--set`` reaches (mappings, nested sections)."""
    options = [o for o in _union_options(hint) if o is not type(None)]
    for option in options:
        if dataclasses.is_dataclass(option) or option is dict or typing.get_origin(option) is dict:
            return None
    return parse_value


def add_source_arguments(parser: argparse.ArgumentParser, kind: str, what: str) -> None:
    """``--config`` (a preset name of ``kind`` or a file of ``what``) and ``--set KEY=VALUE``:
    the first and last sources of `load_config`."""
    names = ", ".join(preset_names(kind)) or "none shipped"
    parser.add_argument("--config", help=f"preset name ({names}) or a YAML/JSON file of {what}")
    add_overrides_argument(parser)


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable, ``args.overrides``): the last source of `load_config`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value (applied last); dotted keys reach into sections. Values of "
        "flags and --set are read as YAML: 3e-4, true, null, [1, 2]",
    )


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Sequence[str] = (),
    help_overrides: Mapping[str, str] | None = None,
    config_flag: bool = True,
) -> None:
    """``--config`` (preset name or file), ``--set KEY=VALUE`` and one flag per scalar field of
    ``cls`` (``learning_rate`` -> ``--learning-rate``) and of its sections (``model.d_model`` ->
    ``--model.d-model``). Flags default to "not given", so the preset's values stay unless a
    flag is on the command line."""
    if config_flag:
        add_source_arguments(parser, getattr(cls, "CONFIG_KIND", cls.__name__), cls.__name__)
    _add_field_flags(parser, cls, "", skip, help_overrides or {})


def _add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str,
    skip: Sequence[str],
    help_overrides: Mapping[str, str],
) -> None:
    hints = typing.get_type_hints(cls)
    for config_field in dataclasses.fields(cls):
        name, hint = config_field.name, hints[config_field.name]
        if name in skip or not config_field.init:
            continue
        sections = [o for o in _union_options(hint) if dataclasses.is_dataclass(o)]
        if sections:  # a typed section (``model``): a flag per field of it
            _add_field_flags(parser, sections[0], f"{prefix}{name}.", (), help_overrides)
            continue
        if _flag_type(hint) is None:
            continue
        if config_field.default_factory is not dataclasses.MISSING:
            default = config_field.default_factory()
        else:
            default = config_field.default
        key = prefix + name
        text = help_overrides.get(key, f"{key} (default: {json.dumps(default)})")
        is_flag = bool in _union_options(hint)  # --push-to-hub alone means true
        parser.add_argument(
            "--" + key.replace("_", "-"),
            dest=f"field_{key}",
            nargs="?" if is_flag else None,
            const=True if is_flag else None,
            type=parse_value,
            default=argparse.SUPPRESS,  # absent flag: not in the namespace, the preset stays
            metavar="VALUE",
            help=text,
        )


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags (``add_config_arguments``) in parsed arguments; flags of
    a section (``--model.d-model``) become a nested mapping."""
    flags: dict[str, Any] = {}
    for name, value in vars(args).items():
        if not name.startswith("field_"):
            continue
        *sections, key = name.removeprefix("field_").split(".")
        target = flags
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return flags


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config of parsed arguments: preset or file, then flags, then ``--set``."""
    return load_config(
        cls,
        getattr(args, "config", None),
        flags_from_args(args),
        getattr(args, "overrides", ()) or (),
    )
