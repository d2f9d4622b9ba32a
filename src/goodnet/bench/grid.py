"""A benchmark grid: attack × defense × data set × architecture × seed, read from YAML.

A grid file names what to cross and how to measure it::

    name: smoke
    zoo: runs/zoo                 # where backdoored models are cached (shared with `zoo build`)
    data: [mnist]
    archs: [small_cnn]
    attacks: [badnets, {blend: {alpha: 0.2}}]
    defenses: [prune, {anp: {iterations: 200}}, {label: anp-t0.2, defense: anp,
                                                 settings: {select: threshold}}]
    seeds: [0, 1, 2]
    clean: 0.01                   # the defender's share of the training set (or a count)
    train: {epochs: 2}            # TrainConfig fields for the backdoored models
    train_limit: null             # train on the first N training images (null: all)
    test_limit: null              # measure on the first N test images (null: all)
    curve_limit: 2000             # test images behind each defense's curve (0: none)
    threads: 1                    # PyTorch threads per cell

Every list may be a single value; ``attacks: all`` and ``defenses: all`` take every registered
one. Unknown keys, attacks, defenses and settings are refused with the file and the key named.

Each cell is keyed by a hash of its full configuration (the resolved settings of its attack,
defense and training, not just their names), so a changed setting or default is a new cell. A
change in goodnet's code is not: each record carries the versions that produced it, and a new
results folder reruns everything. Relative paths (``zoo``, a data set path) are relative to
the current folder, as on the command line, and made absolute (with Ray on a cluster, the zoo
and the data must be on a file system every node shares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goodnet.attacks import ATTACKS
from goodnet.data import DATASETS
from goodnet.defenses import DEFENSES
from goodnet.errors import GoodnetError
from goodnet.models import MODELS
from goodnet.train import TrainConfig

SCHEMA = 1  # bump when a cell's meaning changes, so old results are not taken for new ones

_KEYS = {"name", "zoo", "data", "archs", "attacks", "defenses", "seeds", "clean", "train",
         "train_limit", "test_limit", "curve_limit", "threads"}


def _frozen(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items()))


def _coerce(cls: type, settings: dict[str, Any], what: str) -> dict[str, Any]:
    """``settings`` checked against the fields of dataclass ``cls`` (a typo is an error)."""
    if not isinstance(settings, dict):
        raise GoodnetError(f"{what}: settings must be a mapping, got {settings!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise GoodnetError(f"{what}: unknown setting {unknown[0]!r} (known: "
                           f"{', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in settings.items():
        if not _plain(value):
            raise GoodnetError(f"{what}: setting {key!r} must be a number, string, boolean, "
                               f"null or a list of those, got {type(value).__name__}")
        if isinstance(value, list):
            value = tuple(value)
        if hints.get(key) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is what JSON can hold (YAML's dates, sets and bytes are not)."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list) and depth < 2:
        return all(_plain(v, depth + 1) for v in value)
    return False


@dataclass(frozen=True)
class Entry:
    """A named attack or defense with its settings (as given; defaults fill the rest)."""

    label: str
    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    def config(self, registry: dict[str, Any], what: str) -> Any:
        cls = registry[self.name].Config
        try:
            return cls(**dict(self.settings))
        except (TypeError, ValueError) as error:
            raise GoodnetError(f"{what} {self.label}: {error}") from None

    def resolved(self, registry: dict[str, Any], what: str) -> dict[str, Any]:
        """Every setting, defaults included: what the cache key hashes."""
        return _jsonable(dataclasses.asdict(self.config(registry, what)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def normal(value: Any) -> Any:
    """1 and 1.0 alike (a setting spelt either way is the same cell)."""
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def digest(payload: Any, length: int = 16) -> str:
    text = json.dumps(normal(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class ModelJob:
    """One backdoored model a grid needs (shared by every defense run on it)."""

    data: str
    arch: str
    attack: Entry
    seed: int
    train: tuple[tuple[str, Any], ...]
    train_limit: int | None
    test_limit: int | None
    zoo: str

    def configuration(self) -> dict[str, Any]:
        return {"data": self.data, "arch": self.arch, "attack": self.attack.name,
                "attack_settings": self.attack.resolved(ATTACKS, "attack"),
                "train": self.train_config_dict(), "train_limit": self.train_limit}

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{**dict(self.train), "seed": self.seed})

    def train_config_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self.train_config()))

    def is_standard(self) -> bool:
        """Built exactly as ``goodnet zoo build`` builds it (default attack and training)."""
        return (not self.attack.settings and not self.train and self.train_limit is None)

    def path(self) -> Path:
        """The standard zoo path for a standard model (so the zoo is shared); otherwise the
        same folder with the hash of the model's configuration in the name."""
        folder = Path(self.zoo) / self.data / self.arch / self.attack.name
        if self.is_standard():
            return folder / f"seed{self.seed}.safetensors"
        return folder / f"seed{self.seed}-{digest(self.configuration(), 10)}.safetensors"


@dataclass(frozen=True)
class Cell:
    """One defense on one backdoored model: the unit of work, of caching and of results."""

    model: ModelJob
    defense: Entry
    clean: float | int
    curve_limit: int
    threads: int

    def configuration(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **self.model.configuration(), "seed": self.model.seed,
                "attack_label": self.model.attack.label,
                "defense": self.defense.name, "defense_label": self.defense.label,
                "defense_settings": self.defense.resolved(DEFENSES, "defense"),
                "clean": self.clean, "test_limit": self.model.test_limit,
                "curve_limit": self.curve_limit, "threads": self.threads}

    @property
    def key(self) -> str:
        return digest(self.configuration())

    def describe(self) -> str:
        m = self.model
        return f"{m.data} {m.arch} {m.attack.label} seed {m.seed}: {self.defense.label}"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    name: str
    zoo: str
    data: tuple[str, ...]
    archs: tuple[str, ...]
    attacks: tuple[Entry, ...]
    defenses: tuple[Entry, ...]
    seeds: tuple[int, ...]
    clean: float | int = 0.01
    train: tuple[tuple[str, Any], ...] = ()
    train_limit: int | None = None
    test_limit: int | None = None
    curve_limit: int = 2000
    threads: int = 1
    source: str = field(default="", compare=False)

    def models(self) -> list[ModelJob]:
        return [ModelJob(d, a, k, s, self.train, self.train_limit, self.test_limit, self.zoo)
                for d in self.data for a in self.archs for k in self.attacks for s in self.seeds]

    def cells(self) -> list[Cell]:
        return [Cell(m, d, self.clean, self.curve_limit, self.threads)
                for m in self.models() for d in self.defenses]


def _entries(value: Any, registry: dict[str, Any], what: str, source: str) -> tuple[Entry, ...]:
    if value == "all":
        return tuple(Entry(name, name) for name in registry)
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GoodnetError(f"{source}: {what}s must be a non-empty list or 'all'")
    entries = []
    for item in value:
        if isinstance(item, str):
            label, name, settings = item, item, {}
        elif isinstance(item, dict) and what in item:
            extra = set(item) - {"label", what, "settings"}
            if extra:
                raise GoodnetError(f"{source}: unknown key {sorted(extra)[0]!r} in {what} "
                                   f"{item.get(what)!r}")
            name = item[what]
            label, settings = item.get("label", name), item.get("settings") or {}
        elif isinstance(item, dict) and len(item) == 1:
            (name, settings), = item.items()
            label, settings = name, settings or {}
        else:
            raise GoodnetError(f"{source}: cannot read {what} entry {item!r} (a name, "
                               f"{{name: {{settings}}}} or {{label:, {what}:, settings:}})")
        if name not in registry:
            raise GoodnetError(f"{source}: unknown {what} {name!r} (choose from "
                               f"{', '.join(registry)})")
        entry = Entry(str(label), name, _frozen(
            _coerce(registry[name].Config, settings, f"{source}: {what} {label}")))
        entry.config(registry, f"{source}: {what}")  # settings checked now, not mid-grid
        entries.append(entry)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise GoodnetError(f"{source}: two {what}s share a label; give each a distinct 'label'")
    if len({(e.name, e.settings) for e in entries}) != len(entries):
        raise GoodnetError(f"{source}: the same {what} with the same settings is listed twice")
    return tuple(entries)


def _strings(value: Any, key: str, source: str) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise GoodnetError(f"{source}: {key} must be a name or a non-empty list of names")
    return tuple(value)


def _limit(value: Any, key: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GoodnetError(f"{source}: {key} must be a positive whole number or null")
    return value


def parse_grid(raw: Any, source: str = "grid", base: Path | None = None) -> Grid:
    """A :class:`Grid` from the parsed YAML mapping ``raw`` (``base``: the grid file's folder,
    for relative paths)."""
    if not isinstance(raw, dict):
        raise GoodnetError(f"{source}: a grid must be a mapping of settings")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise GoodnetError(f"{source}: unknown key {unknown[0]!r} (known: "
                           f"{', '.join(sorted(_KEYS))})")
    base = base or Path(".")

    def local(text: str) -> str:  # absolute, so every worker (and Ray node) reads the same path
        return str((base / text).resolve()) if not Path(text).is_absolute() else text

    data = tuple(d if d in DATASETS else local(d)
                 for d in _strings(raw.get("data", "mnist"), "data", source))
    archs = _strings(raw.get("archs", "small_cnn"), "archs", source)
    for arch in archs:
        if arch not in MODELS:
            raise GoodnetError(f"{source}: unknown architecture {arch!r} (choose from "
                               f"{', '.join(MODELS)})")
    for key, values in (("data", data), ("archs", archs)):
        if len(set(values)) != len(values):
            raise GoodnetError(f"{source}: {key} lists the same entry twice")
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise GoodnetError(f"{source}: seeds must be a non-negative whole number or a list")
    if len(set(seeds)) != len(seeds):
        raise GoodnetError(f"{source}: seeds lists the same seed twice")
    clean = raw.get("clean", 0.01)
    if isinstance(clean, bool) or not isinstance(clean, int | float) or not math.isfinite(
            clean) or clean <= 0 or (isinstance(clean, float) and clean >= 1):
        raise GoodnetError(f"{source}: clean must be a fraction in (0, 1) or a count >= 1")
    train = _coerce(TrainConfig, raw.get("train") or {}, f"{source}: train")
    train.pop("seed", None)  # the cell's seed
    try:
        TrainConfig(**train)
    except (TypeError, ValueError) as error:
        raise GoodnetError(f"{source}: train: {error}") from None
    curve_limit = raw.get("curve_limit", 2000)
    threads = raw.get("threads", 1)
    for key, value in (("curve_limit", curve_limit), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (key == "threads") \
                or value > 10**9:
            raise GoodnetError(f"{source}: {key} must be a whole number"
                               f"{' >= 1' if key == 'threads' else ' >= 0'}")
    return Grid(
        name=str(raw.get("name", Path(source).stem)),
        zoo=local(str(raw.get("zoo", "zoo"))),
        data=data, archs=archs,
        attacks=_entries(raw.get("attacks", "all"), ATTACKS, "attack", source),
        defenses=_entries(raw.get("defenses", "all"), DEFENSES, "defense", source),
        seeds=tuple(seeds), clean=clean, train=_frozen(train),
        train_limit=_limit(raw.get("train_limit"), "train_limit", source),
        test_limit=_limit(raw.get("test_limit"), "test_limit", source),
        curve_limit=curve_limit, threads=threads, source=source)


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (YAML, parsed as data: no tags, no code)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GoodnetError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") \
            from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise GoodnetError(f"{path}: nested too deeply to be a grid") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise GoodnetError(f"{path}: not valid YAML{at}") from None
    return parse_grid(raw, str(path))
