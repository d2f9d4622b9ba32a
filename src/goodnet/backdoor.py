"""Train a model on (optionally poisoned) data and describe it: the recipe behind ``goodnet
attack``, the demo and the zoo.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from goodnet.artifacts import ModelCard
from goodnet.attacks import make_attack
from goodnet.attacks.base import Attack
from goodnet.data.dataset import BatchSource, ImageData
from goodnet.data.holdout import HoldOut, split_held_out
from goodnet.metrics import Metrics, evaluate
from goodnet.models import build_model, check_input, spec_for_data
from goodnet.train import TrainConfig, TrainHistory, train

ATTACK_STATE_PREFIX = "attack/"


@dataclass
class TrainedModel:
    """A trained (possibly backdoored) model, its card, training history and test metrics."""

    model: nn.Module
    card: ModelCard
    history: TrainHistory
    metrics: Metrics
    extras: dict[str, torch.Tensor]


def train_model(
    arch: str,
    train_data: ImageData,
    test_data: ImageData,
    config: TrainConfig,
    attack: Attack | None = None,
    *,
    hold_out: float | int = 0,
    progress: bool = False,
) -> TrainedModel:
    """Train ``arch`` on ``train_data`` (poisoned by ``attack`` if given) and evaluate it.

    The model's initial weights and the poisoned indices are drawn from ``config.seed``; the
    input normalisation is fitted to the clean training images. ``hold_out`` (a fraction or a
    count) of ``train_data`` is left out of training for the defender, drawn with the seed
    (:func:`goodnet.data.holdout.split_held_out`); the card's ``training["held_out"]`` says
    which.
    """
    full_data = train_data
    train_data, held = split_held_out(train_data, hold_out, config.seed)
    spec = spec_for_data(arch, train_data)
    check_input(spec, test_data)
    model = build_model(spec, seed=config.seed)
    start = time.perf_counter()
    source: BatchSource = train_data
    if attack is not None:
        source = attack.poison(train_data, seed=config.seed, progress=progress)
    prepared = time.perf_counter()
    history = train(model, source, config, progress=progress)
    seconds = time.perf_counter() - prepared
    metrics = evaluate(model, test_data, attack)
    card = ModelCard(
        spec=spec,
        attack=attack.describe() if attack is not None else None,
        metrics=dataclasses.asdict(metrics),
        training=_training_record(config, history, seconds, prepared - start, len(train_data),
                                  held),
        data=full_data.name,
        seed=config.seed,
    )
    extras = {}
    if attack is not None:
        extras = {ATTACK_STATE_PREFIX + k: v for k, v in attack.state_dict().items()}
    return TrainedModel(model, card, history, metrics, extras)


def _training_record(config: TrainConfig, history: TrainHistory, seconds: float,
                     attack_seconds: float, images: int, held: HoldOut | None
                     ) -> dict[str, Any]:
    """The card's ``training``: the settings, the times, the last loss and the images used."""
    return {
        "config": dataclasses.asdict(config),
        "seconds": seconds,
        "attack_seconds": attack_seconds,
        "seconds_per_epoch": [e.seconds for e in history.epochs],
        "final_loss": history.epochs[-1].loss if history.epochs else None,
        "images": images,
        **({"held_out": held.record()} if held is not None else {}),
    }


def attack_from_card(
    card: ModelCard, extras: dict[str, torch.Tensor], data: ImageData
) -> Attack | None:
    """The attack a saved model was trained with, learned trigger included (None if clean)."""
    if card.attack is None:
        return None
    state = {k[len(ATTACK_STATE_PREFIX):]: v for k, v in extras.items()
             if k.startswith(ATTACK_STATE_PREFIX)}
    return make_attack(card.attack["name"], card.attack.get("config"), data.image_shape,
                       data.num_classes, state=state, warn=False)
