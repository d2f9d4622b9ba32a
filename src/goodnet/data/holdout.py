"""The defender's share of a training split, kept out of training (issue 27).

A model goodnet trains (``goodnet attack``, ``goodnet train``, the zoo, a benchmark's models)
never sees a stratified share of its training split, drawn by :func:`split_clean` with the
model's seed: the images a defender later draws as "clean data" with ``--clean DATASET``. Clean
images a model trained on score lower on a detector than images it has never seen, so a
threshold calibrated on them lets more false alarms through on new inputs (BENCHMARKS.md,
"Calibrating on images the model learned"); clean data the model has not seen is what a user
with a third-party model has, too.

The model card records the rule (``training["held_out"]``: the data set's name, the amount and
seed given to :func:`split_clean`, the count) and a SHA-256 of the held-out images and labels,
so the same images are found again in a copy of the data set, and a different copy is noticed.
For one seed :func:`split_clean`'s draws are nested, so a benchmark's 1 % or 5 % clean split
drawn with the model's seed lies inside a 5 % hold-out drawn with that seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from goodnet.data.dataset import ImageData, clean_count, split_clean
from goodnet.errors import GoodnetError

# The share of the training split a model goodnet trains leaves out for the defender: 5 % is
# the literature's clean-data budget (BackdoorBench), and holds goodnet's default 1 %.
DEFENDER_SHARE = 0.05


@dataclass(frozen=True)
class HoldOut:
    """Which images of a training split a model did not train on.

    Attributes:
        data: the training split's name (``ImageData.name``: ``mnist``, or a file's name).
        amount: the fraction or count given to :func:`split_clean`.
        seed: the seed given to :func:`split_clean`.
        count: how many images were held out.
        sha256: a digest of the held-out images and labels (:func:`digest`).
    """

    data: str
    amount: float | int
    seed: int
    count: int
    sha256: str

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_training(cls, training: Mapping[str, Any], source: str = "card"
                      ) -> HoldOut | None:
        """The hold-out a card's ``training`` entry records (None where it records none)."""
        record = training.get("held_out")
        if record is None:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(record, dict) or set(record) != fields:
            raise GoodnetError(f"{source}: the model card's held_out entry is malformed")
        ok = (isinstance(record["data"], str) and isinstance(record["sha256"], str)
              and _number(record["amount"]) and _integer(record["seed"])
              and _integer(record["count"]) and record["count"] >= 1)
        if not ok:
            raise GoodnetError(f"{source}: the model card's held_out entry is malformed")
        return cls(**record)


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def digest(data: ImageData) -> str:
    """SHA-256 of ``data``'s images (as stored) and labels, in order."""
    hasher = hashlib.sha256()
    hasher.update(repr((tuple(data.images.shape), str(data.images.dtype))).encode())
    hasher.update(data.images.contiguous().numpy().tobytes())
    hasher.update(data.labels.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def split_held_out(train: ImageData, amount: float | int, seed: int
             ) -> tuple[ImageData, HoldOut | None]:
    """(the images to train on, the record of those held out): ``amount`` of ``train``
    (a fraction or a count; 0 holds nothing out) drawn by :func:`split_clean` with ``seed``."""
    if amount == 0:
        return train, None
    held, rest = split_clean(train, amount, seed=seed)
    return rest, HoldOut(train.name, amount, seed, len(held), digest(held))


def held_images(train: ImageData, held: HoldOut | None) -> tuple[ImageData | None, str]:
    """(the images of ``train`` that the model held out, or None where ``train`` is not the
    split it held them out of; and, for None, why, in a few words)."""
    if held is None:
        return None, "its card records no held-out images"
    if held.data != train.name:
        return None, f"it held out images of {held.data}, not of {train.name}"
    if held.count >= len(train):
        return None, f"this copy of {train.name} is not the one it was trained on"
    images = split_clean(train, held.amount, seed=held.seed)[0]
    if len(images) != held.count or digest(images) != held.sha256:
        return None, f"this copy of {train.name} is not the one it was trained on"
    return images, ""


def defender_clean(train: ImageData, amount: float | int, seed: int,
                   held: HoldOut | None) -> tuple[ImageData, str | None]:
    """The defender's clean images: ``amount`` of ``train`` (a fraction of the whole split, or
    a count), drawn with ``seed`` from the images the model did not train on where its card
    says which (``held``), and from the whole split otherwise.

    Returns:
        ``(clean, caveat)``: caveat is None when the model is known not to have trained on
        ``clean``, and otherwise says why that is not known, in a few words.
    """
    count = clean_count(amount, len(train))
    images, caveat = held_images(train, held)
    if images is None:
        return split_clean(train, count, seed=seed)[0], caveat
    if count > len(images):
        raise GoodnetError(f"the model trained on all of {train.name}'s training split but "
                           f"{len(images)} images held out for the defender (its card); "
                           f"{count} clean images were asked for: ask for at most "
                           f"{len(images)}, or give a file of clean images")
    if count < len(images):
        images = split_clean(images, count, seed=seed)[0]
    return dataclasses.replace(images, name=f"{train.name}:held-out[{count}]"), None


def forget_held_out(training: Mapping[str, Any]) -> dict[str, Any]:
    """A card's ``training`` entry without its hold-out: for a model derived with clean data
    (fine-tuned or repaired), which may have learned the held-out images it was given."""
    return {k: v for k, v in training.items() if k != "held_out"}
