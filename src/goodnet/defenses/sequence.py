"""Two or more repairs one after the other: each registered defense, at its defaults or at the
settings the sequence gives it, repairs what the one before it returned.

Issue 16 allows the recommended repair to be "a documented sequence of two, such as a
fine-tuning defense followed by an unlearning one"; ``-p steps=fst,nc`` is that sequence, and the
benchmark grids run it like any other defense (``{sequence: {steps: [fst, nc]}}``). A step may
carry its own settings: ``{sequence: {steps: [fst, {nc: {unlearn_epochs: 2}}]}}`` in a grid,
``-p 'steps=[fst, {nc: {unlearn_epochs: 2}}]'`` on the command line. They are checked when the
sequence is built, as the defense's own would be (an unknown name is an error, an old name
warns), and a grid's cache key hashes every step's resolved settings.

- Every step chooses from the same clean data, and every model any step measures goes through
  the one :class:`Steps` of the whole repair, so an evaluation adds figures and changes nothing.
- The result is the last step's chosen model, with its variants, masks and curve. A step that
  fine-tunes a pruned model keeps its masks; the result then names them, and the last curve's
  points count the channels they prune. The earlier
  steps' curves, choices and notes are kept in ``notes["steps"]``, their messages joined.
- A scanning step's verdict (Neural Cleanse's) is the result's ``scan``, whichever step made it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Defense, Repaired, Steps
from goodnet.defenses.registry import DEFENSES
from goodnet.errors import GoodnetError
from goodnet.masking import Masked
from goodnet.settings import build_settings

Step = str | Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class SequenceConfig:
    """Settings of a sequence of repairs.

    Attributes:
        steps: the registered defenses to run, in order (at least two; a sequence cannot
            contain another sequence): each a name (the defense at its defaults) or a mapping of
            one name to that defense's settings.
    """

    steps: tuple[Step, ...] = ("fst", "nc")

    def __post_init__(self) -> None:
        if len(self.steps) < 2:
            raise GoodnetError("sequence: give at least two steps, e.g. steps=fst,nc")
        self.parts()  # every step's name and settings checked now

    def parts(self) -> list[tuple[str, Any]]:
        """Each step's name and settings: what the steps run with."""
        return [_part(step) for step in self.steps]


def _part(step: Step) -> tuple[str, Any]:
    """A step's defense name and its built settings."""
    settings: Mapping[str, Any] = {}
    if isinstance(step, str):
        name = step
    elif isinstance(step, Mapping) and len(step) == 1 and isinstance(
            next(iter(step.values())), Mapping):
        (name, settings), = step.items()
    else:
        raise GoodnetError(f"sequence: a step with settings is one defense's name and its "
                           f"settings ({{nc: {{unlearn_epochs: 2}}}}), got {step!r:.60}")
    if name == Sequence.name:
        raise GoodnetError("sequence: a step cannot be another sequence")
    if name not in DEFENSES:
        raise GoodnetError(f"sequence: unknown defense {name!r}; choose from "
                           f"{', '.join(n for n in DEFENSES if n != Sequence.name)}")
    return name, build_settings(DEFENSES[name].Config, settings, f"sequence step {name}")


class Sequence(Defense[SequenceConfig]):
    """Run registered defenses one after the other, each on the previous one's result."""

    name = "sequence"
    paper = "goodnet: registered defenses one after the other (issue 16)"
    Config = SequenceConfig
    quick: ClassVar[Mapping[str, Any]] = {"steps": ("prune", "fst")}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        defenses = [DEFENSES[name](config) for name, config in self.config.parts()]
        if clean is None and any(d.needs_clean for d in defenses):
            needy = next(d.name for d in defenses if d.needs_clean)
            raise GoodnetError(f"sequence: {needy} needs clean data")
        history: list[dict[str, Any]] = []
        messages: list[str] = []
        scan = None
        current = model
        out: Repaired | None = None
        for defense in defenses:
            # run, not repair: the outer repair has checked the data and times the whole;
            # every step measures through the same Steps.
            out = defense.run(current, clean, steps, progress)
            history.append({"defense": defense.name, "settings": defense.settings(),
                            "chosen": out.chosen, "curve_axis": out.curve.axis,
                            "curve": out.curve.records(), "notes": out.notes,
                            "message": out.message})
            if out.message:
                messages.append(out.message)
            if out.scan is not None:
                scan = out.scan
            current = out.model
        assert out is not None
        masks, pruned, curve = out.masks, out.pruned, out.curve
        if masks is None and isinstance(out.model, Masked):  # a later step kept the masks
            masks, pruned = out.model.masks, None
            count = sum(len(v) for v in masks.pruned().values())
            curve = dataclasses.replace(curve, points=tuple(
                p if p.pruned is not None else dataclasses.replace(p, pruned=count)
                for p in curve.points))
        return Repaired(
            model=out.model, curve=curve, masks=masks, variants=dict(out.variants),
            variant_masks=dict(out.variant_masks), chosen=out.chosen, pruned=pruned,
            scan=scan, message=" ".join(messages), notes={"steps": history})
