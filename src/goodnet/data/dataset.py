"""The in-memory image data set every goodnet component consumes.

Images are held once, as stored (``uint8`` pixels 0–255, or floats already in [0, 1]), in
channels-first layout ``(N, C, H, W)``; a batch is converted to floats in [0, 1] only when it is
read. Views (subsets, poisoned views) index into that one copy instead of duplicating it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from goodnet.errors import GoodnetError


class BatchSource(Protocol):
    """Anything that serves batches by index: a data set or a view of one."""

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float, [0, 1], ``(B, C, H, W)``) and labels (int64) at ``index``."""
        ...


@dataclass(frozen=True, eq=False)
class ImageData:
    """Labelled images, channels first.

    Attributes:
        images: ``(N, C, H, W)``, ``uint8`` (0–255) or floating point in [0, 1].
        labels: ``(N,)`` int64 class ids in ``[0, num_classes)``.
        num_classes: number of classes of the task (not only those present here).
        name: where the data came from, for messages and model cards.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = "data"

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise GoodnetError(
                f"{self.name}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise GoodnetError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}"
            )
        if self.images.dtype != torch.uint8 and not self.images.dtype.is_floating_point:
            raise GoodnetError(
                f"{self.name}: images must be uint8 or float, got {self.images.dtype}"
            )
        if self.labels.dtype != torch.int64:
            object.__setattr__(self, "labels", self.labels.long())
        if self.num_classes < 1:
            raise GoodnetError(f"{self.name}: num_classes must be positive, got {self.num_classes}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise GoodnetError(
                f"{self.name}: labels must lie in [0, {self.num_classes - 1}], found "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[index]), self.labels[index]

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageData:
        """The images at ``index`` (a copy of just those rows)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.images[index], self.labels[index], self.num_classes,
                         name or f"{self.name}[{len(index)}]")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Stored pixels as floats in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def batches(
    source: BatchSource,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of ``source``, in order or shuffled by ``generator``."""
    if batch_size < 1:
        raise GoodnetError(f"batch size must be positive, got {batch_size}")
    n = len(source)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        x, y = source.get(order[start:start + batch_size])
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


def clean_count(amount: float | int, n: int) -> int:
    """How many of ``n`` images ``amount`` (a fraction in (0, 1) or a count) stands for."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise GoodnetError(f"clean amount must be a fraction or a count, got {amount!r}")
    if isinstance(amount, float) and amount < 1:
        if amount <= 0:
            raise GoodnetError(f"clean fraction must be in (0, 1), got {amount}")
        return max(1, round(amount * n))
    count = int(amount)
    if count != amount or not 1 <= count < n:
        raise GoodnetError(f"clean count must be an integer in [1, {n - 1}], got {amount}")
    return count


def split_clean(
    train: ImageData, amount: float | int = 0.01, seed: int = 0
) -> tuple[ImageData, ImageData]:
    """Split the defender's clean data off a training set.

    The clean data a defense may use always comes from the training set, never from the test
    set. The split is stratified: each class contributes in proportion to its frequency
    (at least one image per class present, as far as ``amount`` allows). For one seed the
    draws are nested: a smaller amount takes a subset of the images a larger one takes.

    Args:
        train: the training set.
        amount: a fraction in (0, 1) of ``train``, or a count of images (an int >= 1).
        seed: seeds the choice of images.

    Returns:
        ``(clean, rest)``: the defender's clean data and the remainder of the training set.
    """
    n = len(train)
    count = clean_count(amount, n)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    labels = train.labels[order]
    # Stratify: rank each image within its class, then take images in order of that rank
    # relative to the class size, so every class is drawn at the same rate.
    counts = torch.bincount(labels, minlength=train.num_classes).double()
    rank = torch.empty(n, dtype=torch.double)
    for c in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(labels == c).flatten()
        rank[members] = (torch.arange(len(members), dtype=torch.double) + 0.5) / counts[c]
    chosen = order[torch.argsort(rank, stable=True)[:count]]
    keep = torch.ones(n, dtype=torch.bool)
    keep[chosen] = False
    chosen = chosen.sort().values
    rest = torch.nonzero(keep).flatten()
    return (train.subset(chosen, f"{train.name}:clean[{count}]"),
            train.subset(rest, f"{train.name}:rest[{n - count}]"))
