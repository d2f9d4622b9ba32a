"""What the mask-learning defenses (RNP, ANP) share: learnable channel masks with optional
adversarial noise, installed by hooks on a working copy, and the choice of a pruning threshold
from the defender's clean data.

Masks sit on the *mask points* of every convolution (:func:`goodnet.masking.mask_points`): the
BatchNorm that normalises its output when there is one, else the convolution itself, so networks
without BatchNorm (``deepid``) are covered the same way. With the references' ``"keep-bias"``
semantics a mask scales the weight part of the output and keeps the shift: on a BatchNorm,
``γ·m`` with β kept (exactly RNP's ``MaskBatchNorm2d`` and ANP's ``NoisyBatchNorm2d``); on a bare
convolution, the kernel's output scaled and the bias kept (the no-BatchNorm reading the ANP
author gave, csdongxian/ANP_backdoor#2). ANP's noise perturbs both parts multiplicatively,
``(m + δ)·(y − b) + (1 + ξ)·b``.

Choosing how much to prune, honestly: :func:`threshold_curve` prunes the *original* model at each
threshold (every channel whose mask is at or below it) and measures the accuracy on held-out
clean data the masks were not learned on; :func:`choose_threshold` takes the largest threshold
such that every threshold up to it keeps that accuracy within ``max_drop`` of the unpruned
model's, or prunes nothing if even the smallest threshold costs more than that. With
``select="proxy"`` the thresholds within that drop compete on the held-out ASR of Neural
Cleanse's reversed trigger instead (:mod:`goodnet.defenses.proxy`). Test data, when given, only
adds CA and ASR to the curve for reporting.

Recovery (``recover_epochs > 0``, off by default; shared with :mod:`goodnet.defenses.prune`):
after the choice, the pruned model is fine-tuned on the clean data the masks were learned on,
with the masks installed and the pruned channels' own parameters put back after every step, so
a pruned channel stays pruned. Neither paper does this; the defaults (SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cosine, batch 64) are goodnet's fine-pruning's (BackdoorBench's ``fp``). The
choice itself is unchanged: it is made before recovery, so a larger ``max_drop`` is how a user
trades pruning for accuracy that recovery wins back. The curve gains a point labelled
"recovered" (held-out clean accuracy), and the chosen variant's mark moves to it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps, clean_or_blank
from goodnet.defenses.proxy import Proxy, choose_by_proxy, proxy_extra, reversed_proxy
from goodnet.errors import GoodnetError
from goodnet.masking import (
    SEMANTICS,
    Masked,
    MaskSet,
    applied,
    channel_count,
    get_layer,
    mask_points,
    masked,
)
from goodnet.train import Hooks, TrainConfig, train

SELECTIONS = ("clean", "threshold", "count", "proxy")
HELD_OUT = ("clean", "proxy")  # the selections that choose on a held-out part


def all_mask_points(model: nn.Module, clean: ImageData, hidden_linear: bool = True) -> list[str]:
    """The mask point of every convolution, in the order they run, then (with
    ``hidden_linear``) every fully connected layer but the last, whose outputs are neurons."""
    points = list(dict.fromkeys(mask_points(model, clean_or_blank(model, clean)).values()))
    if hidden_linear:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        points += linear[:-1]
    if not points:
        raise GoodnetError("the model has no layer whose channels could be masked")
    return points


def _shape(vector: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return vector.view(1, -1, *([1] * (output.ndim - 2)))


class LearnableMasks:
    """Per-channel masks (initialised to 1) and, with ``noise``, ANP's per-channel noise on the
    weight part (δ) and the shift (ξ), as hooks on ``model`` while the ``with`` block lasts.

    ``perturb`` switches the noise on and off between forward passes.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], semantics: str = "keep-bias",
                 noise: bool = False) -> None:
        if semantics not in SEMANTICS:
            raise GoodnetError(f"mask semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.model = model
        self.semantics = semantics
        self.perturb = False
        device = next(model.parameters()).device
        self.layers = {name: get_layer(model, name) for name in layers}
        self.masks = {name: nn.Parameter(torch.ones(channel_count(layer), device=device))
                      for name, layer in self.layers.items()}
        self.noise = {name: (nn.Parameter(torch.zeros(len(mask), device=device)),
                             nn.Parameter(torch.zeros(len(mask), device=device)))
                      for name, mask in self.masks.items()} if noise else {}
        self._handles: list[Any] = []

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.masks.values())

    def noise_parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.noise.values() for p in pair]

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """Noise drawn uniformly from [-eps, eps] (ANP's random start)."""
        for parameter in self.noise_parameters():
            values = torch.rand(parameter.shape, generator=generator) * 2 * eps - eps
            parameter.copy_(values.to(parameter.device))

    @torch.no_grad()
    def clip(self) -> None:
        for mask in self.masks.values():
            mask.clamp_(0, 1)

    def values(self) -> dict[str, torch.Tensor]:
        """The learned masks, detached, on the CPU."""
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def _hook(self, name: str, layer: nn.Module):
        def apply(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            scale: torch.Tensor = self.masks[name]
            shift_factor: torch.Tensor | None = None if self.semantics == "keep-bias" else scale
            if self.perturb and name in self.noise:
                delta, xi = self.noise[name]
                scale = scale + delta
                shift_factor = (1 + xi) if shift_factor is None else shift_factor * (1 + xi)
            bias = layer.bias
            if not isinstance(bias, torch.Tensor):
                return output * _shape(scale, output)
            bias = _shape(bias, output)
            shifted = bias if shift_factor is None else bias * _shape(shift_factor, output)
            return (output - bias) * _shape(scale, output) + shifted
        return apply

    def __enter__(self) -> LearnableMasks:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name, layer)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every parameter's ``requires_grad`` off for the block (masks are learned,
    weights are not)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def binary_masks(values: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """1 where the learned mask is above ``threshold``, 0 (pruned) where it is at or below."""
    return {name: (value > threshold).float() for name, value in values.items()}


def lowest_masks(values: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Prune the ``count`` channels with the lowest learned masks, over all layers."""
    flat = torch.cat(list(values.values()))
    order = torch.argsort(flat, stable=True)[:count]
    keep = torch.ones(len(flat))
    keep[order] = 0
    return dict(zip(values, keep.split([len(v) for v in values.values()]), strict=True))


@dataclass(frozen=True)
class Choice:
    """How to turn learned masks into a pruning (the shared settings of RNP and ANP).

    Attributes:
        select: "clean" (the largest threshold keeping held-out clean accuracy within
            ``max_drop``; goodnet's default), "threshold" (a fixed ``threshold``, the papers'),
            "count" (the ``count`` lowest masks; ANP's "prune by number"), or "proxy" (of the
            thresholds keeping held-out clean accuracy within ``max_drop``, the one with the
            lowest ASR of a reversed trigger; see :mod:`goodnet.defenses.proxy`).
        threshold: the fixed threshold for ``select="threshold"``.
        count: channels pruned for ``select="count"``: an int, or a fraction of all channels.
        thresholds: the thresholds swept for the curve (and for ``select="clean"`` and
            ``"proxy"``).
        max_drop: the held-out clean-accuracy loss allowed, absolute (0.02 = two points).
        select_share: share of the clean data kept out of mask learning to select on (only for
            ``select="clean"`` and ``"proxy"``).
    """

    select: str
    threshold: float
    count: float
    thresholds: tuple[float, ...]
    max_drop: float
    select_share: float

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise GoodnetError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not 0 <= self.threshold <= 1 or not 0 <= self.max_drop <= 1:
            raise GoodnetError("threshold and max_drop must lie in [0, 1]")
        if self.select in HELD_OUT and not 0 < self.select_share < 1:
            raise GoodnetError("select_share must lie in (0, 1)")
        if self.count < 0:
            raise GoodnetError("count must not be negative")


@dataclass(frozen=True)
class Recovery:
    """Fine-tuning a pruned model with its masks held (the recovery step of RNP, ANP and prune).

    Attributes:
        epochs: passes over the clean data; 0: no recovery.
        lr: SGD learning rate (momentum 0.9, weight decay 5e-4, cosine to zero).
        batch_size: images per step.
        seed: fixes the batch order.
    """

    epochs: int = 0
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise GoodnetError("recovery: recover_epochs >= 0, recover_lr > 0 and "
                               "recover_batch_size >= 1")


def recover_pruned(model: nn.Module, masks: MaskSet, data: ImageData, recovery: Recovery,
                   progress: bool = False) -> tuple[Masked, list[float]]:
    """A copy of ``model`` with ``masks`` installed, fine-tuned on ``data``; and the loss per
    epoch. The masks stay installed throughout, and the parameters of the masked layers' pruned
    channels are put back after every step, so a pruned channel's output stays what pruning made
    it: 0 ("channel"), or its kept bias or BatchNorm shift ("keep-bias")."""
    work = masked(model, masks)
    held = []
    for name, mask in masks.masks.items():
        layer = get_layer(work.model, name)
        for parameter in (layer.weight, layer.bias):
            if isinstance(parameter, torch.Tensor):
                pruned = (mask == 0).to(parameter.device)
                held.append((parameter, pruned, parameter.detach()[pruned].clone()))

    def hold() -> None:
        for parameter, pruned, values in held:
            parameter[pruned] = values

    history = train(work, data, TrainConfig(
        epochs=recovery.epochs, batch_size=recovery.batch_size, lr=recovery.lr, momentum=0.9,
        weight_decay=5e-4, schedule="cosine", seed=recovery.seed), progress=progress,
        hooks=Hooks(after_step=hold))
    return work.eval(), [round(e.loss, 4) for e in history.epochs]


def recover_variants(model: nn.Module, variants: dict[str, MaskSet], curve: Curve,
                     data: ImageData, measured_on: ImageData, recovery: Recovery, steps: Steps,
                     progress: bool = False) -> tuple[dict[str, nn.Module], Curve, list]:
    """Every variant of a repair recovered on ``data``: the models by name; ``curve`` with a
    point labelled "recovered" per variant (at the x of the point the variant was marked at,
    clean-data accuracy on ``measured_on``), the marks moved to them; and each variant's loss
    per epoch. Variants with the same masks are recovered once."""
    marks = dict(curve.marks)
    models: dict[str, nn.Module] = {}
    losses: dict[str, list[float]] = {}
    seen: dict[tuple, tuple[nn.Module, Point, list[float]]] = {}
    points = list(curve.points)
    for name, masks in variants.items():
        key = (masks.semantics, masks_key(dict(masks.masks)))
        if key not in seen:
            recovered, loss = recover_pruned(model, masks, data, recovery, progress)
            at = points[marks[name]].x if name in marks else None
            point = steps.measure(recovered, measured_on, at, count_pruned(dict(masks.masks)),
                                  label="recovered")
            seen[key] = (recovered, point, loss)
        models[name], point, losses[name] = seen[key]
        marks[name] = len(points)
        points.append(point)
    return models, Curve(curve.axis, tuple(points), tuple(marks.items())), list(losses.items())


def default_thresholds() -> tuple[float, ...]:
    """0, 0.05, ..., 0.9: the references' sweep (pruning-max 0.90, step 0.05)."""
    return tuple(round(0.05 * i, 2) for i in range(19))


@dataclass(frozen=True)
class MaskSettings:
    """The settings RNP and ANP share: where masks go, how they apply, how much to prune.

    Attributes:
        semantics: "keep-bias" (mask γ, keep β: the references) or "channel".
        hidden_linear: also mask the neurons of fully connected layers before the output.
        select, threshold, count, thresholds, max_drop, select_share: how much to prune (see
            :class:`Choice`).
        seed: fixes the defense's randomness, the held-out split and the recovery's batches.
        recover_epochs: after choosing, fine-tune the pruned model this many epochs on the clean
            data (the part masks were learned on) with the masks held (see
            :func:`recover_pruned`); 0: none.
        recover_lr, recover_batch_size: the recovery's SGD learning rate and batch size.
    """

    # Old names of the pruning-choice settings, declared here (where RNP and ANP get these
    # fields from) so that both inherit them; :class:`Choice` is built from these fields.
    renamed: ClassVar[dict[str, str]] = {"tolerance": "max_drop", "holdout": "select_share"}

    semantics: str = "keep-bias"
    hidden_linear: bool = True
    select: str = "clean"
    threshold: float = 0.2
    count: float = 0.05
    thresholds: tuple[float, ...] = default_thresholds()
    max_drop: float = 0.02
    select_share: float = 0.2
    seed: int = 0
    recover_epochs: int = 0
    recover_lr: float = 0.01
    recover_batch_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        self.choice()
        self.recovery()

    def choice(self) -> Choice:
        return Choice(self.select, self.threshold, self.count, self.thresholds, self.max_drop,
                      self.select_share)

    def recovery(self) -> Recovery:
        return Recovery(self.recover_epochs, self.recover_lr, self.recover_batch_size, self.seed)


def split_for_choice(clean: ImageData, choice: Choice, seed: int) -> tuple[ImageData, ImageData]:
    """(data to learn masks on, held-out data to choose on); both all of ``clean`` unless
    ``select`` is "clean" or "proxy"."""
    if choice.select not in HELD_OUT:
        return clean, clean
    from goodnet.data.dataset import split_clean

    held, learn = split_clean(clean, choice.select_share, seed=seed)
    if len(learn) == 0 or len(held) == 0:
        raise GoodnetError(f"{clean.name}: too little clean data to hold "
                           f"{choice.select_share:g} out")
    return learn, held


def masks_key(masks: dict[str, torch.Tensor]) -> tuple:
    """A hashable identity of a set of masks: equal keys, equal masked models."""
    return tuple((name, tuple(m.tolist())) for name, m in sorted(masks.items()))


def count_pruned(masks: dict[str, torch.Tensor]) -> int:
    return int(sum(int((m == 0).sum()) for m in masks.values()))


def sweep_points(model: nn.Module, candidates: Sequence[tuple[float | None,
                 dict[str, torch.Tensor]]], semantics: str, held: ImageData | None,
                 steps: Steps, proxy: Proxy | None = None) -> list[Point]:
    """``model`` pruned by each candidate's masks, one point each at the candidate's x (with
    ``proxy``, the reversed trigger's ASR on ``held`` as well); candidates that prune the same
    channels give the same model and are measured once."""
    work = copy.deepcopy(model)
    seen: dict[tuple, Point] = {}
    points = []
    for x, masks in candidates:
        key = masks_key(masks)
        if key not in seen:
            with applied(work, MaskSet(masks, semantics)):
                seen[key] = steps.measure(work, held, x, count_pruned(masks),
                                          extra=proxy_extra(work, held, proxy))
        points.append(dataclasses.replace(seen[key], x=x))
    return points


def threshold_curve(model: nn.Module, values: dict[str, torch.Tensor], choice: Choice,
                    semantics: str, held: ImageData, steps: Steps, proxy: Proxy | None = None
                    ) -> list[Point]:
    """The original model pruned at each threshold: channels pruned, held-out clean accuracy,
    with ``proxy`` its ASR and, with an evaluation, test CA and ASR. Point 0 (x None) is the
    unpruned model."""
    ones = {name: torch.ones_like(v) for name, v in values.items()}
    candidates: list[tuple[float | None, dict[str, torch.Tensor]]] = [(None, ones)]
    candidates += [(t, binary_masks(values, t)) for t in choice.thresholds]
    return sweep_points(model, candidates, semantics, held, steps, proxy)


def choose_threshold(points: list[Point], tolerance: float) -> float | None:
    """The largest swept threshold such that it, and every smaller one, keeps the held-out clean
    accuracy at least the unpruned accuracy minus ``tolerance``; None (prune nothing) if even
    the smallest does not. Reads nothing but the clean-data accuracy."""
    base = points[0].clean_data_accuracy
    assert base is not None
    chosen = None
    for point in points[1:]:
        assert point.clean_data_accuracy is not None
        if base - point.clean_data_accuracy > tolerance + 1e-12:
            break
        chosen = point.x
    return chosen


def choose_masks(model: nn.Module, values: dict[str, torch.Tensor], choice: Choice,
                 semantics: str, held: ImageData, steps: Steps, proxy: Proxy | None = None
                 ) -> tuple[str, MaskSet, Curve, dict[str, Any]]:
    """The pruning ``choice`` makes of learned ``values``: (variant name, masks, curve, notes).
    ``select="proxy"`` needs ``proxy``."""
    if (choice.select == "proxy") != (proxy is not None):
        raise ValueError("select='proxy' goes with a proxy, and only it")
    points = threshold_curve(model, values, choice, semantics, held, steps, proxy)
    total = sum(len(v) for v in values.values())
    threshold: float | None = None
    if choice.select == "count":
        count = round(choice.count * total) if choice.count < 1 else int(choice.count)
        if count > total:
            raise GoodnetError(f"cannot prune {count} channels: the masked layers have {total}")
        binary, name = lowest_masks(values, count), f"count={count}"
        notes: dict[str, Any] = {"count": count}
    else:
        if choice.select == "clean":
            threshold = choose_threshold(points, choice.max_drop)
        elif choice.select == "proxy":
            threshold = points[choose_by_proxy(points, choice.max_drop)].x
        else:
            threshold = choice.threshold
        if threshold is None:  # every threshold costs too much clean accuracy: prune nothing
            binary, name = {k: torch.ones_like(v) for k, v in values.items()}, "none"
        else:
            binary, name = binary_masks(values, threshold), f"t={threshold:.2f}"
        notes = {"threshold": threshold}
    marks = [i for i, p in enumerate(points) if p.x == threshold] if name != "none" else [0]
    if choice.select == "count" or not marks:  # a pruning off the sweep: measured on its own
        points += sweep_points(model, [(None, binary)], semantics, held, steps, proxy)
        points[-1] = dataclasses.replace(points[-1], label=name)
        marks = [len(points) - 1]
    notes["pruned_channels"] = {layer: torch.nonzero(m == 0).flatten().tolist()
                                for layer, m in binary.items() if (m == 0).any()}
    notes["mask_values"] = {layer: [round(float(v), 4) for v in value]
                            for layer, value in values.items()}
    curve = Curve("threshold", tuple(points), ((name, marks[0]),))
    return name, MaskSet(binary, semantics), curve, notes


C = TypeVar("C", bound=MaskSettings)


class MaskDefense(Defense[C]):
    """RNP and ANP: learn a mask per channel on part of the clean data (:meth:`learn`), choose
    the pruning on the held-out rest, return the masked copy of the model."""

    @abstractmethod
    def learn(self, model: nn.Module, data: ImageData, layers: list[str], progress: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Mask values in [0, 1] for ``layers``, learned on ``data``, and notes on how."""

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        layers = all_mask_points(model, clean, cfg.hidden_linear)
        learn, held = split_for_choice(clean, cfg.choice(), cfg.seed)
        values, learned_notes = self.learn(model, learn, layers, progress)
        proxy = reversed_proxy(model, learn, cfg.seed, progress) if cfg.select == "proxy" \
            else None
        name, masks, curve, notes = choose_masks(model, values, cfg.choice(), cfg.semantics,
                                                 held, steps, proxy)
        if proxy is not None:
            notes.update(proxy.notes())
        repaired: nn.Module = masked(model, masks)
        if cfg.recover_epochs > 0:
            recovered, curve, losses = recover_variants(model, {name: masks}, curve, learn, held,
                                                        cfg.recovery(), steps, progress)
            repaired = recovered[name]
            notes["recovery_loss"] = dict(losses)
        message = ""
        if name == "none" and proxy is not None:
            message = (f"{self.name} pruned nothing: no threshold within {100 * cfg.max_drop:g} "
                       "points of held-out clean accuracy lowered the reversed trigger's ASR "
                       f"(class {proxy.trigger.target}; see curve.png)")
        elif name == "none":
            message = (f"{self.name} pruned nothing: even its smallest threshold cost more than "
                       f"{100 * cfg.max_drop:g} points of held-out clean accuracy (see "
                       "curve.png; -p max_drop= to allow more)")
        return Repaired(
            model=repaired, curve=curve, masks=masks, variants={name: repaired},
            variant_masks={name: masks}, chosen=name, message=message,
            notes={"layers": layers, "held_out": len(held), **learned_notes, **notes},
        )
