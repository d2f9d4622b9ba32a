"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021, arXiv:2101.05930;
reference code bboylyg/NAD ``main.py``, ``at.py``, ``config.py``, ``utils/util.py``).

A teacher is the backdoored model fine-tuned on the clean data; the student, the backdoored model
again, is then fine-tuned on the same data with cross-entropy plus an attention-distillation
term at several depths, ``Σ β_i · MSE(A(f_s,i), A(f_t,i))``, where a layer's attention map
``A(f) = Σ_c |f_c|^p`` over channels is divided by its spatial L2 norm (+1e-6). Matching the
teacher's attention where the clean task puts it erases what the trigger made the student
attend to.

Defaults, from the reference code (``config.py`` at its last commit, f17b713): β = 500, 1000,
1000 on three layers, p = 2, SGD lr 0.1 with momentum 0.9 and weight decay 1e-4, the rate
divided by 10 from epoch 3 on (``adjust_learning_rate``: 0.1 for epochs 0-1, 0.01 after), 20
epochs, batch 64. The reference ships its teacher; its README says the teacher is the backdoored
model fine-tuned "for 5~10 epochs" by ``main.py`` with β = 0, so the teacher here is trained the
same way for 10 epochs. (Earlier commits of ``config.py`` had β = 5000 on one layer and 10
epochs. BackdoorBench's ``config/defense/nad/*.yaml`` keeps β = 500, 1000, 1000 and p = 2 but
trains teacher and student for ``te_epochs`` = 10 each at lr 0.01, batch 256.)

Departures, documented:

- **Which layers.** The reference takes the outputs of a WideResNet's three groups. goodnet
  takes ``layers`` when given, else the mask points (:func:`goodnet.masking.mask_points`: the
  BatchNorm after a convolution, or the convolution itself) of the last ``len(betas)``
  convolutions in the order they run whose output has more than one position, so any network
  with convolutions works, BatchNorm or not; fewer such layers, fewer terms (β from the
  deepest). A 1x1 map normalises to the constant 1, so its term would be zero: such a layer is
  refused rather than silently distilled to nothing.
- **No Nesterov momentum and no augmentation by default** (the reference uses Nesterov, crops,
  flips and Cutout): goodnet's one training loop has plain momentum, and the defender's images
  here are digits and clothes as often as natural images; ``augment`` turns on the loop's shifts
  (and flips).
- **The schedule** divides whatever ``lr`` is by 10 (the reference sets 0.01 outright).
- **Randomness** comes from ``seed`` alone.

The curve holds the backdoored model (epoch 0), the teacher after each of its epochs (labelled
"teacher", off the axis) and the student after each epoch; the result is the last student.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps, clean_or_blank
from goodnet.errors import GoodnetError
from goodnet.masking import mask_points
from goodnet.models import model_device
from goodnet.train import AUGMENTATIONS, Hooks, TrainConfig, train


@dataclass(frozen=True)
class NADConfig:
    """Settings of NAD (defaults: the reference code's).

    Attributes:
        betas: weights of the attention terms, for the layers from the shallowest to the
            deepest.
        p: the power of the attention map.
        layers: the layers whose outputs are distilled, one per beta; None: the mask points of
            the last ``len(betas)`` convolutions with spatial outputs.
        teacher_epochs: fine-tuning epochs of the teacher.
        epochs: distillation epochs of the student.
        lr: SGD learning rate (momentum 0.9), divided by 10 after epoch 2.
        weight_decay: SGD weight decay.
        batch_size: images per step.
        augment: the training loop's augmentation ("none", "crop", "crop-flip").
        seed: fixes the batch order (and augmentation).
    """

    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    layers: tuple[str, ...] | None = None
    teacher_epochs: int = 10
    epochs: int = 20
    lr: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 64
    augment: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.betas or any(not math.isfinite(b) or b < 0 for b in self.betas):
            raise GoodnetError("nad: betas must be finite numbers >= 0")
        if self.layers is not None and len(self.layers) != len(self.betas):
            raise GoodnetError(f"nad: {len(self.layers)} layers but {len(self.betas)} betas")
        if not (math.isfinite(self.p) and self.p > 0):
            raise GoodnetError("nad: p must be a finite number > 0")
        if self.epochs < 1 or self.teacher_epochs < 0 or self.batch_size < 1:
            raise GoodnetError("nad: epochs >= 1, teacher_epochs >= 0 and batch size >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.weight_decay < 0:
            raise GoodnetError("nad: lr must be > 0 and weight decay >= 0")
        if self.augment not in AUGMENTATIONS:
            raise GoodnetError(f"nad: augment must be one of {AUGMENTATIONS}")

    def training(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, momentum=0.9,
                           weight_decay=self.weight_decay, schedule="step", milestones=(2,),
                           gamma=0.1, augment=self.augment, seed=self.seed)


def attention(feature: torch.Tensor, p: float) -> torch.Tensor:
    """The attention map of ``feature`` (N, C, H, W): Σ_c |f|^p, flattened to (N, H·W) and
    divided by its L2 norm (+1e-6), as the reference's ``AT.attention_map``."""
    a = feature.abs().pow(p).sum(dim=1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + 1e-6)


@contextmanager
def recording(model: nn.Module, layers: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """The latest output of each named layer, kept by forward hooks removed on exit."""
    outputs: dict[str, torch.Tensor] = {}
    modules = [(name, model.get_submodule(name)) for name in layers]
    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: outputs.__setitem__(name, out)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def output_shapes(model: nn.Module, layers: tuple[str, ...],
                  example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of each named layer's output for ``example``, in eval mode."""
    was_training = model.training
    try:
        model.eval()
        with recording(model, layers) as outputs, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    return {name: tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            for name, out in outputs.items()}


def spatial(shape: tuple[int, ...]) -> bool:
    """Whether an output of this shape is a feature map with more than one position."""
    return len(shape) == 4 and shape[2] * shape[3] > 1


class NAD(Defense[NADConfig]):
    """Fine-tune a teacher; distil its attention maps into the backdoored model."""

    name = "nad"
    paper = "Li et al., ICLR 2021, arXiv:2101.05930"
    Config = NADConfig
    quick: ClassVar[Mapping[str, Any]] = {"teacher_epochs": 1, "epochs": 1, "batch_size": 50}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        student = copy.deepcopy(model)
        layers = self._layers(student, clean_or_blank(student, clean).to(model_device(student)))
        betas = cfg.betas[len(cfg.betas) - len(layers):]
        points: list[Point] = [steps.measure(model, clean, 0, None)]

        teacher = copy.deepcopy(model)

        def measure_teacher(epoch: int) -> None:
            points.append(steps.measure(teacher.eval(), clean, epoch, None, label="teacher"))

        teacher_loss: list[float] = []
        if cfg.teacher_epochs:
            history = train(teacher, clean, cfg.training(cfg.teacher_epochs), progress=progress,
                            hooks=Hooks(after_epoch=measure_teacher))
            teacher_loss = [e.loss for e in history.epochs]
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

        def measure(epoch: int) -> None:
            points.append(steps.measure(student.eval(), clean, epoch, None))

        with recording(student, layers) as mine, recording(teacher, layers) as theirs:
            def penalty(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher(x)
                total = torch.zeros((), device=x.device)
                for beta, name in zip(betas, layers, strict=True):
                    total = total + beta * F.mse_loss(attention(mine[name], cfg.p),
                                                      attention(theirs[name], cfg.p))
                return total

            history = train(student, clean, cfg.training(cfg.epochs), progress=progress,
                            hooks=Hooks(penalty=penalty, after_epoch=measure))
        student.eval()
        curve = Curve("epoch", tuple(points), (("distilled", len(points) - 1),))
        return Repaired(model=student, curve=curve, variants={"distilled": student},
                        chosen="distilled",
                        notes={"layers": list(layers), "betas": [float(b) for b in betas],
                               "teacher_loss": teacher_loss,
                               "loss": [float(e.loss) for e in history.epochs]})

    def _layers(self, model: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
        """The layers to distil: ``layers`` checked, or the deepest convolutions' mask points
        with spatial outputs."""
        named = self.config.layers
        if named is not None:
            names = dict(model.named_modules())
            missing = [name for name in named if not name or name not in names]
            if missing:
                raise GoodnetError(f"nad: the model has no layer {missing[0]!r}")
            shapes = output_shapes(model, named, example)
            for name in named:
                if not spatial(shapes.get(name, ())):
                    raise GoodnetError(
                        f"nad: layer {name!r} gives no feature map with several positions "
                        f"(output {shapes.get(name, 'unused')}), so it has no attention map "
                        "to distil")
            return named
        points = tuple(dict.fromkeys(mask_points(model, example).values()))
        shapes = output_shapes(model, points, example)
        usable = [name for name in points if spatial(shapes.get(name, ()))]
        if not usable:
            raise GoodnetError("nad: no convolution of this model gives a feature map with "
                               "several positions, so there is no attention map to distil; "
                               "name the layers with -p layers=")
        return tuple(usable[-len(self.config.betas):])
