"""The configuration as TOML: what ``config show`` prints and the example file is made of.

config.py reads TOML into the dataclasses; this goes the other way, by walking
the dataclasses themselves, so a field added there shows up here (and in the
example's test, until it is described) with no change to this module. Only
where a TOML key is not its field does this need to know the loader: [server]
holds Config's plain fields, listeners and [http] have ``address`` for host
and port, resolvers are "host:port" strings, a route's smarthost keys sit in
the route's own table, and [delivery.tls_policy] maps domains to policies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from relaygate.config import (
    Config,
    DeliveryConfig,
    HTTPConfig,
    LDAPConfig,
    ListenerConfig,
    RetentionConfig,
    RouteConfig,
    VerifyConfig,
    config_from_dict,
)
from relaygate.durations import format_duration

TomlValue: TypeAlias = "str | int | float | bool | list[TomlValue] | dict[str, TomlValue]"

SectionKind = Literal["table", "optional", "array", "map"]


@dataclass(frozen=True)
class Setting:
    key: str  # the TOML key in its table
    doc: str  # its entry in the description table: "delivery.smarthost.port"
    value: TomlValue | None  # None: not set
    default: TomlValue | None = None  # the type's own default (None: none, or computed)
    required: bool = False  # the type has no default: a table of this kind must set it


@dataclass
class Section:
    name: str  # the TOML table: "delivery.smarthost"
    kind: SectionKind  # optional/array/map: its presence changes something
    settings: list[Setting] = field(default_factory=list)
    present: bool = True  # False: absent (show) or a template (the types alone)

    @property
    def doc(self) -> str:
        return self.name


@dataclass(frozen=True)
class Doc:
    """One line of the description table (config_docs.py)."""

    text: str
    example: Any = None  # shown instead of a default the type cannot give


# ----------------------------------------------------------------- walking


_SKIPPED = {(Config, "quickstart"), (Config, "source")}  # not settings
_ADDRESS_TYPES = (ListenerConfig, HTTPConfig)  # host and port: one "address" key
_FLATTENED = {(RouteConfig, "smarthost")}  # its keys sit in the route's table
_MAPS = {(DeliveryConfig, "tls_policy")}  # pairs: a table of domain = policy


def _address(host: Any, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _resolvers(value: Any) -> TomlValue:
    return [_address(host, port) for host, port in value]


def _age(value: Any) -> TomlValue:
    return "off" if value is None else format_duration(value)


# Fields whose TOML form is not the generic one (encode); an encoder is given
# None too, for a field where "not set" has a TOML spelling (such as "off").
_ENCODERS = {
    (DeliveryConfig, "resolvers"): _resolvers,
    (RetentionConfig, "max_age"): _age,
    (RetentionConfig, "body_max_age"): _age,
    (LDAPConfig, "cache_ttl"): _age,
    (VerifyConfig, "cache_ttl"): _age,
    (VerifyConfig, "negative_cache_ttl"): _age,
}


def encode(value: Any) -> TomlValue | None:
    """A dataclass value as the TOML value the loader reads back into it."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [item for item in (encode(v) for v in value) if item is not None]
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, encode(v)) for k, v in value.items()) if v is not None}
    raise TypeError(f"no TOML form for {value!r}")


class _Absent:
    """Walking the types alone: there is no value, only defaults."""


_ABSENT = _Absent()


def _nested(hint: Any) -> tuple[SectionKind, type[Any]] | None:
    """Is a field's type a table (a dataclass), an optional one, or an array of them?"""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return "table", hint
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) and isinstance(inner[0], type):
            return "optional", inner[0]
    array = origin is tuple and len(args) == 2 and args[1] is Ellipsis
    if array and dataclasses.is_dataclass(args[0]) and isinstance(args[0], type):
        return "array", args[0]
    return None


_COMPUTED = {(Config, "node_name")}  # defaults that depend on the machine: no fixed one


def _default(cls: type[Any], f: dataclasses.Field[Any]) -> tuple[Any, bool]:
    """(the field's default, required: it has none)."""
    if (cls, f.name) in _COMPUTED:
        return None, False
    if f.default is not dataclasses.MISSING:
        return f.default, False
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory(), False
    return None, True


def _settings(
    cls: type[Any], value: Any, doc: str, tables: str | None = None
) -> tuple[list[Setting], list[Section]]:
    """The plain keys of one table (``doc``), and the tables nested in it
    (named under ``tables``, by default the same)."""
    prefix = doc + "." if tables is None else tables
    hints = typing.get_type_hints(cls)
    settings: list[Setting] = []
    nested: list[Section] = []
    for f in dataclasses.fields(cls):
        if (cls, f.name) in _SKIPPED:
            continue
        current = _ABSENT if value is _ABSENT else getattr(value, f.name)
        kind = _nested(hints[f.name])
        if (cls, f.name) in _FLATTENED and kind is not None:
            # A route's smarthost keys are described once, under [delivery.smarthost].
            inner, more = _settings(kind[1], current, doc.rpartition(".")[0] + "." + f.name)
            settings += inner
            nested += more
        elif (cls, f.name) in _MAPS:
            entries = () if current is _ABSENT else current
            nested.append(
                Section(
                    prefix + f.name,
                    "map",
                    [Setting(str(k), prefix + f.name, encode(v)) for k, v in entries],
                    present=bool(entries),
                )
            )
        elif kind is not None:
            nested += _sections(prefix + f.name, kind[0], kind[1], current)
        elif issubclass(cls, _ADDRESS_TYPES) and f.name in ("host", "port"):
            if f.name == "port":
                continue
            host, host_required = _default(cls, f)
            port, port_required = _default(cls, cls.__dataclass_fields__["port"])
            required = host_required or port_required
            settings.append(
                Setting(
                    "address",
                    f"{doc}.address",
                    None if value is _ABSENT else _address(value.host, value.port),
                    None if required else _address(host, port),
                    required,
                )
            )
        else:
            default, required = _default(cls, f)
            encoder = _ENCODERS.get((cls, f.name), encode)
            settings.append(
                Setting(
                    f.name,
                    f"{doc}.{f.name}",
                    None if current is _ABSENT else encoder(current),
                    None if required else encoder(default),  # an encoder may name None
                    required,
                )
            )
    return settings, nested


def _sections(name: str, kind: SectionKind, cls: type[Any], value: Any) -> list[Section]:
    if kind == "array":
        items = [_ABSENT] if value is _ABSENT or not value else list(value)
        found: list[Section] = []
        for item in items:
            settings, nested = _settings(cls, item, name)
            found += [Section(name, kind, settings, present=item is not _ABSENT), *nested]
        return found
    present = value is not _ABSENT and value is not None
    settings, nested = _settings(cls, value if present else _ABSENT, name)
    return [Section(name, kind, settings, present=present or kind == "table"), *nested]


def sections(config: Config | None) -> list[Section]:
    """Every table of ``config`` in the loader's terms; None: the types alone,
    with their defaults and one template entry for each array of tables.
    Config's own plain fields make the [server] table."""
    settings, nested = _settings(Config, _ABSENT if config is None else config, "server", "")
    return [Section("server", "table", settings), *nested]


# ----------------------------------------------------------------- secrets


_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
MASK = "***"


def mask_url(text: str) -> str:
    """A URL's password (``user:PASSWORD@`` or ``?password=``) replaced by ***."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    query = rest.find("?")
    at = rest.rfind("@", 0, query if query >= 0 else len(rest))
    if at >= 0 and ":" in rest[:at]:
        user = rest[:at].partition(":")[0]
        rest = f"{user}:{MASK}{rest[at:]}"
    return scheme + sep + _PASSWORD_PARAM.sub(rf"\g<1>{MASK}", rest)


def _masked(value: TomlValue | None) -> TomlValue | None:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, list):
        return [v for v in (_masked(item) for item in value) if v is not None]
    return value


def mask_secrets(found: Iterable[Section]) -> list[Section]:
    """Passwords inside URLs masked. Password files are paths: never read here."""
    return [
        dataclasses.replace(
            section,
            settings=[dataclasses.replace(s, value=_masked(s.value)) for s in section.settings],
        )
        for section in found
    ]


# ----------------------------------------------------------------- changes


def default_config(config: Config) -> Config:
    """The defaults ``config`` is compared with for --changed: what a file beside
    its own would give with only the same delivery mode, so that defaults which
    follow the mode (capture's zero sending limits) are not changes; the mode
    itself is then put back to its default, so that it is one."""
    base = config.source.parent if config.source is not None else Path.cwd()
    delivery: dict[str, Any] = {"mode": config.delivery.mode}
    if config.delivery.mode == "smarthost":
        delivery["smarthost"] = {}  # required by that mode; compared with the type's defaults
    loaded = config_from_dict({"delivery": delivery}, base)
    delivery_defaults = DeliveryConfig()
    return dataclasses.replace(
        loaded, delivery=dataclasses.replace(loaded.delivery, mode=delivery_defaults.mode)
    )


def changed_only(found: list[Section], defaults: list[Section]) -> list[Section]:
    """Only what differs from ``defaults`` (like ``postconf -n``).

    A plain table keeps the keys whose value differs from the default config's;
    an optional table or an array entry that is there keeps its header, its
    required keys and those that differ from the type's defaults.
    """
    plain = {s.name: {x.key: x.value for x in s.settings} for s in defaults if s.kind == "table"}
    default_arrays = {
        name: [s for s in defaults if s.name == name and s.present]
        for name in {s.name for s in defaults if s.kind == "array"}
    }
    kept: list[Section] = []
    for section in found:
        if not section.present:
            continue
        if section.kind == "table":
            values = plain.get(section.name, {})
            settings = [s for s in section.settings if s.value != values.get(s.key)]
            if settings:
                kept.append(dataclasses.replace(section, settings=settings))
        elif section.kind == "array" and _same_array(found, section, default_arrays):
            continue
        else:
            settings = [
                s
                for s in section.settings
                if s.value is not None and (s.required or s.value != s.default)
            ]
            kept.append(dataclasses.replace(section, settings=settings))
    return kept


def _same_array(
    found: list[Section], section: Section, defaults: Mapping[str, list[Section]]
) -> bool:
    mine = [s.settings for s in found if s.name == section.name and s.present]
    return mine == [s.settings for s in defaults.get(section.name, [])]


# ---------------------------------------------------------------- rendering


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
WIDTH = 100


def format_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else format_value(key)


def format_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        # 3600.0 reads better as 3600; the loader takes an int wherever it takes seconds.
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        # JSON's escapes are all TOML escapes too; DEL is the one TOML wants escaped and JSON not.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{format_key(k)} = {format_value(v)}" for k, v in value.items()) + " }"


def _header(section: Section) -> str:
    return f"[[{section.name}]]" if section.kind == "array" else f"[{section.name}]"


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ")


def render_show(found: list[Section], preface: Iterable[str] = ()) -> str:
    """Settings as active TOML; what is not set is a comment saying so."""
    lines = [f"# {line}" for line in preface]
    for section in found:
        if lines:
            lines.append("")
        if not section.present:
            absent = "none" if section.kind == "array" else "not set"
            lines.append(f"# {_header(section)}: {absent}")
            continue
        lines.append(_header(section))
        for setting in section.settings:
            if setting.value is None:
                lines.append(f"# {setting.key}: not set")
            else:
                lines.append(f"{format_key(setting.key)} = {format_value(setting.value)}")
    return "\n".join(lines) + "\n"


def render_example(found: list[Section], docs: Mapping[str, Doc], preface: Iterable[str]) -> str:
    """Every setting commented out with its default (or the description's example),
    under its description. Headers are commented out too: an empty table can
    change something ([http] starts a listener, [sending_limits] ends capture
    mode's zeros), so the file as it stands is the defaults."""
    lines = [f"# {line}" if line else "#" for line in preface]
    described: set[str] = set()
    for section in found:
        lines += ["", *_comment(docs[section.doc].text)]
        lines.append("#" + _header(section))
        if section.kind == "map":
            example = docs[section.doc].example or {}
            lines += [f"#{format_key(k)} = {format_value(v)}" for k, v in example.items()]
        for setting in section.settings:
            doc = docs[setting.doc]
            if setting.doc not in described:
                described.add(setting.doc)
                lines += ["", *_comment(doc.text)]
            value = doc.example if doc.example is not None else setting.default
            if value is None:
                raise ValueError(f"{setting.doc} has no default: its Doc needs an example=")
            lines.append(f"#{format_key(setting.key)} = {format_value(value)}")
    return "\n".join(lines) + "\n"
