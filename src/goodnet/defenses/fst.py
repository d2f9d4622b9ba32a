"""FST: Feature Shift Tuning (Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification
through Feature Shift Tuning", NeurIPS 2023, arXiv:2310.01875; reference code
AISafety-HKUST/stable_backdoor_purification ``fine_tune/ft.py``, ``--ft_mode fst``).

Plain fine-tuning on a little clean data leaves most backdoors in place: the features the
trigger excites keep the same meaning for the old classifier head. FST re-initialises the head
and fine-tunes the whole network with a penalty that pushes the new head away from the old one,
``loss = CE + alpha · <W, W_orig>`` (the raw inner product of the head's weight matrices), and
after every step scales ``W`` back to the Frobenius norm the original head had, so the penalty
can only turn the head, not shrink it. The features shift with the head, and the backdoor
features lose their hold.

Defaults, from the reference code and the paper's CIFAR-10 setting (§5.1): ``alpha`` 0.2 (the
code's default; the paper uses 0.2 for CIFAR-10, 0.1 for GTSRB, 0.001 for the 100- and
200-class sets), SGD with momentum 0.9 and no weight decay, lr 0.01, 10 epochs, batch 128; the
head's weight and bias are drawn uniformly in ±1/sqrt(fan_in) (PyTorch's ``nn.Linear`` bound, as
the reference draws them); the bias is not penalised or projected.

Departures, documented:

- **Which layer is the head.** The reference takes a layer name (``--linear_name``, "linear").
  goodnet takes ``head`` when given, and otherwise finds the last fully connected layer whose
  outputs are the model's outputs (``fc2`` of the small CNN, ``fc`` of ResNet-20, ``output`` of
  the lab's DeepID), so any network goodnet loads works.
- **Learning-rate schedule.** The reference steps a cosine schedule once per epoch; goodnet's
  one training loop anneals per step (:mod:`goodnet.train`). Both reach zero at the end.
- **No augmentation** (the reference crops and flips CIFAR images): the defender's data here is
  digits and clothes as often as natural images; ``augment`` in :mod:`goodnet.train` is there
  for a caller who wants it.
- **Randomness** comes from ``seed`` alone (the new head and the batch order), as everywhere in
  goodnet.

The curve holds the clean-data accuracy after each epoch (and, with an evaluation, test CA and
ASR for reporting); nothing is chosen from it: FST's result is the model after the last epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps, clean_or_blank
from goodnet.errors import GoodnetError
from goodnet.train import Hooks, TrainConfig, train


@dataclass(frozen=True)
class FSTConfig:
    """Settings of FST (defaults: the reference code's and the paper's CIFAR-10 setting).

    Attributes:
        alpha: weight of the penalty ``<W, W_orig>`` that turns the new head away from the old.
        epochs: fine-tuning epochs over the clean data.
        lr: SGD learning rate (momentum 0.9, no weight decay, cosine to zero).
        batch_size: fine-tuning batch size.
        head: the classifier layer to re-initialise; None: the last fully connected layer that
            produces the model's outputs.
        seed: fixes the new head and the batch order.
    """

    alpha: float = 0.2
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    head: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise GoodnetError("fst: alpha must be a finite number >= 0")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise GoodnetError("fst: epochs and batch size must be positive, lr > 0")


def find_head(model: nn.Module, example: torch.Tensor) -> str:
    """The name of the last fully connected layer whose output size is the model's."""
    with torch.no_grad():
        outputs = model.eval()(example).shape[-1]
    heads = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == outputs]
    if not heads:
        raise GoodnetError("fst: no fully connected layer produces the model's outputs; name "
                           "the classifier layer with -p head=")
    return heads[-1]


def reinitialise(layer: nn.Linear, generator: torch.Generator) -> None:
    """Weight and bias drawn uniformly in ±1/sqrt(fan_in), as ``nn.Linear`` and the reference."""
    bound = 1 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for parameter in (layer.weight, layer.bias):
            if parameter is not None:
                values = torch.rand(parameter.shape, generator=generator) * 2 * bound - bound
                parameter.copy_(values.to(parameter.device, parameter.dtype))


class FST(Defense[FSTConfig]):
    """Re-initialise the head and fine-tune, turning the head away from the backdoored one."""

    name = "fst"
    paper = "Min et al., NeurIPS 2023, arXiv:2310.01875"
    Config = FSTConfig

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        work = copy.deepcopy(model)
        name = cfg.head or find_head(work, clean_or_blank(work, clean))
        try:
            head = work.get_submodule(name)
        except AttributeError:
            raise GoodnetError(f"fst: the model has no layer {name!r}") from None
        if not isinstance(head, nn.Linear):
            raise GoodnetError(f"fst: {name!r} is not a fully connected layer")
        original = head.weight.detach().clone()
        norm = original.norm()
        reinitialise(head, torch.Generator().manual_seed(cfg.seed))
        points: list[Point] = [steps.measure(model, clean, 0, None)]

        def penalty(_x: torch.Tensor) -> torch.Tensor:
            return cfg.alpha * (head.weight * original).sum()

        def project() -> None:  # back to the original head's norm
            head.weight.mul_(norm / head.weight.norm().clamp_min(1e-12))

        def measure(epoch: int) -> None:
            points.append(steps.measure(work.eval(), clean, epoch, None))

        history = train(work, clean, TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=0.9,
            weight_decay=0.0, schedule="cosine", seed=cfg.seed), progress=progress,
            hooks=Hooks(penalty=penalty, after_step=project, after_epoch=measure))
        work.eval()
        curve = Curve("epoch", tuple(points), (("tuned", len(points) - 1),))
        return Repaired(model=work, curve=curve, variants={"tuned": work}, chosen="tuned",
                        notes={"head": name, "head_norm": float(norm),
                               "loss": [e.loss for e in history.epochs]})
