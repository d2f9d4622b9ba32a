"""What the commands share: the one-line usage error, the data, clean-data and import options,
opening a model file of any format, the data a model takes, the defender's clean data.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.attacks import Attack, make_attack
from goodnet.data import DATASETS, ImageData, load_dataset
from goodnet.data.holdout import HoldOut, defender_clean, held_images
from goodnet.defenses.base import Defense
from goodnet.errors import GoodnetError
from goodnet.importers import ImportOptions, import_model, is_foreign
from goodnet.importers.own_class import class_args_from_text
from goodnet.methods import Method
from goodnet.model_files import load_model
from goodnet.models import ModelSpec, check_input
from goodnet.paths import require_regular_file
from goodnet.settings import pairs_to_dict

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# What ``parser.add_subparsers()`` returns: each command module's ``add_<command>`` adds its
# command to it.
Commands: TypeAlias = "argparse._SubParsersAction[ArgumentParser]"


def attack_from_args(name: str, pairs: Sequence[str], data: ImageData) -> Attack[Any]:
    return make_attack(name, pairs_to_dict(pairs, name), data.image_shape, data.num_classes,
                       text=True)


def import_options(args: argparse.Namespace) -> ImportOptions:
    """The options for model files that are not goodnet's own (:func:`add_keras_options`)."""
    return ImportOptions(arch=getattr(args, "keras_arch", None),
                         arch_args=class_args_from_text(getattr(args, "arch_args", [])),
                         input_shape=args.input_shape, mean=args.mean, std=args.std,
                         pixel_scale=getattr(args, "pixel_scale", None))


def open_model(args: argparse.Namespace) -> LoadedModel:
    """A goodnet model file, or a model file of another format (:mod:`goodnet.importers`: a
    Keras ``.h5``, ONNX file or PyTorch checkpoint) imported on the fly with the import
    options."""
    options = import_options(args)
    require_regular_file(args.model)  # a pipe or a device would block or read without end
    if is_foreign(args.model):
        return import_model(args.model, options)
    return load_model(args.model)


def data_for(spec: ModelSpec, name: str, split: str, root: Path | None) -> ImageData:
    """Data to feed a model of ``spec``: data at a path takes the model's class count (only
    labels outside it are refused), and the images must fit the model's input."""
    data = load_dataset(name, split, root, num_classes=spec.num_classes)
    check_input(spec, data)
    return data


def poisoned_from_args(args: argparse.Namespace, spec: ModelSpec) -> ImageData | None:
    if getattr(args, "poisoned", None) is None:
        return None
    return data_for(spec, args.poisoned, "test", None)


def clean_from_args(args: argparse.Namespace, card: ModelCard) -> tuple[ImageData, str | None]:
    """The defender's clean data for a model of ``card``: --clean-amount of a named data set's
    training split (or of the file or folder the model trained on), drawn from the images the
    model did not train on where its card says which; or any other file or folder, used whole.
    With it, None if the model is known not to have trained on those images, else why that is
    not known (:func:`goodnet.data.holdout.defender_clean`)."""
    amount = _amount(args.clean_amount)  # a bad amount fails before the data is read
    held = HoldOut.from_training(card.training, str(args.model))
    if args.clean in DATASETS:
        train = data_for(card.spec, args.clean, "train", args.data_root)
        return defender_clean(train, amount, args.clean_seed, held)
    data = data_for(card.spec, args.clean, "train", None)
    images, why = held_images(data, held)
    if images is None:
        return data, why
    return defender_clean(data, amount, args.clean_seed, held)


def _amount(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise GoodnetError(f"--clean-amount must be a fraction or a count, got {text!r}") \
            from None
    return int(value) if value >= 1 and value == int(value) else value


def describe_defense(defense: Defense[Any]) -> str:
    """A defense as the user would name it: ``fst``, ``sequence fst, nc``, with the settings
    that differ from its defaults as ``-p`` pairs (``fst -p distill=4.0``)."""
    steps = getattr(defense.config, "steps", None)
    name = f"{defense.name} {', '.join(steps)}" if steps else defense.name
    changed = [f"-p {f.name}={getattr(defense.config, f.name)}"
               for f in dataclasses.fields(defense.config)
               if f.name != "steps" and f.default is not dataclasses.MISSING
               and getattr(defense.config, f.name) != f.default]
    return " ".join([name, *changed])


def add_data_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--data", default=default, required=default is None,
                        help=f"data set name ({', '.join(DATASETS)}) or path")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding your own copy of a named data set")


def numbers(text: str, kind: type = float) -> tuple[Any, ...]:
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _shape(text: str) -> tuple[int, int, int]:
    shape = numbers(text, int)
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (three positive numbers), got {text!r}")
    return shape


def add_keras_options(parser: ArgumentParser) -> None:
    """Options for model files that are not goodnet's own: Keras .h5, ONNX and PyTorch
    checkpoints."""
    parser.add_argument("--arch", dest="keras_arch", default=None,
                        help="for a weights-only Keras .h5 or a PyTorch checkpoint: the "
                             "architecture to load it onto (deepid for the CSAW-HackML files); "
                             "for a checkpoint also your own network class, "
                             "package.module:Class (imported from your installed code and "
                             "built with the --arch-arg arguments; it runs your code, never "
                             "the file's)")
    parser.add_argument("--arch-arg", dest="arch_args", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="keyword argument for your own class's constructor, repeatable; "
                             "VALUE is a Python literal (10, 0.5, 'text', True, None, (3, 32, "
                             "32)), never run as code")
    parser.add_argument("--pixel-scale", dest="pixel_scale", type=float, default=None,
                        help="255 if the model takes raw pixels 0-255 (the default for Keras "
                             "files, as the CSAW-HackML lab's), 1 if it takes [0, 1] (the "
                             "default for PyTorch checkpoints and ONNX)")
    parser.add_argument("--input-shape", type=_shape, default=None,
                        help="for a PyTorch checkpoint: C,H,W of its input (default: its "
                             "channels at 32x32, 28x28 for greyscale); for ONNX, the sizes the "
                             "file leaves dynamic")
    parser.add_argument("--mean", type=numbers, default=None,
                        help="for a PyTorch checkpoint or ONNX: per-channel input mean it was "
                             "trained with, after --pixel-scale (default 0)")
    parser.add_argument("--std", type=numbers, default=None,
                        help="for a PyTorch checkpoint or ONNX: per-channel input std "
                             "(default 1)")


def add_clean_options(parser: argparse.ArgumentParser, note: str = "",
                      required: bool = False) -> None:
    """--clean, --clean-amount, --clean-seed and --data-root (read by :func:`clean_from_args`)."""
    parser.add_argument("--clean", default=None, required=required,
                        help="clean data: a data set name (--clean-amount of its training "
                             "split, from the images the model never saw where its card says "
                             "which) or a file or folder (used whole, unless the model trained "
                             f"on it){note}")
    parser.add_argument("--clean-amount", default="0.01",
                        help="fraction or count of the training split (default 0.01)")
    parser.add_argument("--clean-seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=None)


def methods_help(title: str, registry: Mapping[str, type]) -> str:
    """One line per method of ``registry``, for a command's help: its name and the first line
    of its docstring."""
    width = max(map(len, registry))
    lines = [f"  {name:<{width}}  {((cls.__doc__ or '').strip().splitlines() or [''])[0]}"
             for name, cls in registry.items()]
    return "\n".join([f"{title}; their settings and defaults: 'goodnet list'", *lines])


def data_free(registry: Mapping[str, type[Method[Any]]]) -> str:
    """The methods of ``registry`` that need no clean data, for a command's help."""
    return ", ".join(name for name, cls in registry.items() if not cls.needs_clean)

