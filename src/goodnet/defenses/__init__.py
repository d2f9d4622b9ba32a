"""Repair methods, one module each, through the ``DEFENSES`` registry.

Every defense is built from its settings (``Defense(Config(...))``) and repairs with
``defense.repair(model, clean)``, returning a :class:`RepairResult`; the caller's model is never
modified. Adding a defense is one module and one line here.
"""

from __future__ import annotations

from goodnet.defenses.anp import ANP, ANPConfig
from goodnet.defenses.base import Defense, Evaluation, RepairResult
from goodnet.defenses.clp import CLP, CLPConfig
from goodnet.defenses.fine_pruning import FinePruning, FinePruningConfig
from goodnet.defenses.prune import Prune, PruneConfig
from goodnet.defenses.rnp import RNP, RNPConfig
from goodnet.defenses.sparse_fine_pruning import SparseFinePruning, SparseFinePruningConfig

DEFENSES: dict[str, type[Defense]] = {
    "prune": Prune,
    "fine-pruning": FinePruning,
    "sparse-fine-pruning": SparseFinePruning,
    "rnp": RNP,
    "anp": ANP,
    "clp": CLP,
}

__all__ = ["ANP", "CLP", "DEFENSES", "RNP", "ANPConfig", "CLPConfig", "Defense", "Evaluation",
           "FinePruning", "FinePruningConfig", "Prune", "PruneConfig", "RNPConfig", "RepairResult",
           "SparseFinePruning", "SparseFinePruningConfig"]
