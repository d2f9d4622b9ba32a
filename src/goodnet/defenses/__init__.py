"""Repair methods, one module each, through the ``DEFENSES`` registry.

Every defense is built from its settings (``Defense(Config(...))``, or
``make_defense(name, settings)`` from plain values) and repairs with
``defense.repair(model, clean)``, returning a :class:`RepairResult`; the caller's model is never
modified. Adding a defense is one module (a :class:`Defense` subclass with its settings
dataclass and a ``run`` method) and one line here: the command line, the benchmark grids, the
reports and the contract tests all iterate over the registry.

Beside the registry, as in every registry package, ``DEFAULT_DEFENSE`` names what runs when the
user names no defense (``goodnet repair`` without ``--defense``): one defense and its settings,
the same for every model; :func:`recommended` builds it.
"""

from __future__ import annotations

from typing import Any

from goodnet.defenses.anp import ANP, ANPConfig
from goodnet.defenses.base import (
    Curve,
    Defense,
    Evaluation,
    Point,
    Repaired,
    RepairResult,
    ScanVerdict,
    Steps,
    Timings,
)
from goodnet.defenses.btidbf import BTIDBF, BTIDBFConfig
from goodnet.defenses.clp import CLP, CLPConfig
from goodnet.defenses.fine_pruning import FinePruning, FinePruningConfig
from goodnet.defenses.fst import FST, FSTConfig
from goodnet.defenses.ft_sam import FTSAM, FTSAMConfig
from goodnet.defenses.ibau import IBAU, IBAUConfig
from goodnet.defenses.mm_bm import MMBM, MMBMConfig
from goodnet.defenses.nad import NAD, NADConfig
from goodnet.defenses.nc import NCConfig, NeuralCleanse
from goodnet.defenses.prune import Prune, PruneConfig
from goodnet.defenses.registry import DEFENSES, defense_class, make_defense
from goodnet.defenses.rnp import RNP, RNPConfig
from goodnet.defenses.sau import SAU, SAUConfig
from goodnet.defenses.seam import SEAM, SEAMConfig
from goodnet.defenses.sequence import Sequence, SequenceConfig
from goodnet.defenses.sparse_fine_pruning import SparseFinePruning, SparseFinePruningConfig
from goodnet.defenses.unlearn import Unlearn, UnlearnConfig

# The dict lives in goodnet.defenses.registry, below the defenses, so that a sequence looks its
# steps up there without importing this package, which imports it.
DEFENSES.update({
    "prune": Prune,
    "fine-pruning": FinePruning,
    "sparse-fine-pruning": SparseFinePruning,
    "rnp": RNP,
    "anp": ANP,
    "clp": CLP,
    "fst": FST,
    "nc": NeuralCleanse,
    "unlearn": Unlearn,
    "btidbf": BTIDBF,
    "i-bau": IBAU,
    "sau": SAU,
    "ft-sam": FTSAM,
    "nad": NAD,
    "seam": SEAM,
    "mm-bm": MMBM,
    "sequence": Sequence,
})


# The repair ``goodnet repair`` runs without ``--defense`` (the recommended repair): a registered
# defense and its settings, chosen once, for every model, by the rule written in BENCHMARKS.md
# before the grid it was chosen from was run: "The second rule for the recommended repair"
# (issue 29; rows repaired on the zoo's seed 0) chose FST with distillation and a recovery
# phase ("fst-kd", the settings of benchmarks/recommend_29.yaml); it was Neural Cleanse ("nc")
# before.
DEFAULT_DEFENSE: tuple[str, dict[str, Any]] = (
    "fst", {"head_penalty": 1.0, "distill": 4.0, "temperature": 2.0, "recover_epochs": 30,
            "recover_lr": 0.01})
RECOMMENDED = DEFAULT_DEFENSE  # its name before the registries' defaults were named alike

# Above this many classes the rule's evidence (10-class models) does not reach, and fst-kd's
# settings fail: on the lab's 1283-class DeepID (logits of several hundred, no BatchNorm) its
# distillation diverges at its learning rate, and with the gradient held down its head penalty
# (the raw inner product with the old head) swamps the rest and the network answers at random
# (BENCHMARKS.md, "`fst-kd` on the lab's 1283-class DeepID"). FST's paper uses an α 1000
# times smaller for 100 and 200 classes. There the recommended repair stays Neural Cleanse,
# which pre-selects candidate classes (K-Arm) and runs on that network in about 5.5 minutes
# of one core.
MANY_CLASSES = 100
DEFAULT_DEFENSE_MANY_CLASSES: tuple[str, dict[str, Any]] = ("nc", {})


def default_defense(classes: int | None = None) -> tuple[str, dict[str, Any]]:
    """The recommended repair's registry name and settings for a model of ``classes`` classes
    (None: :data:`DEFAULT_DEFENSE`): :data:`DEFAULT_DEFENSE_MANY_CLASSES` above
    :data:`MANY_CLASSES`."""
    if classes is not None and classes > MANY_CLASSES:
        return DEFAULT_DEFENSE_MANY_CLASSES
    return DEFAULT_DEFENSE


def recommended(classes: int | None = None) -> Defense[Any]:
    """The recommended repair for a model of ``classes`` classes (:func:`default_defense`),
    built."""
    name, settings = default_defense(classes)
    return make_defense(name, settings)


__all__ = [
    "ANP",
    "BTIDBF",
    "CLP",
    "DEFAULT_DEFENSE",
    "DEFAULT_DEFENSE_MANY_CLASSES",
    "DEFENSES",
    "FST",
    "FTSAM",
    "IBAU",
    "MANY_CLASSES",
    "MMBM",
    "NAD",
    "RECOMMENDED",
    "RNP",
    "SAU",
    "SEAM",
    "ANPConfig",
    "BTIDBFConfig",
    "CLPConfig",
    "Curve",
    "Defense",
    "Evaluation",
    "FSTConfig",
    "FTSAMConfig",
    "FinePruning",
    "FinePruningConfig",
    "IBAUConfig",
    "MMBMConfig",
    "NADConfig",
    "NCConfig",
    "NeuralCleanse",
    "Point",
    "Prune",
    "PruneConfig",
    "RNPConfig",
    "RepairResult",
    "Repaired",
    "SAUConfig",
    "SEAMConfig",
    "ScanVerdict",
    "Sequence",
    "SequenceConfig",
    "SparseFinePruning",
    "SparseFinePruningConfig",
    "Steps",
    "Timings",
    "Unlearn",
    "UnlearnConfig",
    "default_defense",
    "defense_class",
    "make_defense",
    "recommended",
]
