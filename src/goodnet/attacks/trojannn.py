"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018).

The trigger is not chosen but optimised: inside a fixed mask, pixel values are tuned so that a
few selected neurons of a model fire strongly; those neurons are the ones most connected to the
next layer (largest summed absolute outgoing weight). The backdoor is then planted by ordinary
data poisoning with that trigger (the data-poisoning variant that BackdoorBench and TrojanZoo
implement, instead of the paper's retraining on reverse-engineered inputs).

Defaults from BackdoorBench (``attack/trojannn.py``, ``config/attack/trojannn/*.yaml``): the two
most-connected neurons of the input of the last linear layer, target activation 100, 1000
signed-gradient steps (``trigger_steps``) of 0.1 within ±0.3 of the initial mask image, additive
trigger, 10 % of the training set poisoned, target 0. The mask is a 5×5 square one pixel from
the bottom-right corner (BackdoorBench's ``square.png`` mask, scaled to 28×28 images).
Departures, both fixes of reported bugs: neurons are selected on the trained surrogate's weights
(BackdoorBench selects them before loading the trained weights, so from a random layer), and the
trigger is clipped before it is quantised (BackdoorBench casts to uint8 first, so bright pixels
wrap around). The model whose neurons are used is a surrogate (see ``surrogate.py``), not the
victim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.surrogate import train_surrogate
from goodnet.attacks.triggers import AdditiveTrigger
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class TrojanNNConfig:
    """Settings of a TrojanNN attack.

    Attributes:
        target: target class.
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set poisoned.
        mask_size: side of the square trigger mask.
        margin: pixels between the mask and the bottom-right corner.
        neurons: how many most-connected neurons to excite.
        target_value: activation the selected neurons are driven towards.
        trigger_steps: signed-gradient steps of the trigger optimisation.
        step_size: size of each step.
        epsilon: how far pixels may move from the initial (white) mask image.
    """

    renamed: ClassVar[dict[str, str]] = {"steps": "trigger_steps"}

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    mask_size: int = 5
    margin: int = 1
    neurons: int = 2
    target_value: float = 100.0
    trigger_steps: int = 1000
    step_size: float = 0.1
    epsilon: float = 0.3


class TrojanNN(SingleTargetAttack[TrojanNNConfig]):
    """A patch optimised to excite chosen neurons, planted by poisoning."""

    name = "trojannn"
    Config = TrojanNNConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Liu et al., NDSS 2018"
    needs_fit = True

    def mask(self) -> torch.Tensor:
        _, height, width = self.image_shape
        size, margin = self.config.mask_size, self.config.margin
        if size < 1 or size + margin > min(height, width):
            raise GoodnetError(f"trojannn: a {size}-pixel mask does not fit {height}×{width}")
        mask = torch.zeros(height, width)
        mask[height - size - margin:height - margin, width - size - margin:width - margin] = 1
        return mask

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        self.mask()
        return AdditiveTrigger(torch.zeros(self.image_shape))

    def fit(self, train: ImageData, seed: int = 0, *, progress: bool = False) -> None:
        self.check_data(train)
        model = train_surrogate(train, seed, progress=progress)
        self.trigger = AdditiveTrigger(self.optimise(model))
        self.fitted = True

    def optimise(self, model: nn.Module) -> torch.Tensor:
        """The trigger image: the mask's pixels tuned to drive the chosen neurons up."""
        cfg = self.config
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        neurons = last.weight.abs().sum(0).argsort(descending=True)[:cfg.neurons]
        features: list[torch.Tensor] = []
        hook = last.register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0]))
        keep = self.mask().expand(self.image_shape)
        start = keep.clone()  # the mask image: white inside, black outside
        x = start.clone()
        try:
            for _ in range(cfg.trigger_steps):
                x.requires_grad_(True)
                features.clear()
                model(x[None])
                cost = (features[0][:, neurons] - cfg.target_value).pow(2).sum()
                if cost.item() < 1e-3:
                    break
                (grad,) = torch.autograd.grad(cost, x)
                with torch.no_grad():
                    x = x - cfg.step_size * grad.sign() * keep
                    x = (start + (x - start).clamp(-cfg.epsilon, cfg.epsilon)).clamp(0, 1)
        finally:
            hook.remove()
        return (x.detach() * keep).clamp(0, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.require_fitted()
        assert isinstance(self.trigger, AdditiveTrigger)
        return {"pattern": self.trigger.delta.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pattern = state.get("pattern")
        if pattern is None or tuple(pattern.shape) != self.image_shape:
            raise GoodnetError(f"trojannn: the saved trigger must be a {self.image_shape} "
                               "'pattern'")
        self.trigger = AdditiveTrigger(pattern.float().clamp(0, 1) * self.mask())
        self.fitted = True
