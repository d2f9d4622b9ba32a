"""A reproducible zoo of backdoored models: attack × data set × architecture × seed.

Each cell is one model file, ``<root>/<data>/<arch>/<attack>/seed<k>.safetensors``, carrying its
card (attack settings, CA, ASR, RA, training and attack-fitting time) and any learned trigger.
Building skips cells whose file already loads, and every file is written atomically, so an
interrupted build resumes where it stopped. ``clean`` is a pseudo-attack: the same architecture
trained on clean data, the reference the backdoored models' clean accuracy is compared with.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from goodnet.artifacts import ModelCard, read_card, save_model
from goodnet.attacks import ATTACK_ALIASES, ATTACKS, make_attack, storage_name
from goodnet.backdoor import TrainedModel, train_model
from goodnet.data import load_dataset
from goodnet.data.dataset import ImageData
from goodnet.data.holdout import DEFENDER_SHARE
from goodnet.errors import GoodnetError
from goodnet.models import MODELS
from goodnet.train import TrainConfig

log = logging.getLogger(__name__)

CLEAN = "clean"
DEFAULT_DATASETS = ("mnist", "fashion-mnist")
DEFAULT_ARCHS = ("small_cnn", "resnet20")


def data_folder(data: str) -> str:
    """The zoo's folder for data set ``data``: ``data`` itself when it is a plain name (a
    registered data set, or a loader's name); for a path (absolute, or with more than one part),
    its last part and a hash of its resolved form. Never the path itself: joined to the zoo's
    root, an absolute path would replace it, and the models would be written into the data's
    own folder."""
    if Path(data).name == data and data not in ("", ".", ".."):
        return data
    where = str(Path(data).expanduser().resolve())
    return f"{Path(where).name or 'data'}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class ZooCell:
    """One model of the zoo."""

    data: str
    arch: str
    attack: str
    seed: int

    def path(self, root: Path) -> Path:
        """Where the model lies: the attack's folder carries the name the attack was first
        registered under (:func:`goodnet.attacks.storage_name`), so a rename orphans nothing."""
        return (Path(root) / data_folder(self.data) / self.arch / storage_name(self.attack)
                / f"seed{self.seed}.safetensors")


def grid(
    attacks: Sequence[str] | None = None,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    archs: Sequence[str] = DEFAULT_ARCHS,
    seeds: Sequence[int] = (0,),
) -> list[ZooCell]:
    """Every cell of the grid; ``attacks`` defaults to every registered attack plus clean."""
    attacks = list(attacks) if attacks is not None else [CLEAN, *ATTACKS]
    attacks = [ATTACK_ALIASES.get(a, a) for a in attacks]
    unknown = [a for a in attacks if a != CLEAN and a not in ATTACKS]
    unknown += [a for a in archs if a not in MODELS]
    if unknown:
        raise GoodnetError(f"unknown attack or architecture: {', '.join(unknown)}")
    return [ZooCell(d, a, k, s) for d in datasets for a in archs for k in attacks for s in seeds]


def is_built(cell: ZooCell, root: Path) -> bool:
    """Whether the cell's model file exists and its card reads."""
    path = cell.path(root)
    if not path.exists():
        return False
    try:
        read_card(path)
    except GoodnetError:
        log.warning("%s is unreadable; rebuilding it", path)
        return False
    return True


def build_cell(cell: ZooCell, train: ImageData, test: ImageData, config: TrainConfig,
               *, progress: bool = False) -> TrainedModel:
    """Train the cell's model (the seed fixes initial weights, poisoned items and shuffling),
    leaving the defender's share out of training (:mod:`goodnet.data.holdout`)."""
    attack = None
    if cell.attack != CLEAN:
        attack = make_attack(cell.attack, None, train.image_shape, train.num_classes)
    return train_model(cell.arch, train, test, replace(config, seed=cell.seed), attack,
                       hold_out=DEFENDER_SHARE, progress=progress)


def build_zoo(
    root: Path,
    cells: Sequence[ZooCell],
    config: TrainConfig,
    *,
    progress: bool = False,
    loader: Callable[[str, str], ImageData] = load_dataset,
) -> Iterator[tuple[ZooCell, ModelCard | None, float]]:
    """Build the cells not yet built, yielding ``(cell, card, seconds)`` for each cell (card None
    and 0 seconds for a cell that was already there)."""
    data: dict[str, tuple[ImageData, ImageData]] = {}
    bar = tqdm(cells, disable=not progress, unit="model", desc="zoo")
    for cell in bar:
        if is_built(cell, root):
            yield cell, None, 0.0
            continue
        bar.set_postfix_str(f"{cell.data} {cell.arch} {cell.attack} seed {cell.seed}")
        if cell.data not in data:
            data[cell.data] = (loader(cell.data, "train"), loader(cell.data, "test"))
        start = time.perf_counter()
        result = build_cell(cell, *data[cell.data], config, progress=False)
        save_model(cell.path(root), result.model, result.card, extras=result.extras)
        yield cell, result.card, time.perf_counter() - start


def collect(root: Path) -> list[tuple[ZooCell, ModelCard]]:
    """Every model under ``root`` laid out as a zoo, with its card."""
    found = []
    for path in sorted(Path(root).glob("*/*/*/seed*.safetensors")):
        attack, arch, data = path.parent.name, path.parent.parent.name, path.parents[2].name
        attack = ATTACK_ALIASES.get(attack, attack)
        if not path.stem.removeprefix("seed").isdigit():
            continue  # a benchmark's model with non-default settings (seed<k>-<hash>)
        seed = int(path.stem.removeprefix("seed"))
        found.append((ZooCell(data, arch, attack, seed), read_card(path)))
    return found


def _spread(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def zoo_table(root: Path) -> str:
    """A Markdown table of the zoo: CA, ASR and RA (mean ± std over seeds), CA relative to the
    clean model of the same data and architecture, and time per model."""
    groups: dict[tuple[str, str, str], list[ModelCard]] = {}
    for cell, card in collect(root):
        groups.setdefault((cell.data, cell.arch, cell.attack), []).append(card)
    if not groups:
        raise GoodnetError(f"{root}: no zoo models found")
    lines = ["| data | arch | attack | seeds | CA % | ΔCA vs clean | ASR % | RA % | "
             "train s | attack s |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate([CLEAN, *ATTACKS])}
    for (data, arch, attack), cards in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99))):
        ca = [c.metrics["clean_accuracy"] for c in cards]
        clean = groups.get((data, arch, CLEAN), [])
        delta = "–"
        if clean and attack != CLEAN:
            gap = statistics.fmean(ca) - statistics.fmean(
                c.metrics["clean_accuracy"] for c in clean)
            delta = f"{100 * gap:+.2f}"
        asr = [c.metrics["attack_success_rate"] for c in cards]
        ra = [c.metrics["robust_accuracy"] for c in cards]
        train_s = statistics.median(c.training["seconds"] for c in cards)
        attack_s = statistics.median(c.training.get("attack_seconds", 0.0) for c in cards)
        lines.append(f"| {data} | {arch} | {attack} | {len(cards)} | {_spread(ca)} | {delta} | "
                     f"{_spread(asr)} | {_spread(ra)} | {train_s:.0f} | {attack_s:.0f} |")
    return "\n".join(lines)
