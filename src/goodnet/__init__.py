"""goodnet: turn a backdoored image classifier (a BadNet) into a trustworthy one (a GoodNet).

The registries (``MODELS``, ``ATTACKS``, ``DEFENSES``, ``DATASETS``, ``IMPORTERS``) are the
single list of what goodnet offers; the CLI, the benchmarks and the contract tests iterate over
them.
"""

from goodnet.artifacts import ModelCard, read_card, save_model
from goodnet.attacks import ATTACKS, Attack, make_attack
from goodnet.backdoor import attack_from_card
from goodnet.data import DATASETS, ImageData, load_dataset, split_clean
from goodnet.defenses import DEFENSES, Defense, RepairResult, make_defense
from goodnet.detector import GoodNet
from goodnet.errors import GoodnetError
from goodnet.importers import IMPORTERS, ImportOptions, import_model
from goodnet.metrics import Metrics, evaluate, predict
from goodnet.model_files import load_model
from goodnet.models import MODELS, ModelSpec, build_model, spec_for_data
from goodnet.scans import SCANNERS, ScanReport, make_scanner, scan
from goodnet.train import TrainConfig, train
from goodnet.version import __version__

__all__ = [
    "ATTACKS",
    "DATASETS",
    "DEFENSES",
    "IMPORTERS",
    "MODELS",
    "SCANNERS",
    "Attack",
    "Defense",
    "GoodNet",
    "GoodnetError",
    "ImageData",
    "ImportOptions",
    "Metrics",
    "ModelCard",
    "ModelSpec",
    "RepairResult",
    "ScanReport",
    "TrainConfig",
    "__version__",
    "attack_from_card",
    "build_model",
    "evaluate",
    "import_model",
    "load_dataset",
    "load_model",
    "make_attack",
    "make_defense",
    "make_scanner",
    "predict",
    "read_card",
    "save_model",
    "scan",
    "spec_for_data",
    "split_clean",
    "train",
]
