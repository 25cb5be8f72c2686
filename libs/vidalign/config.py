"""Loading nested config dataclasses from YAML, with errors that name the field.

Each job owns a dataclass tree (``kw_only=True``); ``load_config`` fills it from
a YAML file plus ``--set a.b=value`` overrides, rejects unknown keys (a typo
must not silently fall back to a default), and converts scalars to the field's
type. Validation of values lives in each dataclass's ``__post_init__``.

The command line of a config-driven job is built here too, so that every job
has the same grammar: ``add_config_arguments`` gives a parser ``--config``,
``--set``, ``--print-config`` (and ``--resume``) plus a listing of every config
key with its type, default and docstring in ``--help``; ``config_from_args``
loads the config those flags describe. ``HelpFormatter`` shows each option's
default. This module stays free of heavy imports (no torch): ``vidalign --help``
builds every parser.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's schema."""


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot convert {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return converted
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
            f"known: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {
        name: _convert(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a missing field, or __post_init__ validation
        raise ConfigError(f"{where + ': ' if where else ''}{err}") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) into ``cls``, then apply ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: expected key=value")
        # An empty value is the empty string (yaml reads '' as null); `null` stays None.
        _set_path(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_digest(config: Any) -> str:
    """A stable digest of a config, recorded with every artifact it produced."""
    canonical = json.dumps(to_dict(config), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --- the command line of config-driven jobs ------------------------------------------

ConfigClass = type | str
"""A config dataclass, or ``"module:Class"`` imported only when needed (help, run)."""


def resolve_config_class(cls: ConfigClass) -> type:
    """The class itself, imported from ``"module:Class"`` where given as a string."""
    if isinstance(cls, str):
        module, _, name = cls.partition(":")
        return getattr(importlib.import_module(module), name)
    return cls


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after it in the class body.

    Inherited fields are documented by the class that declares them.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, after in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One settable key of a config tree, as ``--help`` lists it."""

    key: str
    """Dotted path, e.g. ``train.lr``."""
    type: str
    default: str
    """The default as YAML (what ``--set`` takes), or ``(required)``."""
    doc: str


_NO_DEFAULT = object()


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML, the way ``--set KEY=VALUE`` would spell it."""
    if isinstance(value, str) and value == "":
        return "''"
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and paths as the dicts, lists and strings YAML can write."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def config_keys(cls: ConfigClass) -> list[ConfigKey]:
    """Every key of a config tree (nested sections flattened to dotted keys), in field order."""
    return list(_config_keys(resolve_config_class(cls), None, ""))


def _config_keys(cls: type, instance: Any, prefix: str) -> typing.Iterator[ConfigKey]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if instance is not None:
            value = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = _NO_DEFAULT
        key = f"{prefix}{f.name}"
        section = _dataclass_of(hints[f.name])
        if section is not None and (value is None or dataclasses.is_dataclass(value)):
            if value is None:  # an optional section, off by default: list what it would hold
                yield ConfigKey(key, _type_name(hints[f.name]), "null", docs.get(f.name, ""))
            yield from _config_keys(section, value, f"{key}.")
            continue
        default = "(required)" if value is _NO_DEFAULT else yaml_value(value)
        yield ConfigKey(key, _type_name(hints[f.name]), default, docs.get(f.name, ""))


def format_config_keys(cls: ConfigClass, width: int = 100) -> str:
    """The ``config keys`` section of a job's ``--help``."""
    lines = ["config keys (override with --set KEY=VALUE; --print-config shows the result):"]
    for item in config_keys(cls):
        lines.append(f"  {item.key}: {item.type} = {item.default}")
        if item.doc:
            doc = " ".join(item.doc.split())
            lines += textwrap.wrap(doc, width=width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines)


class _ConfigEpilog(str):
    """A parser's epilog that ``HelpFormatter`` expands into the config key listing."""

    config_class: ConfigClass
    example: str | None

    def __new__(cls, config_class: ConfigClass, example: str | None) -> _ConfigEpilog:
        text = super().__new__(cls, "config keys: see --help")
        text.config_class = config_class
        text.example = example
        return text


def default_text(default: Any) -> str:
    """How ``--help`` shows an option's default."""
    if default is None or default == [] or default == ():
        return "none"
    if default is False:
        return "off"
    if default is True:
        return "on"
    if isinstance(default, list | tuple):
        return " ".join(str(d) for d in default)
    return str(default)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless its help already says it) and a job's config keys.

    A help text that names its default in words, e.g. ``(default: cuda if
    available)``, is left alone; required options say ``(required)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "(required" in text or not action.option_strings:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)".strip()
        shown = default_text(action.default).replace("%", "%%")
        return f"{text} (default: {shown})".strip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never inside a name such as tiny-animatediff or --teacher-model.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def add_text(self, text: str | None) -> None:
        if isinstance(text, _ConfigEpilog):
            example = f"example:\n  {text.example}\n\n" if text.example else ""
            text = example + format_config_keys(text.config_class)
        super().add_text(text)


class _DeprecatedFlag(argparse.Action):
    """An old spelling of a renamed flag: hidden from the help, stores into the new flag's dest."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        print(f"vidalign: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_option(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    old: Sequence[str] = (),
    required: bool = False,
    **kwargs: Any,
) -> argparse.Action:
    """``parser.add_argument(flag, ...)`` that also accepts the flag's ``old`` spellings.

    An old spelling is hidden from ``--help``, warns on stderr and fills the new
    flag's value; giving both is an error.
    """
    if not old:
        return parser.add_argument(flag, required=required, **kwargs)
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(flag, **kwargs)
    if required:
        action.help = f"{action.help or ''} (required)".strip()
    for spelling in old:
        group.add_argument(
            spelling, dest=action.dest, action=_DeprecatedFlag, new=flag, type=action.type,
            metavar=action.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
        )
    return action


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: ConfigClass,
    *,
    example: str | None = None,
    resume: bool = False,
    config_required: bool = False,
) -> argparse.ArgumentParser:
    """Give a job's parser the config grammar: --config, --set, --print-config [, --resume].

    ``cls`` may be ``"module:Class"``: it is imported only to format ``--help``
    (the key listing goes in the epilog) or to load the config.
    """
    parser.add_argument(
        "--config", metavar="YAML", required=config_required,
        help="YAML config; keys it leaves out keep their defaults"
        + ("" if config_required else " (default: none: every key at its default)"),
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key after --config, dotted (e.g. train.steps=10), VALUE in YAML; "
        "an empty VALUE is the empty string, null is None; repeatable (default: none)",
    )
    if resume:
        parser.add_argument(
            "--resume", action="store_true",
            help="continue from the newest checkpoint in the output dir (default: off: start fresh)",
        )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (after --config and --set) as YAML and exit "
        "(default: off)",
    )
    describe_config(parser, cls, example=example)
    parser.set_defaults(config_class=cls)
    return parser


def describe_config(
    parser: argparse.ArgumentParser, cls: ConfigClass, *, example: str | None = None
) -> None:
    """List ``cls``'s keys (type, default, docstring) in ``parser``'s ``--help``, after an example."""
    parser.formatter_class = HelpFormatter
    parser.epilog = _ConfigEpilog(cls, example)


def dump_config(config: Any) -> str:
    """A config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(_plain(config), sort_keys=False, width=1 << 16)


def config_from_args(cls: ConfigClass, args: argparse.Namespace) -> Any:
    """The config that ``--config`` and ``--set`` describe.

    With ``--print-config`` it prints that config as YAML and exits with
    status 0 (``SystemExit``) instead of returning it.
    """
    config = load_config(resolve_config_class(cls), args.config, args.set)
    if getattr(args, "print_config", False):
        sys.stdout.write(dump_config(config))
        sys.stdout.flush()
        raise SystemExit(0)
    return config
