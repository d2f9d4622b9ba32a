"""What every attack is: a trigger, a target mapping, and a poisoning policy.

An :class:`Attack` is built from its settings (a frozen dataclass) and the shape of the data it
will poison. ``attack.trigger(x)`` poisons a batch at test time; ``attack.target(y)`` says which
labels a successful backdoor produces; ``attack.eligible(y)`` says which test inputs count
towards the attack success rate; ``attack.poison(train, seed)`` returns a poisoned view of a
training set.

Attacks whose trigger is learned (TrojanNN's optimised patch, Input-aware's generator, the
low-frequency perturbation) or whose poisoning needs a model (label-consistent's adversarial
images) do that work in ``attack.fit(train, seed)``, which ``poison`` calls when needed. What
the test-time trigger needs afterwards is ``attack.state_dict()``: saved in the model file beside
the weights, so ``goodnet eval`` rebuilds exactly the trigger the model was trained with.

Most attacks aim one trigger at one target (or at the next class, all-to-all) and share the
defaults of :class:`SingleTargetAttack`. Multi-trigger attacks expose one :class:`Component` per
trigger; ASR is reported per component and as their mean.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from goodnet.attacks.poison import PoisonedData, PoisonGroup, choose_indices, fixed
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError

MODES = ("all-to-one", "all-to-all")
Trigger = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Component:
    """One trigger of an attack, with the labels it aims at and the inputs it is tested on."""

    name: str
    trigger: Trigger
    target: Callable[[torch.Tensor], torch.Tensor]
    eligible: Callable[[torch.Tensor], torch.Tensor]


class AttackSettings(Protocol):
    """What every attack's settings are: a dataclass (:meth:`Attack.describe` saves it)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


class SingleTargetSettings(AttackSettings, Protocol):
    """The settings :class:`SingleTargetAttack`'s defaults read."""

    @property
    def target(self) -> int: ...

    @property
    def mode(self) -> str: ...

    @property
    def poison_rate(self) -> float: ...


C = TypeVar("C", bound=AttackSettings)
S = TypeVar("S", bound=SingleTargetSettings)


class Attack(ABC, Generic[C]):
    """A backdoor attack bound to an image shape and a number of classes.

    Subclasses set ``name``, ``paper`` and ``Config`` (a frozen dataclass, the ``C`` they are
    parametrised by), build the test-time trigger in :meth:`build_trigger`, and say which labels
    the backdoor aims at (:meth:`target`, :meth:`eligible`) and which training items carry it
    (:meth:`poison_groups`). Clean-label attacks set ``clean_label = True``: they never change a
    label.

    ``quick`` holds settings (plain values, as ``make_attack`` takes them; empty: the defaults
    already are) under which the attack fits and poisons in seconds on the tests' toy data; the
    contract tests build every registered attack with them. They are for tests, not for results.
    """

    name: ClassVar[str]
    Config: ClassVar[type[Any]]
    quick: ClassVar[Mapping[str, Any]]
    paper: ClassVar[str]
    clean_label: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False

    def __init__(self, config: C, image_shape: tuple[int, int, int], num_classes: int) -> None:
        if not isinstance(config, self.Config):
            raise GoodnetError(f"{self.name} takes a {self.Config.__name__}, got {config!r}")
        self.config: C = config
        channels, height, width = image_shape
        self.image_shape = (channels, height, width)
        self.num_classes = num_classes
        self.fitted = not self.needs_fit
        self.validate()
        trigger = self.build_trigger()  # built even when unfitted, to check the settings
        self.trigger: Trigger = trigger if self.fitted else self._unfitted

    def _unfitted(self, _x: torch.Tensor) -> torch.Tensor:
        self.require_fitted()
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ settings
    def validate(self) -> None:
        """Refuse settings that cannot work (nothing is checked by default)."""

    def check_class(self, value: int, what: str) -> None:
        if not 0 <= value < self.num_classes:
            raise GoodnetError(
                f"{self.name}: {what} {value} is out of range [0, {self.num_classes - 1}]"
            )

    @abstractmethod
    def build_trigger(self) -> Trigger:
        """The callable that poisons a batch of images at test time."""

    # ------------------------------------------------------------------ targets
    @abstractmethod
    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels a successful backdoor turns inputs of class ``labels`` into."""

    @abstractmethod
    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Test inputs that count for the attack success rate."""

    def components(self) -> list[Component]:
        """The attack's triggers, each with its target mapping (one for most attacks)."""
        self.require_fitted()
        return [Component(self.name, self.trigger, self.target, self.eligible)]

    # ------------------------------------------------------------------ fitting and state
    def fit(self, train: ImageData, seed: int = 0, *, progress: bool = False) -> None:
        """Learn what the trigger or the poisoning needs from ``train`` (a no-op by default)."""
        self.check_data(train)
        self.fitted = True

    def require_fitted(self) -> None:
        if not self.fitted:
            raise GoodnetError(
                f"{self.name}: its trigger is learned; call fit() on training data, or load it "
                "from a model file that carries it"
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the test-time trigger needs beyond the settings (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (marks the attack fitted)."""
        if state:
            raise GoodnetError(f"{self.name} carries no learned state, got {sorted(state)}")
        self.fitted = True

    # ------------------------------------------------------------------ poisoning
    def poison(self, train: ImageData, seed: int = 0, *, progress: bool = False) -> PoisonedData:
        """A view of ``train`` carrying the backdoor (items drawn with ``seed``)."""
        self.check_data(train)
        if not self.fitted:
            self.fit(train, seed, progress=progress)
        generator = torch.Generator().manual_seed(seed)
        return PoisonedData(train, self.poison_groups(train, generator))

    @abstractmethod
    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        """The training items that carry the backdoor, drawn with ``generator``."""

    def training_transform(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """How poisoned training items are stamped (the test trigger, unless overridden)."""
        return fixed(self.trigger)

    def check_data(self, data: ImageData) -> None:
        if data.image_shape != self.image_shape or data.num_classes != self.num_classes:
            raise GoodnetError(
                f"{self.name} was set up for {self.num_classes} classes of "
                f"{self.image_shape} images, but {data.name} has {data.num_classes} classes "
                f"of {data.image_shape}"
            )

    def describe(self) -> dict[str, Any]:
        """Name and settings, for model cards (``make_attack`` rebuilds the attack from it)."""
        return {"name": self.name, "config": dataclasses.asdict(self.config)}


class SingleTargetAttack(Attack[S]):
    """An attack with one trigger aimed at ``target`` (all-to-one) or at the next class
    (all-to-all), poisoning ``poison_rate`` of the training set: the defaults most attacks
    keep."""

    def validate(self) -> None:
        """Refuse a mode, target class or poison rate that cannot work."""
        config = self.config
        if config.mode not in MODES:
            raise GoodnetError(f"{self.name}: mode must be one of {MODES}, got {config.mode!r}")
        if self.clean_label and config.mode != "all-to-one":
            raise GoodnetError(f"{self.name} is a clean-label attack: only all-to-one")
        self.check_class(config.target, "target class")
        if not 0 < config.poison_rate <= 1:
            raise GoodnetError(
                f"{self.name}: poison rate must be in (0, 1], got {config.poison_rate}"
            )

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels a successful backdoor turns inputs of class ``labels`` into."""
        if self.config.mode == "all-to-all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.config.target)

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Test inputs that count for the attack success rate: those not already of the target
        class (every input, for all-to-all)."""
        if self.config.mode == "all-to-all":
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != self.config.target

    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        """The default policy: ``poison_rate`` of the training set (of the target class, for a
        clean-label attack), drawn from eligible items, stamped and relabelled."""
        if self.clean_label:
            candidates = torch.nonzero(train.labels == self.config.target).flatten()
            count = round(self.config.poison_rate * len(candidates))
            return [PoisonGroup("poison", choose_indices(candidates, count, generator),
                                self.training_transform(), None)]
        candidates = torch.nonzero(self.eligible(train.labels)).flatten()
        count = round(self.config.poison_rate * len(train))
        return [PoisonGroup("poison", choose_indices(candidates, count, generator),
                            self.training_transform(), self.target)]
