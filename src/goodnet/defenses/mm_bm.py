"""MM-BM: backdoor mitigation by activation upper bounds (Wang, Xiang, Miller & Kesidis, "MM-BD:
Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum
Margin Statistic", IEEE S&P 2024, arXiv:2205.06900; reference code wanghangpsu/MM-BD
``univ_bm.py``, run by ``run_mitigate.sh``).

A backdoor drives a few internal neurons far above anything clean data makes them do: that is
what gives the backdoor class its abnormally large achievable margin, MM-BD's detection
statistic. MM-BM bounds each channel c of some internal layers from above, ``a' = min(a, z_c)``,
and learns the bounds z with the weights untouched: the bounded network must reproduce the
original network's logits on clean data (mean squared error) while the bounds' norms are pushed
down (``loss = MSE + c · Σ_layers ‖z_layer‖₂``), so every channel is held near the largest value
clean data needs and a trigger can no longer push it further.

Defaults, the reference's: Adam on the bounds with ``bound_lr`` 0.1, 50 ``epochs``,
``batch_size`` 200, norm weight ``bound_weight`` c = 0.5, adapted by ``weight_factor`` a = 1.2:
after each 10th epoch past the 10th (``adjust_every``), c is multiplied by a when the bounded
network's accuracy over that epoch was at least ``target_accuracy`` (95 %), divided by a
otherwise. The bounds learn from the clean images the model classifies correctly
(``correct_only``; the reference takes 50 test images per class and keeps the correct ones).

Departures, documented:

- **Where the bounds sit.** The reference bounds ResNet-18's activations after the stem's ReLU
  and after its first two of four stages (the first half of its convolutions). goodnet bounds,
  by default, the mask point (:func:`goodnet.masking.mask_points`: the BatchNorm that follows a
  convolution, else the convolution) of every convolution in the first half of the network, in
  the order they run, so any architecture works, without BatchNorm too (the planted networks,
  ``deepid``). With the bounds kept ≥ 0, bounding a layer a ReLU follows is the same as bounding
  the ReLU's output. ``layers`` names others: any named module run once, such as ``resnet20``'s
  ``layer1.2.relu2``, a stage's output after its residual sum, where the reference puts them.
- **Initial bounds.** The reference starts every bound at 8 (for its CIFAR-10 ResNet-18 on
  inputs in [0, 1]); goodnet starts each at the largest value its channel takes on the clean
  data (at least 0), a scale that fits every network: the bounded network then starts exactly
  equal to the original on that data, and a channel clean data never turns on (a planted
  backdoor channel) starts, and stays, at 0. ``initial_bound=8`` is the reference's start.
- **Bounds stay ≥ 0** (projected after every step; the reference does not project, but a
  negative bound after a ReLU would be meaningless).
- Sized for 28×28 and CPUs, ``quick`` runs 4 epochs; the defaults are the reference's.

The repaired model is a :class:`goodnet.masking.Masked` copy whose mask set holds no masks and
the learned upper bounds (``MaskSet.bounds``), applied by forward hooks; it is saved beside the
weights as ``extra/bound/<layer>`` and loaded back without executing anything. The curve (axis
``epoch``) measures the bounded network every ``measure_every`` epochs, for reporting only:
nothing is chosen from it; the result is the bounds after the last epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps
from goodnet.errors import GoodnetError
from goodnet.masking import Masked, MaskSet, mask_points, masked
from goodnet.metrics import predict
from goodnet.models import model_device


@dataclass(frozen=True)
class MMBMConfig:
    """Settings of MM-BM.

    Attributes:
        layers: the layers whose outputs are bounded, per channel; empty: the mask point of
            every convolution in the first half of the network, in the order they run.
        epochs: passes over the clean data.
        batch_size: images per step.
        bound_lr: Adam's learning rate for the bounds (the weights are not trained).
        bound_weight: the starting weight c of the bounds' norms in the loss.
        weight_factor: what c is multiplied or divided by when it is adapted.
        adjust_every: c is adapted after every epoch whose index (from 0) is a multiple of this,
            past the first such one.
        target_accuracy: c grows when the bounded network's accuracy over the epoch reached
            this, and shrinks otherwise.
        correct_only: learn from the clean images the model classifies correctly only.
        initial_bound: every bound's starting value; None: each channel's largest value on
            the clean data (at least 0).
        measure_every: the curve measures the bounded network every this many epochs (and after
            the last), for reporting.
        seed: fixes the batch order.
    """

    layers: tuple[str, ...] = ()
    epochs: int = 50
    batch_size: int = 200
    bound_lr: float = 0.1
    bound_weight: float = 0.5
    weight_factor: float = 1.2
    adjust_every: int = 10
    target_accuracy: float = 0.95
    correct_only: bool = True
    initial_bound: float | None = None
    measure_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("epochs", "batch_size", "adjust_every", "measure_every"):
            if getattr(self, name) < 1:
                raise GoodnetError(f"mm-bm: {name} must be at least 1")
        for name in ("bound_lr", "bound_weight", "weight_factor"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise GoodnetError(f"mm-bm: {name} must be a positive number")
        if self.initial_bound is not None and not (
                math.isfinite(self.initial_bound) and self.initial_bound >= 0):
            raise GoodnetError("mm-bm: initial_bound must be a number ≥ 0")
        if not 0 <= self.target_accuracy <= 1:
            raise GoodnetError("mm-bm: target_accuracy must be in [0, 1]")


def default_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The mask points of the convolutions in the first half of the network, in run order."""
    points = list(dict.fromkeys(mask_points(model, example).values()))
    if not points:
        raise GoodnetError("mm-bm: the model has no convolution; name the layers to bound")
    return points[:math.ceil(len(points) / 2)]


def _per_channel(bound: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return bound.view(1, -1, *([1] * (output.ndim - 2)))


@contextlib.contextmanager
def bounded(model: nn.Module, bounds: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` with each named layer's output clamped to ``bounds`` (tensors that may require
    gradients) for the duration of a ``with`` block."""
    handles = []
    try:
        for name, bound in bounds.items():
            layer = model.get_submodule(name)
            handles.append(layer.register_forward_hook(
                lambda _m, _i, out, b=bound: torch.minimum(out, _per_channel(b, out))))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def clean_maxima(model: nn.Module, layers: list[str], data: ImageData, batch_size: int,
                 owner: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The largest value each channel of ``layers`` (named in ``owner``, by default ``model``
    itself: the network inside a masked one) takes on ``data`` (at least 0), streamed."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            top = out.detach().transpose(0, 1).flatten(1).amax(1).clamp(min=0)
            maxima[name] = top if name not in maxima else torch.maximum(maxima[name], top)
        return hook

    handles = []
    try:
        for name in layers:
            try:
                layer = (owner or model).get_submodule(name)
            except AttributeError:
                raise GoodnetError(f"mm-bm: the model has no layer {name!r}") from None
            handles.append(layer.register_forward_hook(record(name)))
        for x, _ in batches(data, batch_size, device=model_device(model)):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in maxima]
    if missing:
        raise GoodnetError(f"mm-bm: layer {missing[0]!r} does not run on the model's input")
    return maxima


@dataclass
class _Learning:
    """The state of a bound optimisation: the bounds, the norm weight, the curve so far."""

    bounds: dict[str, torch.Tensor]
    weight: float
    points: list[Point]


class MMBM(Defense[MMBMConfig]):
    """Learn per-channel upper bounds on internal activations that keep clean outputs."""

    name = "mm-bm"
    paper = "Wang et al., IEEE S&P 2024, arXiv:2205.06900"
    Config = MMBMConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 4, "batch_size": 64, "adjust_every": 2,
                                            "measure_every": 2}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None  # needs_clean
        cfg = self.config
        work = copy.deepcopy(model).eval()
        work.requires_grad_(False)
        inner = work.model if isinstance(work, Masked) else work
        layers = list(cfg.layers) or default_layers(inner, clean.get(torch.arange(1))[0].to(
            model_device(work)))
        data = self._training_data(work, clean)
        start = clean_maxima(work, layers, data, cfg.batch_size, inner)
        if cfg.initial_bound is not None:
            start = {k: torch.full_like(v, cfg.initial_bound) for k, v in start.items()}
        state = _Learning({k: v.clone() for k, v in start.items()}, cfg.bound_weight, [])
        self._learn(work, inner, data, clean, state, steps)
        repaired = self._repaired(model, state.bounds)
        curve = Curve("epoch", tuple(state.points), (("bounded", len(state.points) - 1),))
        notes = {"layers": layers, "images": len(data), "bound_weight": state.weight,
                 "initial_mean_bound": {k: float(v.mean()) for k, v in start.items()},
                 "mean_bound": {k: float(v.mean()) for k, v in state.bounds.items()},
                 "zero_bounds": sum(int((v == 0).sum()) for v in state.bounds.values())}
        return Repaired(model=repaired, curve=curve, variants={"bounded": repaired},
                        chosen="bounded", notes=notes)

    def _training_data(self, model: nn.Module, clean: ImageData) -> ImageData:
        if not self.config.correct_only:
            return clean
        correct = torch.nonzero(predict(model, clean) == clean.labels).flatten()
        if len(correct) == 0:
            raise GoodnetError("mm-bm: the model classifies none of the clean images correctly")
        return clean.subset(correct)

    def _learn(self, work: nn.Module, inner: nn.Module, data: ImageData, clean: ImageData,
               state: _Learning, steps: Steps) -> None:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        for bound in state.bounds.values():
            bound.requires_grad_(True)
        optimizer = torch.optim.Adam(list(state.bounds.values()), lr=cfg.bound_lr)
        self._measure(work, inner, clean, state, steps, 0)
        for epoch in range(cfg.epochs):
            accuracy = self._epoch(work, inner, data, state, optimizer, generator)
            if epoch > cfg.adjust_every and epoch % cfg.adjust_every == 0:
                grow = accuracy >= cfg.target_accuracy
                state.weight *= cfg.weight_factor if grow else 1 / cfg.weight_factor
            if (epoch + 1) % cfg.measure_every == 0 or epoch + 1 == cfg.epochs:
                self._measure(work, inner, clean, state, steps, epoch + 1)
        for bound in state.bounds.values():
            bound.requires_grad_(False)

    def _epoch(self, work: nn.Module, inner: nn.Module, data: ImageData, state: _Learning,
               optimizer: torch.optim.Optimizer, generator: torch.Generator) -> float:
        """One pass; the bounded network's accuracy over it (before each step, as the
        reference counts it)."""
        correct = 0
        for x, y in batches(data, self.config.batch_size, shuffle=True, generator=generator,
                            device=model_device(work)):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                reference = work(x)
            with bounded(inner, state.bounds):
                outputs = work(x)
            norms = sum(torch.linalg.vector_norm(b) for b in state.bounds.values())
            loss = F.mse_loss(outputs, reference) + state.weight * norms
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for bound in state.bounds.values():
                    bound.clamp_(min=0)
            correct += int((outputs.argmax(1) == y).sum())
        return correct / len(data)

    def _measure(self, work: nn.Module, inner: nn.Module, clean: ImageData, state: _Learning,
                 steps: Steps, epoch: int) -> None:
        with torch.no_grad(), bounded(inner, state.bounds):
            norm = sum(float(torch.linalg.vector_norm(b)) for b in state.bounds.values())
            state.points.append(steps.measure(
                work, clean, epoch, None,
                extra=(("bound_weight", state.weight), ("bound_norm", norm))))

    @staticmethod
    def _repaired(model: nn.Module, bounds: dict[str, torch.Tensor]) -> Masked:
        """A copy of ``model`` with the bounds installed (beside its masks, if it has any)."""
        values = {k: v.detach().clone() for k, v in bounds.items()}
        if isinstance(model, Masked):
            with model.unmasked() as bare:
                return masked(bare, MaskSet(model.masks.masks, model.masks.semantics, values))
        return masked(model, MaskSet({}, "channel", values))
