"""One way to turn settings into a method's frozen settings dataclass, wherever they come from.

The command line (``-p key=value`` and options such as ``--layer``), benchmark grids (YAML
values), model cards (JSON values) and library callers (``make_defense("rnp", {...})``) all go
through :func:`build_settings`: unknown keys are refused with the known ones listed (a typo
never falls back to a default), each value is checked against the field's type (text from the
command line is converted first), lists become tuples, and a renamed setting still works under
its old name with a one-line :class:`FutureWarning`.

Settings may nest: a field typed as another settings dataclass takes a mapping of that class's
settings (checked the same way, names and all), and a field typed ``Mapping[str, X]`` takes a
mapping whose values are of type ``X``; both may sit inside tuples and unions. Mappings are
stored as :class:`FrozenDict` (read-only and hashable, as a frozen dataclass's values must be).
On the command line such a value is written as YAML flow text (``-p 'steps=[fst, {nc:
{unlearn_epochs: 2}}]'``), read as data, never evaluated. A method with a new kind of setting
therefore touches its own module only.

A settings class lists its old names in a ``renamed`` class attribute, old name → new name (a
subclass inherits its bases' renames), and the settings it gained after keys were first stored
in an ``added`` class attribute, name → the value under which the method behaves as before.
Stored keys (:func:`key_names`: a benchmark cell's cache key, a model's zoo path) hash each
setting under its first name and leave out an added setting at that value, so neither renaming
nor adding a setting invalidates a result or a cached model. Stored settings (a model card's, a
result's) are read with ``warn=False``: old names there are expected, not the user's to fix.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from goodnet.errors import GoodnetError

C = TypeVar("C")


def renamed(cls: type) -> dict[str, str]:
    """Old setting names of ``cls`` (and of its bases) that still work, old → new."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        out.update(vars(base).get("renamed", {}))
    return out


def added(cls: type) -> dict[str, Any]:
    """Settings of ``cls`` (and of its bases) added after keys were first stored, each with the
    value that behaves as the method did before it existed: name → that value."""
    out: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        out.update(vars(base).get("added", {}))
    return out


def key_names(cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as a stored key hashes them: each renamed setting under its first name, and
    a setting added later (a class's ``added``, name → the value that behaves as before) left
    out while it holds that value; so neither a rename nor a new setting changes a key."""
    first: dict[str, str] = {}
    for old, new in renamed(cls).items():
        first.setdefault(new, old)
    before = {key: _plain(value) for key, value in added(cls).items()}
    return {first.get(key, key): value for key, value in settings.items()
            if not (key in before and _plain(value) == before[key])}


def _plain(value: Any) -> Any:
    """A nested settings dataclass as the dict a stored key holds it as, its added settings at
    their old-behaviour values left out; any other value as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        before = added(type(value))
        return {k: v for k, v in stored(value).items() if not (k in before and v == before[k])}
    return value


def stored(config: Any) -> dict[str, Any]:
    """``config``'s settings as plain values, as a stored key holds them: a nested settings
    dataclass (``unlearn``'s ``scan``) as a dict without its added settings
    (:func:`added`) at their old-behaviour values, so a setting added to it keeps old keys."""
    plain: dict[str, Any] = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            plain[f.name] = _plain(value)
    return plain


def pairs_to_dict(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``["key=value", ...]`` (the command line's ``-p``) as a dict of raw text values; a key
    may be spelt with dashes."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise GoodnetError(f"{what} setting {pair!r} is not of the form key=value")
        out[key.strip().replace("-", "_")] = raw.strip()
    return out


def check_settings(cls: type, settings: Mapping[str, Any], what: str, *,
                   text: bool = False, warn: bool = True) -> dict[str, Any]:
    """``settings`` checked against the fields of dataclass ``cls``: known names (old names
    mapped to new ones, with a warning unless ``warn=False``), values of the field's type
    (``text=True``: values are command-line text, converted first). Returns the settings ready
    for ``cls(**settings)``."""
    if not isinstance(settings, Mapping):
        raise GoodnetError(f"{what}: settings must be a mapping, got {type(settings).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    old = renamed(cls)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if not isinstance(key, str):
            raise GoodnetError(f"{what}: setting names must be strings, got {key!r:.40}")
        if key in old and key not in fields:
            new = old[key]
            if warn:
                warnings.warn(f"{what}: setting {key!r} is now called {new!r}; the old name will "
                              "be removed in a later version", FutureWarning, stacklevel=2)
            if new in settings:
                raise GoodnetError(f"{what}: give {new!r} or its old name {key!r}, not both")
            key = new
        if key not in fields:
            raise GoodnetError(f"{what} has no setting {key!r}; its settings are "
                               f"{sorted(fields)}")
        hint = hints[key]
        if text:
            value = _convert(str(value), hint, f"{what} setting {key}")
        out[key] = shaped(value, hint, f"{what}: setting {key}", warn)
    return out


class FrozenDict(dict[str, Any]):
    """A read-only, hashable mapping: how a settings dataclass holds a mapping value."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda item: item[0])))

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        """Pickled (a grid's cell sent to a worker process) and copied as a plain dict."""
        return FrozenDict, (dict(self),)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("settings are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]


class _Mismatch(Exception):
    """A value that is not of a settings type (turned into one message by :func:`shaped`)."""


def shaped(value: Any, hint: Any, what: str, warn: bool = True) -> Any:
    """``value`` in the form its settings type ``hint`` stores: lists as tuples, mappings as
    :class:`FrozenDict`, nested settings built (their own errors name them), an integer given
    for a float as a float. A value of another type is a :class:`GoodnetError` naming ``what``
    and the type expected."""
    try:
        return _shape(value, hint, what, warn)
    except _Mismatch:
        raise GoodnetError(f"{what} must be {describe(hint)}, got {value!r:.40}") from None


def _shape(value: Any, hint: Any, what: str, warn: bool) -> Any:
    options = _options(hint)
    if options is not None:
        for option in options:
            try:
                return _shape(value, option, what, warn)
            except _Mismatch:
                continue
        raise _Mismatch
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return build_settings(hint, value, what, warn=warn)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        item = typing.get_args(hint)[0]
        return tuple(_shape(v, item, what, warn) for v in value)
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        item = typing.get_args(hint)[1]
        return FrozenDict({k: _shape(v, item, f"{what}.{k}", warn) for k, v in value.items()})
    if hint is Any:
        return _frozen(value)
    value = _tuples(value)
    if not fits(value, hint):
        raise _Mismatch
    return float(value) if hint is float and isinstance(value, int) else value


def _frozen(value: Any) -> Any:
    """Any plain value made immutable: lists as tuples, mappings as :class:`FrozenDict`."""
    if isinstance(value, Mapping):
        return FrozenDict({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def build_settings(cls: type[C], settings: Mapping[str, Any] | None, what: str, *,
                   text: bool = False, warn: bool = True) -> C:
    """An instance of settings dataclass ``cls`` from ``settings`` (see :func:`check_settings`);
    any error the class raises on the values is one :class:`GoodnetError` naming ``what``."""
    checked = check_settings(cls, settings or {}, what, text=text, warn=warn)
    try:
        return cls(**checked)
    except GoodnetError as error:
        message = str(error)
        raise GoodnetError(message if message.startswith(what) else f"{what}: {message}") \
            from None
    except (TypeError, ValueError) as error:
        raise GoodnetError(f"{what}: bad settings ({error})") from None


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _options(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (lists made tuples) has the settings type ``hint``: an integer is no
    bool, a float is finite, a tuple holds its item type."""
    options = _options(hint)
    if options is not None:
        return any(fits(value, option) for option in options)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            return False
    if hint is str:
        return isinstance(value, str)
    return True  # any other type is left to the settings class's own checks


def describe(hint: Any) -> str:
    """A settings type in words, for an error message."""
    options = _options(hint)
    if options is not None:
        return " or ".join(describe(option) for option in options)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "finite numbers", str: "strings"}.get(
            item, f"items each {describe(item)}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings"
    if typing.get_origin(hint) in (dict, Mapping, collections.abc.Mapping):
        return f"a mapping of names to {describe(typing.get_args(hint)[1])}"
    if hint is Any:
        return "any value"
    return {type(None): "null", int: "an integer", float: "a finite number", str: "a string",
            bool: "true or false"}.get(hint, str(hint))


def _convert(raw: str, kind: Any, what: str) -> Any:
    """Command-line text as a value of type ``kind`` ("none" for None where allowed; a tuple
    from comma-separated items; a nested value from YAML flow text, ``[...]`` or ``{...}``)."""
    if raw.lstrip()[:1] in ("[", "{") and _nests(kind):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", "") or "not YAML")
            raise GoodnetError(f"{what}: {raw!r:.40} cannot be read ({problem})") from None
    options = _options(kind)
    if options is not None:
        rest = [k for k in options if k is not type(None)]
        if raw.lower() in ("none", "null") and len(rest) < len(options):
            return None
        return _convert(raw, rest[0], what)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            return tuple(_convert(part.strip(), inner, what) for part in raw.split(",") if part)
    except ValueError:
        raise GoodnetError(f"{what}: {raw!r} is not {describe(kind)}") from None
    return raw


def _nests(hint: Any) -> bool:
    """Whether values of type ``hint`` can hold mappings or lists (written as YAML on the
    command line)."""
    options = _options(hint)
    if options is not None:
        return any(_nests(option) for option in options)
    return (dataclasses.is_dataclass(hint) or hint is Any
            or typing.get_origin(hint) in (tuple, dict, Mapping, collections.abc.Mapping))
