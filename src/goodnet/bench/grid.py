"""A benchmark grid: attack × defense (or scanner) × data set × architecture × seed, from YAML.

A grid file names what to cross and how to measure it::

    name: smoke
    zoo: runs/zoo                 # where backdoored models are cached (shared with `zoo build`)
    data: [mnist]
    archs: [small_cnn]
    attacks: [badnets, {blend: {blend_ratio: 0.2}}]
    defenses: [prune, {anp: {iterations: 200}}, {label: anp-t0.2, defense: anp,
                                                 settings: {select: threshold}}]
    seeds: [0, 1, 2]
    clean: 0.01                   # the defender's share of the training set (or a count)
    hold_out: 0.05                # the share kept out of the models' training for the defender
    train: {epochs: 2}            # TrainConfig fields for the backdoored models
    train_limit: null             # train on the first N training images (null: all)
    test_limit: null              # measure on the first N test images (null: all)
    curve_limit: 2000             # test images behind each defense's curve (0: none)
    threads: 1                    # PyTorch threads per cell
    verdict: none                 # scan each repaired model: none, auto or a scanner's name
    regrowth: 0                   # epochs of `goodnet finetune` after each repair, then measured
    quick: false                  # true: every method at its own quick settings (a smoke test)

Every list may be a single value; ``attacks: all`` and ``defenses: all`` take every registered
one. Unknown keys, attacks, defenses and settings are refused with the file and the key named.

A grid may also scan: ``scanners: [mm-bd, {nc: {epochs: 6}}]`` runs each scanner on every model,
and ``attacks`` may then name ``clean`` (a model trained on clean data, as ``goodnet zoo`` builds
it) so that the report can set backdoored models against clean ones (AUROC, ROC). Defenses run
on the backdoored models only; a grid with ``scanners`` and no ``defenses`` key only scans. A
data-free scanner's cells do not depend on ``clean``. ``clean_seeds`` gives the clean models
their own seeds (more of them than the backdoored ones, say; default: ``seeds``).

A grid may also measure input-level detectors (:mod:`goodnet.detectors`):
``detectors: [strip, teco, {scale-up: {soft: true}}]`` runs each on every backdoored model. The
defender's clean share is cut into ``calibration`` images (default 300) that set the thresholds
and the rest, which the detector fits on; each cell scores the test images and their triggered
copies and records AUROC, and detection and measured false-alarm rates at each rate of
``false_alarms`` (default ``[0.01, 0.05]``), with the scores themselves so that the report can
measure GoodNets that combine detectors (:mod:`goodnet.bench.detect_report`). Like
``scanners``, ``detectors`` without a ``defenses`` key runs no defense.

A grid file is untrusted input and bounded before anything is built from it: at most
``MAX_GRID_BYTES`` of YAML, at most ``MAX_EXPANDED`` once every alias is expanded (measured on the
parsed nodes, so a few hundred bytes of nested aliases cannot grow into gigabytes), no alias
that refers to itself, at most ``MAX_CELLS`` cells (counted before any is made), names and labels
of at most ``MAX_LABEL`` characters, paths of at most ``MAX_PATH``. ``threads`` is what the grid
asks for (and part of each cell's key); a worker runs with at most the CPUs it may use.

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
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from goodnet.attacks import ATTACK_ALIASES, ATTACKS, storage_name
from goodnet.data import DATASETS
from goodnet.data.holdout import DEFENDER_SHARE
from goodnet.defenses import DEFENSES
from goodnet.detectors import DETECTORS
from goodnet.errors import GoodnetError
from goodnet.models import MODELS
from goodnet.paths import require_regular_file
from goodnet.scans import SCANNERS
from goodnet.settings import build_settings, check_settings, key_names, stored
from goodnet.train import TrainConfig
from goodnet.verdict import AUTO, NONE
from goodnet.zoo import data_folder

SCHEMA = 1  # bump when a cell's meaning changes, so old results are not taken for new ones

MAX_GRID_BYTES = 2**20
MAX_EXPANDED = 2**20  # nodes plus scalar characters, every alias expanded
MAX_CELLS = 10_000
MAX_LABEL = 100
MAX_PATH = 4096
MAX_SEED = 2**63 - 1
MAX_DEPTH = 4  # how deep a setting's lists and mappings may nest
MAX_LIST = 1000

_KEYS = {"name", "zoo", "data", "archs", "attacks", "defenses", "scanners", "detectors",
         "false_alarms", "calibration", "seeds", "clean_seeds", "clean", "hold_out", "train",
         "train_limit", "test_limit", "curve_limit", "threads", "verdict", "quick",
         "regrowth"}

FALSE_ALARMS = (0.01, 0.05)  # the requested false-alarm rates a detector cell measures at
CALIBRATION = 300  # clean images that calibrate a detector cell (the rest it fits on)

CLEAN = "clean"  # the pseudo-attack of a model trained on clean data (as in ``goodnet zoo``)


@dataclass(frozen=True)
class _NoSettings:
    """A clean model's attack settings: none."""


class _CleanModel:
    Config = _NoSettings


# What a grid's ``attacks`` may name: every registered attack, and ``clean`` (clean models get
# scan cells only: a defense has no backdoor to remove there).
ATTACK_ENTRIES: dict[str, Any] = {**ATTACKS, CLEAN: _CleanModel}


def _frozen(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Checked settings (lists already made tuples by the settings parser), hashable."""
    return tuple(sorted(settings.items()))


def _short(value: Any) -> str:
    """``value`` for an error message, cut short whatever its size."""
    return reprlib.repr(value)


def _coerce(cls: type, settings: dict[str, Any], what: str) -> dict[str, Any]:
    """``settings`` checked against the fields of dataclass ``cls`` and their types (a typo is
    an error), by the parser the command line and the library share; first, each value must be
    plain data and small."""
    if not isinstance(settings, dict):
        raise GoodnetError(f"{what}: settings must be a mapping, got {_short(settings)}")
    for key, value in settings.items():
        if not isinstance(key, str) or len(key) > MAX_LABEL:
            raise GoodnetError(f"{what}: unknown setting {_short(key)}")
        if not _plain(value):
            raise GoodnetError(f"{what}: setting {key!r} must be a number, string, boolean, "
                               f"null, or a list or mapping of those (strings of at most "
                               f"{MAX_PATH} characters, lists and mappings of at most "
                               f"{MAX_LIST} items, nested at most {MAX_DEPTH} deep), got "
                               f"{_short(value)}")
    return check_settings(cls, settings, what)


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is what JSON can hold (YAML's dates, sets and bytes are not), and
    small: a setting may nest (a sequence's steps with their own settings), but boundedly."""
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, str):
        return len(value) <= MAX_PATH
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= MAX_DEPTH or not isinstance(value, list | dict) or len(value) > MAX_LIST:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return all(isinstance(k, str) and len(k) <= MAX_LABEL and _plain(v, depth + 1)
               for k, v in value.items())


@dataclass(frozen=True)
class Entry:
    """A named attack or defense with its settings (as given; defaults fill the rest)."""

    label: str
    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    def config(self, registry: dict[str, Any], what: str) -> Any:
        return build_settings(registry[self.name].Config, dict(self.settings),
                              f"{what} {self.label}")

    def resolved(self, registry: dict[str, Any], what: str) -> dict[str, Any]:
        """Every setting, defaults included: what the cache key hashes. A composite (a
        sequence) runs other defenses at their defaults, so their settings count too: a changed
        default of a step is a new cell of every sequence that runs it."""
        return resolved(self.config(registry, what))


def resolved(config: Any) -> dict[str, Any]:
    """Every setting of ``config`` (a settings dataclass) as a key hashes it: plain values, each
    setting under its first name (:func:`goodnet.settings.key_names`), and a composite's parts
    (each step's name and resolved settings) under ``parts``. Nested settings (a field
    holding a settings dataclass, ``unlearn``'s ``scan``) keep their names as they always
    did, less a setting added to them at its old-behaviour value."""
    settings = key_names(type(config), _jsonable(stored(config)))
    parts = getattr(config, "parts", None)
    if callable(parts):
        settings["parts"] = [[name, resolved(part)] for name, part in parts()]
    return settings


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
    hold_out: float | int = DEFENDER_SHARE

    def configuration(self) -> dict[str, Any]:
        return {"data": self.data, "arch": self.arch, "attack": storage_name(self.attack.name),
                "attack_settings": self.attack.resolved(ATTACK_ENTRIES, "attack"),
                "train": self.train_config_dict(), "train_limit": self.train_limit,
                "hold_out": self.hold_out}

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{**dict(self.train), "seed": self.seed})

    def train_config_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self.train_config()))

    def is_standard(self) -> bool:
        """Built exactly as ``goodnet zoo build`` builds it (default attack and training)."""
        return (not self.attack.settings and not self.train and self.train_limit is None
                and self.hold_out == DEFENDER_SHARE)

    def path(self) -> Path:
        """The standard zoo path for a standard model (so the zoo is shared); otherwise the
        same folder with the hash of the model's configuration in the name."""
        folder = (Path(self.zoo) / data_folder(self.data) / self.arch
                  / storage_name(self.attack.name))
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
    verdict: str = NONE
    regrowth: int = 0

    def configuration(self) -> dict[str, Any]:
        """What the key hashes (a cell without a verdict or a regrowth check hashes as it did
        before there were either)."""
        verdict: dict[str, Any] = {} if self.verdict == NONE else {"verdict": self.verdict}
        verdict.update({"regrowth": self.regrowth} if self.regrowth else {})
        return {"schema": SCHEMA, **self.model.configuration(), "seed": self.model.seed,
                "attack_label": storage_name(self.model.attack.label),
                "defense": self.defense.name, "defense_label": self.defense.label,
                "defense_settings": self.defense.resolved(DEFENSES, "defense"),
                "clean": self.clean, "test_limit": self.model.test_limit,
                "curve_limit": self.curve_limit, "threads": self.threads, **verdict}

    @property
    def key(self) -> str:
        return digest(self.configuration())

    def describe(self) -> str:
        m = self.model
        return f"{m.data} {m.arch} {m.attack.label} seed {m.seed}: {self.defense.label}"


@dataclass(frozen=True)
class ScanCell:
    """One scanner on one model (backdoored or clean): a unit of work like :class:`Cell`."""

    model: ModelJob
    scanner: Entry
    clean: float | int
    threads: int

    def needs_clean(self) -> bool:
        return bool(SCANNERS[self.scanner.name].needs_clean)

    def configuration(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kind": "scan", **self.model.configuration(),
                "seed": self.model.seed, "attack_label": storage_name(self.model.attack.label),
                "scanner": self.scanner.name, "scanner_label": self.scanner.label,
                "scanner_settings": self.scanner.resolved(SCANNERS, "scanner"),
                "clean": self.clean if self.needs_clean() else None, "threads": self.threads}

    @property
    def key(self) -> str:
        return digest(self.configuration())

    def describe(self) -> str:
        m = self.model
        return f"{m.data} {m.arch} {m.attack.label} seed {m.seed}: scan {self.scanner.label}"


@dataclass(frozen=True)
class DetectCell:
    """One input-level detector on one backdoored model: a unit of work like :class:`Cell`."""

    model: ModelJob
    detector: Entry
    clean: float | int
    calibration: int
    false_alarms: tuple[float, ...]
    threads: int

    def configuration(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "kind": "detect", **self.model.configuration(),
                "seed": self.model.seed, "attack_label": storage_name(self.model.attack.label),
                "detector": self.detector.name, "detector_label": self.detector.label,
                "detector_settings": self.detector.resolved(DETECTORS, "detector"),
                "clean": self.clean, "calibration": self.calibration,
                "false_alarms": list(self.false_alarms), "test_limit": self.model.test_limit,
                "threads": self.threads}

    @property
    def key(self) -> str:
        return digest(self.configuration())

    def describe(self) -> str:
        m = self.model
        return f"{m.data} {m.arch} {m.attack.label} seed {m.seed}: detect {self.detector.label}"


AnyCell = Cell | ScanCell | DetectCell


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
    scanners: tuple[Entry, ...] = ()
    detectors: tuple[Entry, ...] = ()
    false_alarms: tuple[float, ...] = FALSE_ALARMS
    calibration: int = CALIBRATION
    clean_seeds: tuple[int, ...] | None = None
    clean: float | int = 0.01
    hold_out: float | int = DEFENDER_SHARE
    train: tuple[tuple[str, Any], ...] = ()
    train_limit: int | None = None
    test_limit: int | None = None
    curve_limit: int = 2000
    threads: int = 1
    verdict: str = NONE
    regrowth: int = 0
    source: str = field(default="", compare=False)

    def models(self) -> list[ModelJob]:
        def seeds(attack: Entry) -> tuple[int, ...]:
            if attack.name == CLEAN and self.clean_seeds is not None:
                return self.clean_seeds
            return self.seeds

        return [ModelJob(d, a, k, s, self.train, self.train_limit, self.test_limit, self.zoo,
                         self.hold_out)
                for d in self.data for a in self.archs for k in self.attacks for s in seeds(k)]

    def cells(self) -> list[AnyCell]:
        """Every defense on every backdoored model, then every scanner on every model, then
        every detector on every backdoored model."""
        backdoored = [m for m in self.models() if m.attack.name != CLEAN]
        cells: list[AnyCell] = [Cell(m, d, self.clean, self.curve_limit, self.threads,
                                     self.verdict, self.regrowth)
                                for m in backdoored for d in self.defenses]
        cells += [ScanCell(m, s, self.clean, self.threads)
                  for m in self.models() for s in self.scanners]
        return cells + [DetectCell(m, d, self.clean, self.calibration, self.false_alarms,
                                   self.threads) for m in backdoored for d in self.detectors]


def _count(value: Any, registry: dict[str, Any] | None = None) -> int:
    """How many entries a grid list will have (a single value is one), before parsing it."""
    if registry is not None and value == "all":
        return len(registry)
    return len(value) if isinstance(value, list) else 1


def _text(value: Any, what: str, source: str, limit: int = MAX_LABEL) -> str:
    """``value``, if it is a non-empty string of at most ``limit`` characters (and no NUL)."""
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
        raise GoodnetError(f"{source}: {what} must be a non-empty string of at most {limit} "
                           f"characters, got {_short(value)}")
    return value


def _entry_parts(item: Any, what: str, source: str) -> tuple[Any, Any, Any]:
    """One grid entry's label, name and settings, as written (a name, ``{name: {settings}}`` or
    ``{label:, <what>:, settings:}``)."""
    if isinstance(item, str):
        return item, item, {}
    if isinstance(item, dict) and what in item:
        extra = set(item) - {"label", what, "settings"}
        if extra:
            raise GoodnetError(f"{source}: unknown key {_short(sorted(extra, key=str)[0])} "
                               f"in {what} {_short(item.get(what))}")
        name = item[what]
        return item.get("label", name), name, item.get("settings") or {}
    if isinstance(item, dict) and len(item) == 1:
        (name, settings), = item.items()
        return name, name, settings or {}
    raise GoodnetError(f"{source}: cannot read {what} entry {_short(item)} (a name, "
                       f"{{name: {{settings}}}} or {{label:, {what}:, settings:}})")


def _entries(value: Any, registry: dict[str, Any], what: str, source: str,
             aliases: Mapping[str, str] | None = None, quick: bool = False
             ) -> tuple[Entry, ...]:
    """The grid's entries of one family (``all``, or a list of names and entries); a name in
    ``aliases`` (an old name) reads as the name it stands for, its label as written. With
    ``quick``, each method's own quick settings (its class's ``quick``) come first, and the
    entry's settings over them."""
    aliases = aliases or {}
    if value == "all" and quick:
        value = list(registry)
    elif value == "all":
        return tuple(Entry(name, name) for name in registry)
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GoodnetError(f"{source}: {what}s must be a non-empty list or 'all'")
    entries = []
    for item in value:
        label, name, settings = _entry_parts(item, what, source)
        name = aliases.get(name, name) if isinstance(name, str) else name
        if not isinstance(name, str) or name not in registry:
            raise GoodnetError(f"{source}: unknown {what} {_short(name)} (choose from "
                               f"{', '.join(registry)})")
        label = _text(label, f"{what} {name}: label", source)
        if quick and isinstance(settings, dict):  # plain values: the quick ones' tuples as lists
            settings = {**json.loads(json.dumps(registry[name].quick)), **settings}
        entry = Entry(label, name, _frozen(
            _coerce(registry[name].Config, settings, f"{source}: {what} {label}")))
        entry.config(registry, f"{source}: {what}")  # settings checked now, not mid-grid
        entries.append(entry)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise GoodnetError(f"{source}: two {what}s share a label; give each a distinct 'label'")
    if len({(e.name, e.settings) for e in entries}) != len(entries):
        raise GoodnetError(f"{source}: the same {what} with the same settings is listed twice")
    return tuple(entries)


def _attacks(value: Any, source: str) -> tuple[Entry, ...]:
    """The grid's attacks: ``all`` (every registered attack) or a list, which may also name
    ``clean`` (clean models, for the scanners)."""
    if value == "all":
        return _entries(value, ATTACKS, "attack", source)
    return _entries(value, ATTACK_ENTRIES, "attack", source, ATTACK_ALIASES)


def _seeds(value: Any, key: str, source: str) -> tuple[int, ...]:
    value = [value] if isinstance(value, int) else value
    if (not isinstance(value, list) or not value or len(value) > MAX_LIST
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED
                       for s in value)):
        raise GoodnetError(f"{source}: {key} must be a whole number from 0 to 2**63 - 1 or a "
                           f"list of them")
    if len(set(value)) != len(value):
        raise GoodnetError(f"{source}: {key} lists the same seed twice")
    return tuple(value)


def _strings(value: Any, key: str, source: str, limit: int = MAX_LABEL) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v and len(v) <= limit and "\0" not in v for v in value):
        raise GoodnetError(f"{source}: {key} must be a name or a non-empty list of names (of at "
                           f"most {limit} characters)")
    return tuple(value)


def _false_alarms(value: Any, source: str) -> tuple[float, ...]:
    value = [value] if isinstance(value, int | float) else value
    if (not isinstance(value, list) or not value or len(value) > MAX_LIST or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1
            for v in value)):
        raise GoodnetError(f"{source}: false_alarms must be a rate in (0, 1) or a list of them")
    if len(set(value)) != len(value):
        raise GoodnetError(f"{source}: false_alarms lists the same rate twice")
    return tuple(float(v) for v in value)


def _limit(value: Any, key: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GoodnetError(f"{source}: {key} must be a positive whole number or null")
    return value


def _hold_out(value: Any, clean: float | int, source: str) -> float | int:
    """The grid's ``hold_out``: 0, a fraction in (0, 1) or a count, no smaller than ``clean``
    where both are of one kind (the clean data is drawn from the held-out images)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value < 0 or (isinstance(value, float) and value >= 1):
        raise GoodnetError(f"{source}: hold_out must be 0, a fraction in (0, 1) or a count")
    if value and isinstance(value, float) == isinstance(clean, float) and clean > value:
        raise GoodnetError(f"{source}: clean {clean:g} is more than hold_out {value:g}, the "
                           "share of the training set the models never see and the clean data "
                           "is drawn from: raise hold_out")
    return value


def parse_grid(raw: Any, source: str = "grid", base: Path | None = None) -> Grid:
    """A :class:`Grid` from the parsed YAML mapping ``raw`` (``base``: the grid file's folder,
    for relative paths)."""
    _check_keys(raw, source)
    # A grid with scanners or detectors and no defenses key runs no defense.
    others = "scanners" in raw or "detectors" in raw
    defenses_raw = raw.get("defenses", [] if others else "all")
    _check_size(raw, defenses_raw, source)
    base = base or Path(".")
    name = _name(raw, source)

    def local(text: str) -> str:  # absolute, so every worker (and Ray node) reads the same path
        return str((base / text).resolve()) if not Path(text).is_absolute() else text

    data = tuple(d if d in DATASETS else local(d)
                 for d in _strings(raw.get("data", "mnist"), "data", source, MAX_PATH))
    archs = _archs(raw, data, source)
    seeds = _seeds(raw.get("seeds", [0]), "seeds", source)
    clean_seeds = (_seeds(raw["clean_seeds"], "clean_seeds", source)
                   if raw.get("clean_seeds") is not None else None)
    clean = _clean(raw.get("clean", 0.01), source)
    hold_out = _hold_out(raw.get("hold_out", DEFENDER_SHARE), clean, source)
    train = _train(raw.get("train") or {}, source)
    curve_limit, threads = _curve_limit_and_threads(raw, source)
    false_alarms, calibration = _calibration(raw, source)
    quick = _flag(raw, "quick", source)
    return Grid(
        name=name, zoo=local(_text(raw.get("zoo", "zoo"), "zoo", source, MAX_PATH)),
        data=data, archs=archs,
        attacks=_attacks(raw.get("attacks", "all"), source),
        defenses=(_entries(defenses_raw, DEFENSES, "defense", source, quick=quick)
                  if defenses_raw != [] or not others else ()),
        scanners=(_entries(raw["scanners"], SCANNERS, "scanner", source, quick=quick)
                  if "scanners" in raw else ()),
        detectors=(_entries(raw["detectors"], DETECTORS, "detector", source, quick=quick)
                   if "detectors" in raw else ()),
        false_alarms=false_alarms, calibration=calibration,
        seeds=seeds, clean_seeds=clean_seeds, clean=clean, hold_out=hold_out,
        train=_frozen(train),
        train_limit=_limit(raw.get("train_limit"), "train_limit", source),
        test_limit=_limit(raw.get("test_limit"), "test_limit", source),
        curve_limit=curve_limit, threads=threads, verdict=_verdict(raw, source),
        regrowth=_whole(raw, "regrowth", source), source=source)


def _flag(raw: dict[str, Any], key: str, source: str) -> bool:
    """A grid's true-or-false key (default false)."""
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise GoodnetError(f"{source}: {key} must be true or false, got {_short(value)}")
    return value


def _whole(raw: dict[str, Any], key: str, source: str) -> int:
    """A grid's whole number >= 0 (default 0)."""
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GoodnetError(f"{source}: {key} must be a whole number >= 0, got {_short(value)}")
    return value


def _verdict(raw: dict[str, Any], source: str) -> str:
    """The grid's ``verdict``: the scanner that judges each repaired model ("none", the
    default; "auto": the default scanner; or a scanner's name)."""
    value = raw.get("verdict", NONE)
    if value not in (NONE, AUTO) and value not in SCANNERS:
        raise GoodnetError(f"{source}: verdict must be none, auto or a scanner "
                           f"({', '.join(SCANNERS)}), got {_short(value)}")
    return str(value)


def _check_keys(raw: Any, source: str) -> None:
    """Refuse a grid that is not a mapping or that has a key the grid does not know."""
    if not isinstance(raw, dict):
        raise GoodnetError(f"{source}: a grid must be a mapping of settings")
    unknown = sorted(set(raw) - _KEYS, key=str)
    if unknown:
        raise GoodnetError(f"{source}: unknown key {_short(unknown[0])} (known: "
                           f"{', '.join(sorted(_KEYS))})")


def _check_size(raw: dict[str, Any], defenses_raw: Any, source: str) -> None:
    """Refuse a grid of more than ``MAX_CELLS`` cells, counted before a single entry is parsed
    or a cell made."""
    cells = math.prod([_count(raw.get("data")), _count(raw.get("archs")),
                       _count(raw.get("attacks", "all"), ATTACKS),
                       _count(defenses_raw, DEFENSES) + _count(raw.get("scanners", []), SCANNERS)
                       + _count(raw.get("detectors", []), DETECTORS),
                       max(_count(raw.get("seeds")), _count(raw.get("clean_seeds")))])
    if cells > MAX_CELLS:
        raise GoodnetError(f"{source}: data × archs × attacks × (defenses + scanners + "
                           f"detectors) × seeds "
                           f"is {cells} cells; at most {MAX_CELLS} (split the grid)")


def _name(raw: dict[str, Any], source: str) -> str:
    """The grid's name (the grid file's stem by default), usable as a folder name."""
    name = _text(raw.get("name", Path(source).stem), "name", source)
    if name in (".", "..") or "/" in name or "\\" in name:
        raise GoodnetError(f"{source}: name must be usable as a folder name (runs/<name>), got "
                           f"{name!r}")
    return name


def _archs(raw: dict[str, Any], data: tuple[str, ...], source: str) -> tuple[str, ...]:
    """The grid's architectures, each a registered one; neither they nor ``data`` repeated."""
    archs = _strings(raw.get("archs", "small_cnn"), "archs", source)
    for arch in archs:
        if arch not in MODELS:
            raise GoodnetError(f"{source}: unknown architecture {arch!r} (choose from "
                               f"{', '.join(MODELS)})")
    for key, values in (("data", data), ("archs", archs)):
        if len(set(values)) != len(values):
            raise GoodnetError(f"{source}: {key} lists the same entry twice")
    return archs


def _clean(clean: Any, source: str) -> float | int:
    """The grid's ``clean``: the defender's clean data, a fraction in (0, 1) or a count."""
    if isinstance(clean, bool) or not isinstance(clean, int | float) or not math.isfinite(
            clean) or clean <= 0 or (isinstance(clean, float) and clean >= 1):
        raise GoodnetError(f"{source}: clean must be a fraction in (0, 1) or a count >= 1")
    return clean


def _train(value: Any, source: str) -> dict[str, Any]:
    """The grid's training settings, checked against :class:`TrainConfig` (less the seed,
    which is each cell's)."""
    train = _coerce(TrainConfig, value, f"{source}: train")
    train.pop("seed", None)  # the cell's seed
    try:
        TrainConfig(**train)
    except (TypeError, ValueError) as error:
        raise GoodnetError(f"{source}: train: {error}") from None
    return train


def _curve_limit_and_threads(raw: dict[str, Any], source: str) -> tuple[int, int]:
    """The grid's ``curve_limit`` (>= 0) and ``threads`` (>= 1), whole numbers."""
    curve_limit = raw.get("curve_limit", 2000)
    threads = raw.get("threads", 1)
    for key, value in (("curve_limit", curve_limit), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (key == "threads") \
                or value > 10**9:
            raise GoodnetError(f"{source}: {key} must be a whole number"
                               f"{' >= 1' if key == 'threads' else ' >= 0'}")
    return curve_limit, threads


def _calibration(raw: dict[str, Any], source: str) -> tuple[tuple[float, ...], int]:
    """The grid's false-alarm rates and the calibration images, enough for the lowest rate."""
    false_alarms = _false_alarms(raw.get("false_alarms", list(FALSE_ALARMS)), source)
    calibration = _limit(raw.get("calibration", CALIBRATION), "calibration", source)
    assert calibration is not None
    needed = math.ceil(1 / min(false_alarms) - 1 - 1e-9)
    if calibration < needed:
        raise GoodnetError(f"{source}: calibration {calibration} cannot calibrate a false-alarm "
                           f"rate of {min(false_alarms):g}: it takes at least {needed} images")
    return false_alarms, calibration


# The pure-Python loader: libyaml (CSafeLoader) composes nested collections by C recursion with
# no limit, and a grid nested 40 000 deep crashes the process (SIGSEGV) instead of raising.
class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader (data only: no tags, no code) that measures the document with every
    alias expanded before building it, so nested aliases cannot multiply a few bytes into
    gigabytes, and that refuses an alias inside the node it names."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node)
        return super().construct_document(node)


class _TooLarge(Exception):
    pass


class _SelfReference(Exception):
    pass


def _expanded_size(root: yaml.Node) -> int:
    """Nodes plus scalar characters of ``root`` with every alias expanded, each shared node
    counted once per use but measured once (so the measuring is linear in the parsed nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise _SelfReference
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        else:
            open_nodes.add(id(node))
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [child for pair in node.value for child in pair]
            total = 1 + sum(size(child) for child in children)
            open_nodes.discard(id(node))
        if total > MAX_EXPANDED:
            raise _TooLarge
        sizes[id(node)] = total
        return total

    return size(root)


def load_grid(path: str | Path) -> Grid:
    """Read a grid file (YAML, parsed as data: no tags, no code; bounded before it is built)."""
    path = require_regular_file(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_GRID_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GoodnetError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") \
            from None
    if len(data) > MAX_GRID_BYTES:
        raise GoodnetError(f"{path}: larger than {MAX_GRID_BYTES // 2**20} MiB; not a grid")
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # a safe loader: data only
    except RecursionError:
        raise GoodnetError(f"{path}: nested too deeply to be a grid") from None
    except _TooLarge:
        raise GoodnetError(f"{path}: too large with its aliases expanded (more than "
                           f"{MAX_EXPANDED} nodes and characters); not a grid") from None
    except _SelfReference:
        raise GoodnetError(f"{path}: an alias refers to itself; not a grid") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise GoodnetError(f"{path}: not valid YAML{at}") from None
    return parse_grid(raw, str(path))
