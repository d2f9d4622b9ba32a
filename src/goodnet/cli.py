"""The ``goodnet`` command: thin wrappers that parse arguments into settings and call the library.

Every error a user can cause ends in one line on stderr (``goodnet: error: ...``) and a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

import torch

from goodnet.artifacts import LoadedModel, ModelCard, check_writable, read_card, save_model
from goodnet.attacks import ATTACKS, Attack, make_attack
from goodnet.backdoor import attack_from_card, train_model
from goodnet.data import DATASETS, ImageData, load_dataset, split_clean
from goodnet.data.holdout import (
    DEFENDER_SHARE,
    HoldOut,
    defender_clean,
    forget_held_out,
    held_images,
)
from goodnet.defenses.base import Defense
from goodnet.demo import run_demo
from goodnet.detector import GoodNet
from goodnet.errors import GoodnetError
from goodnet.importers import ImportOptions, import_model, imported_as, is_foreign
from goodnet.importers.own_class import class_args_from_text
from goodnet.metrics import evaluate, metrics_table, percent
from goodnet.model_files import load_model
from goodnet.models import MODELS, ModelSpec, check_input, fixed_archs
from goodnet.paths import require_regular_file
from goodnet.settings import check_settings, pairs_to_dict
from goodnet.train import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, TrainConfig
from goodnet.version import __version__

log = logging.getLogger("goodnet")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------- settings from arguments


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        augment=args.augment, seed=args.seed,
    )


def attack_from_args(name: str, pairs: Sequence[str], data: ImageData) -> Attack[Any]:
    return make_attack(name, pairs_to_dict(pairs, name), data.image_shape, data.num_classes,
                       text=True)


def load_splits(name: str, test: str | None, root: Path | None) -> tuple[ImageData, ImageData]:
    """Training and test sets: a registry name gives both splits, a path needs ``--test``."""
    if name in DATASETS:
        return load_dataset(name, "train", root), load_dataset(test or name, "test", root)
    if test is None:
        raise GoodnetError(f"{name} is a file or folder: also give the test set with --test")
    return load_dataset(name, "train", root), load_dataset(test, "test", root)


# ---------------------------------------------------------------- commands


def cmd_attack(args: argparse.Namespace) -> int:
    return _cmd_train(args, attack_name=args.attack)


def cmd_train(args: argparse.Namespace) -> int:
    return _cmd_train(args, attack_name=None)


def _cmd_train(args: argparse.Namespace, attack_name: str | None) -> int:
    out = Path(args.out)
    # what can be checked without the data first: loading a large data set takes long
    if args.arch not in fixed_archs():  # the layer graph is imported, never trained anew
        raise GoodnetError(f"unknown architecture {args.arch!r}; choose from "
                           f"{sorted(fixed_archs())}")
    check_writable(out)
    train_data, test_data = load_splits(args.data, args.test, args.data_root)
    attack = attack_from_args(attack_name, args.param, train_data) if attack_name else None
    result = train_model(args.arch, train_data, test_data, train_config(args), attack,
                         hold_out=args.hold_out, progress=args.progress)
    save_model(out, result.model, result.card, extras=result.extras)
    held = result.card.training.get("held_out")
    if held is not None:
        print(f"held out {held['count']} of the {len(train_data)} training images for the "
              f"defender (the model never saw them; --clean {args.data} draws from them)")
    label = args.arch + (f" + {attack.name}" if attack else " (clean)")
    print(metrics_table([(label, result.metrics)]))
    print(f"saved {out}")
    return 0


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


def cmd_eval(args: argparse.Namespace) -> int:
    loaded = open_model(args)
    card = loaded.card
    test = data_for(card.spec, args.data, "test", args.data_root)
    attack = None
    if args.attack is not None:
        attack = attack_from_args(args.attack, args.param, test)
    else:
        attack = attack_from_card(card, loaded.extras, test)
    reject = card.spec.num_classes if card.kind == "goodnet" else None
    metrics = evaluate(loaded.model, test, attack, batch_size=args.batch_size,
                       reject_class=reject, poisoned=poisoned_from_args(args, card.spec))
    if args.json:
        print(json.dumps({"model": str(args.model), "data": test.name,
                          "attack": attack.describe() if attack else None,
                          **dataclasses.asdict(metrics)}, indent=2))
    else:
        label = f"{card.spec.arch}" + (f" vs {attack.name}" if attack else "")
        print(f"{args.model} on {test.name} ({metrics.n_clean} clean, "
              f"{metrics.n_poisoned} poisoned inputs)")
        print(metrics_table([(label, metrics)]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    require_regular_file(args.model)
    card = open_model(args).card if is_foreign(args.model) else read_card(args.model)
    print(json.dumps(json.loads(card.to_json()), indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    check_writable(Path(args.out))
    loaded = open_model(args)
    path = save_model(args.out, loaded.model, loaded.card)
    spec = loaded.card.spec
    print(f"imported {args.model} as {imported_as(loaded.card)} ({spec.num_classes} classes, input "
          f"{'×'.join(map(str, spec.input_shape))}, pixels ×{spec.pixel_scale:g}) into {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from goodnet.export import export_onnx

    check_writable(Path(args.out))
    loaded = open_model(args)
    path = export_onnx(loaded.model, loaded.card, args.out)
    print(f"exported {args.model} to {path} (input 'image', N×"
          f"{'×'.join(map(str, loaded.card.spec.input_shape))} in [0, 1]; output 'scores')")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("data sets:     " + ", ".join(DATASETS) + "  (or a path: .npz, .h5, IDX folder, "
          "CIFAR-10 folder, image folder)")
    print("architectures: " + ", ".join(MODELS))
    print("attacks:")
    for name, attack in ATTACKS.items():
        defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(attack.Config))
        print(f"  {name:<12} {attack.paper}\n  {'':<12} {defaults}")
    from goodnet.defenses import DEFENSES

    _list_methods("defenses:", DEFENSES, data_note=False)
    from goodnet.defenses import recommended

    print(f"recommended repair (goodnet repair without --defense): "
          f"{describe_defense(recommended())}")
    from goodnet.scans import SCANNERS

    _list_methods("scanners (goodnet scan):", SCANNERS)
    from goodnet.detector import DEFAULT_DETECTORS
    from goodnet.detectors import DETECTORS

    _list_methods("input detectors (goodnet repair --detect; also 'disagree', the lab's check):",
                  DETECTORS)
    print(f"default detectors (goodnet repair --detect with no names): "
          f"{', '.join(DEFAULT_DETECTORS)}")
    return 0


def _list_methods(title: str, registry: Mapping[str, Any], data_note: bool = True) -> None:
    """A registry's methods, each with its paper (and whether it needs clean data) and its
    settings' defaults."""
    print(title)
    for name, method in registry.items():
        defaults = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(method.Config))
        data = (" (clean data)" if method.needs_clean else " (data-free)") if data_note else ""
        print(f"  {name:<20} {method.paper}{data}\n  {'':<20} {defaults}")


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), data=args.data, arch=args.arch, epochs=args.epochs, seed=args.seed,
             data_root=args.data_root, progress=args.progress)
    return 0


# Options of ``goodnet repair`` that are defense settings of the same name.
DEFENSE_OPTIONS = ("layer", "rank_layer", "semantics", "max_drop", "max_drops")


def defense_from_args(args: argparse.Namespace) -> Defense[Any]:
    """The defense ``--defense`` names, its settings from ``-p key=value`` and the options of
    the same names (``--layer``, ``--max-drop``, ...)."""
    from goodnet.defenses import RECOMMENDED, defense_class, make_defense

    name, base = (args.defense, {}) if args.defense else RECOMMENDED
    cls = defense_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    settings = {**base, **check_settings(cls.Config, pairs_to_dict(args.param, name), name,
                                         text=True)}
    options = {key: getattr(args, key) for key in DEFENSE_OPTIONS
               if getattr(args, key) is not None}
    drops = options.get("max_drop")
    if drops is not None and len(drops) > 1:  # the old spelling of --max-drops
        warnings.warn("--max-drop with several budgets is now --max-drops; the old form will "
                      "be removed in a later version", FutureWarning, stacklevel=1)
        options["max_drops"] = options.pop("max_drop")
    elif drops is not None:
        options["max_drop"] = drops[0]
        if "max_drops" in fields and "max_drops" not in options:
            options["max_drops"] = drops  # one budget given: the only one (prune)
    for key, value in options.items():
        if key not in fields:
            raise GoodnetError(f"{name} has no --{key.replace('_', '-')} setting")
        settings[key] = value
    return make_defense(name, settings)


def describe_defense(defense: Defense[Any]) -> str:
    """A defense as the user would name it: ``fst``, or ``sequence fst, nc``."""
    steps = getattr(defense.config, "steps", None)
    return f"{defense.name} {', '.join(steps)}" if steps else defense.name


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


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--confidence must lie in (0, 1), got {text!r}")
    return value


def _hold_out(text: str) -> float | int:
    """--hold-out: 0, a fraction in (0, 1) or a count."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0:
        return 0
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(f"--hold-out takes 0, a fraction in (0, 1) or a count, "
                                     f"got {text!r}")


def _amount(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise GoodnetError(f"--clean-amount must be a fraction or a count, got {text!r}") \
            from None
    return int(value) if value >= 1 and value == int(value) else value


def detect_from_args(args: argparse.Namespace) -> tuple[list[str], bool]:
    """``--detect``: the detectors a GoodNet calibrates, and whether it keeps the lab's
    disagreement check (on without ``--detect``, and where ``--detect`` names it)."""
    from goodnet.detector import DEFAULT_DETECTORS, DISAGREE
    from goodnet.detectors import DETECTORS

    if args.detect is None:
        return [], True
    text = ",".join(DEFAULT_DETECTORS) if args.detect == "default" else args.detect
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name != DISAGREE and name not in DETECTORS:
            raise GoodnetError(f"unknown detector {name!r} for --detect; choose from "
                               f"{', '.join([*DETECTORS, DISAGREE])}")
    if not names or len(set(names)) != len(names):
        raise GoodnetError(f"--detect takes distinct detector names, got {args.detect!r}")
    if not 0 < args.false_alarm < 1:
        raise GoodnetError(f"--false-alarm must lie in (0, 1), got {args.false_alarm:g}")
    return [n for n in names if n != DISAGREE], DISAGREE in names


def calibration_from_args(args: argparse.Namespace, clean: ImageData, detectors: list[str]
                          ) -> tuple[ImageData, ImageData]:
    """(the calibration images of ``--detect``, the clean images the detectors fit on): the
    calibration images are split off ``clean`` (stratified, ``--clean-seed``). The repair
    uses both: it does not touch the original model, whose scores the detectors calibrate."""
    from goodnet.detector import calibration_size

    needed = calibration_size(len(detectors), args.false_alarm, args.confidence)
    size = args.calibration if args.calibration is not None else needed
    if size < needed:
        raise GoodnetError(f"--calibration {size} cannot calibrate {len(detectors)} "
                           f"detector(s) at a false-alarm rate of {args.false_alarm:g} with "
                           f"{args.confidence:g} confidence: it takes at least {needed} clean "
                           "images")
    if size > len(clean) // 2:
        raise GoodnetError(f"calibrating {len(detectors)} detector(s) at a false-alarm rate of "
                           f"{args.false_alarm:g} takes {size} clean images, more than half of "
                           f"the {len(clean)} given: give more clean data (--clean-amount), a "
                           "larger --false-alarm or fewer detectors")
    calibration, rest = split_clean(clean, size, seed=args.clean_seed)
    return calibration, rest


def cmd_repair(args: argparse.Namespace) -> int:
    from goodnet.masking import get_layer
    from goodnet.workflow import repair_and_measure, write_repair

    defense = defense_from_args(args)
    detectors, disagree = detect_from_args(args)
    loaded = open_model(args)
    spec = loaded.card.spec
    if args.layer is not None:
        get_layer(loaded.model, args.layer)  # a typo fails now, not after loading the data
    if args.rank_layer is not None:
        try:
            loaded.model.get_submodule(args.rank_layer)  # any layer can rank, pools included
        except AttributeError:
            raise GoodnetError(f"the model has no layer {args.rank_layer!r} to rank on") \
                from None
    if args.clean is None and defense.needs_clean:
        raise GoodnetError(f"{defense.name} needs clean data: give --clean")
    if args.clean is None and detectors:
        raise GoodnetError("--detect calibrates on clean data: give --clean")
    clean, caveat = clean_from_args(args, loaded.card) if args.clean is not None else (None, None)
    calibration = fit = None
    if detectors:
        assert clean is not None
        calibration, fit = calibration_from_args(args, clean, detectors)
    check_writable(Path(args.out) / "repair.json")
    screens: list = []
    if calibration is not None:
        from goodnet.detector import calibrated_screens

        if caveat is not None:
            warnings.warn(f"{args.model} may have trained on the clean images ({caveat}): "
                          "if it did, the detectors' false-alarm rate on new inputs can exceed "
                          "--false-alarm", UserWarning, stacklevel=1)
        screens = calibrated_screens(loaded.model, {name: {} for name in detectors}, fit,
                                     calibration, args.false_alarm, args.confidence)
    test = None
    test_name = args.test or (args.clean if args.clean in DATASETS else None)
    if test_name is not None:
        test = data_for(spec, test_name, "test", args.data_root)
    poisoned = poisoned_from_args(args, spec)
    if poisoned is not None and test is None:
        raise GoodnetError("--poisoned needs clean test data too: give --test")
    attack = attack_from_card(loaded.card, loaded.extras, test) if test is not None else None
    report = repair_and_measure(
        loaded.model, defense, clean, test, attack, curve_limit=args.curve_limit,
        progress=args.progress, poisoned=poisoned, num_classes=spec.num_classes,
        screens=screens, disagree=disagree)
    written = write_repair(Path(args.out), report, loaded.model, loaded.card, screens, disagree)
    source = f"{len(clean)} clean images ({clean.name})" if clean is not None else "no data"
    what = defense.name if args.defense else f"the recommended repair ({describe_defense(defense)})"
    print(f"{what} on {args.model}: {source}, {report.result.seconds:.1f} s")
    if screens:
        checks = ", ".join(f"{s.detector} (threshold {s.threshold:.4g}, {100 * s.false_alarm:g} %)"
                           for s, _ in screens)
        lab = " and the models' disagreement" if disagree else ""
        print(f"GoodNet checks: {checks}{lab}; calibrated on {screens[0][0].calibration_images} "
              f"clean images, the rate held with {args.confidence:g} confidence")
    if report.result.message:
        print(report.result.message)
    if test is not None:
        print(metrics_table(report.rows()))
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from goodnet.scan_output import check_out, pictured_classes, scores_name, write_scan
    from goodnet.scans import default_scanner, make_scanner, scanner_class

    if args.scanner is not None:
        scanner_class(args.scanner)  # a typo fails now, not after loading the data
    loaded = open_model(args)
    out = Path(args.out)
    check_out(out)
    clean = clean_from_args(args, loaded.card)[0] if args.clean is not None else None
    name = args.scanner or default_scanner(clean)
    scanner = make_scanner(name, pairs_to_dict(args.param, name), text=True)
    if scanner.needs_clean and clean is None:
        raise GoodnetError(f"{name} needs clean data: give --clean")
    report = scanner.scan(loaded.model, clean, progress=args.progress)
    written = write_scan(report, out, clean, args.model.name, model=loaded.model)
    verdict = report.verdict
    source = (f"{report.clean_images} clean images ({clean.name})" if report.clean_images
              and clean is not None else "no data")
    print(f"{name} scan of {args.model}: {report.classes} classes, {source}, "
          f"{report.seconds:.1f} s")
    relation = ">" if verdict.backdoored else "<="
    print(f"verdict: {'BACKDOORED' if verdict.backdoored else 'no backdoor found'} "
          f"({report.score_name} {verdict.score:.2f} {relation} threshold "
          f"{verdict.threshold:g})")
    if verdict.targets:
        plural = "es" if len(verdict.targets) > 1 else ""
        print(f"suspected target class{plural}: {', '.join(map(str, verdict.targets))}")
    per_class = scores_name(report)
    for k, flagged in pictured_classes(report):
        # a class can rank first and stay under the threshold (the target, or a natural class
        # of a clean model; BENCHMARKS.md "Scanning the zoo"): say which, so it can be checked
        if not flagged:
            print(f"most suspicious class, not flagged: {k} ({per_class} "
                  f"{verdict.scores[k]:.2f})")
    for k in verdict.targets:
        if k < len(verdict.triggers):
            trigger = verdict.triggers[k]
            print(f"  class {k}: {per_class} {verdict.scores[k]:.2f}, reversed trigger's mask "
                  f"norm {trigger.norm:.1f}, success {100 * trigger.success:.1f} %")
        elif k < len(verdict.scores):
            print(f"  class {k}: {per_class} {verdict.scores[k]:.2f}")
    print(f"wrote {len(written)} files to {out} (open {out / 'scan.html'})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train any model goodnet opens some more on clean data (the report's
    ``continue_training``); a repaired model's masks stay fixed while its weights train."""
    from goodnet.train import train

    if args.epochs < 1:
        raise GoodnetError(f"--epochs must be at least 1, got {args.epochs}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=args.seed)
    loaded = open_model(args)
    card = loaded.card
    if card.kind == "goodnet":
        raise GoodnetError(f"{args.model} is a GoodNet (two models and a reject class); "
                           "fine-tune its repaired model instead")
    clean, _ = clean_from_args(args, card)
    test = data_for(card.spec, args.test, "test", args.data_root) if args.test else None
    out = Path(args.out)
    check_writable(out)
    attack = attack_from_card(card, loaded.extras, test) if test is not None else None
    before = evaluate(loaded.model, test, attack) if test is not None else None
    model = copy.deepcopy(loaded.model)  # a Masked copy keeps its masks, fixed (not parameters)
    history = train(model, clean, config, progress=args.progress)
    model.eval()
    after = evaluate(model, test, attack) if test is not None else None
    notes = {**card.notes, "finetune": {
        "config": dataclasses.asdict(config), "data": clean.name, "size": len(clean),
        "seconds": history.seconds, "final_loss": history.epochs[-1].loss}}
    # Figures measured before fine-tuning no longer describe the model: keep only new ones.
    new_card = dataclasses.replace(
        card, notes=notes, goodnet_version=__version__, training=forget_held_out(card.training),
        metrics=dataclasses.asdict(after) if after is not None else {})
    # Masks are saved from the model itself; the rest (an attack's learned trigger) is kept.
    extras = {k: v for k, v in loaded.extras.items() if not k.startswith("mask/")}
    save_model(out, model, new_card, extras=extras)
    print(f"fine-tuned {args.model} on {len(clean)} clean images ({clean.name}), "
          f"{config.epochs} epochs, {history.seconds:.1f} s")
    if before is not None and after is not None:
        label = card.spec.arch + (f" vs {attack.name}" if attack else "")
        print(metrics_table([(f"{label} before", before), (f"{label} after", after)]))
    print(f"saved {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from goodnet.data.images import read_image

    loaded = open_model(args)
    spec = loaded.card.spec
    images = torch.stack([read_image(path, spec.input_shape) for path in args.images])
    with torch.no_grad():
        classes = loaded.model(images).argmax(1).tolist()
        scores = loaded.model.scores(images) if isinstance(loaded.model, GoodNet) else {}
    if scores:
        print("image\tclass\t" + "\t".join(scores))
    for i, (path, label) in enumerate(zip(args.images, classes, strict=True)):
        extra = "".join(f"\t{float(s[i]):.4g}" for s in scores.values())
        print(f"{path}\t{label}{extra}")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from goodnet.zoo import build_zoo, grid, zoo_table

    cells = grid(args.attacks, args.data, args.arch, args.seeds)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    built = skipped = 0
    for cell, card, seconds in build_zoo(args.root, cells, config, progress=args.progress):
        if card is None:
            skipped += 1
            continue
        built += 1
        m = card.metrics
        print(f"{cell.data:<14} {cell.arch:<10} {cell.attack:<17} seed {cell.seed}: "
              f"CA {percent(m['clean_accuracy'])}  ASR {percent(m['attack_success_rate'])}  "
              f"({seconds:.0f} s)", flush=True)
    print(f"built {built}, already there {skipped}; {args.root}")
    if built + skipped:
        print(zoo_table(args.root))
    return 0


def cmd_zoo_table(args: argparse.Namespace) -> int:
    from goodnet.zoo import zoo_table

    print(zoo_table(args.root))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from goodnet.bench import load_grid, make_executor, run_grid, write_report

    grid = load_grid(args.grid)
    out = args.out or Path("runs") / grid.name
    executor = make_executor(args.executor, args.workers, args.address, grid.threads)
    summary = run_grid(grid, out, executor, progress=args.progress)
    print(f"{grid.name}: {summary.cells} cells: {summary.done} run, {summary.skipped} already "
          f"done, {summary.failed} failed; {summary.models_built} models built; "
          f"{summary.seconds / 60:.1f} min")
    for failure in summary.failures:
        print(f"  failed: {failure}")
    print(f"results: {out / 'results.jsonl'}")
    if not args.no_report:
        written = write_report(out / "results.jsonl", out / "report", title=grid.name,
                               keys={cell.key for cell in grid.cells()})
        print(f"report: {written[-1]}")
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from goodnet.bench import write_report

    results = Path(args.results)
    out = args.out or (results if results.is_dir() else results.parent) / "report"
    for path in write_report(results, out, tolerance=args.tolerance / 100, title=args.title):
        print(path)
    return 0


# ---------------------------------------------------------------- parser


def add_training_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--momentum", type=float, default=defaults.momentum)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    group.add_argument("--augment", choices=AUGMENTATIONS, default=defaults.augment)


def add_data_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--data", default=default, required=default is None,
                        help=f"data set name ({', '.join(DATASETS)}) or path")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding your own copy of a named data set")


def _numbers(text: str, kind: type = float) -> tuple[Any, ...]:
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _shape(text: str) -> tuple[int, int, int]:
    shape = _numbers(text, int)
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
    parser.add_argument("--mean", type=_numbers, default=None,
                        help="for a PyTorch checkpoint or ONNX: per-channel input mean it was "
                             "trained with, after --pixel-scale (default 0)")
    parser.add_argument("--std", type=_numbers, default=None,
                        help="for a PyTorch checkpoint or ONNX: per-channel input std "
                             "(default 1)")


def methods_help(title: str, registry: Mapping[str, type]) -> str:
    """One line per method of ``registry``, for a command's help: its name and the first line
    of its docstring."""
    width = max(map(len, registry))
    lines = [f"  {name:<{width}}  {((cls.__doc__ or '').strip().splitlines() or [''])[0]}"
             for name, cls in registry.items()]
    return "\n".join([f"{title}; their settings and defaults: 'goodnet list'", *lines])


# What ``parser.add_subparsers()`` returns: each ``_add_<command>`` adds its command to it.
Commands: TypeAlias = "argparse._SubParsersAction[ArgumentParser]"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="goodnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"goodnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--progress", dest="progress", action="store_true",
                        default=sys.stderr.isatty(),
                        help="progress bars (default: on when stderr is a terminal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in (_add_demo, _add_attack, _add_train, _add_eval, _add_zoo, _add_bench,
                _add_report, _add_scan, _add_repair, _add_finetune, _add_predict, _add_info,
                _add_import, _add_export, _add_list):
        add(sub)
    return parser


def _add_demo(sub: Commands) -> None:
    demo = sub.add_parser("demo", help="train a BadNet on MNIST, repair it, compare")
    add_data_options(demo, "mnist")
    demo.add_argument("--arch", default="small_cnn", choices=sorted(fixed_archs()))
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's models")
    demo.set_defaults(func=cmd_demo)


def _add_training_command(command: argparse.ArgumentParser) -> None:
    """The options ``goodnet attack`` and ``goodnet train`` share."""
    add_data_options(command, "mnist")
    command.add_argument("--test", default=None, help="test set (when --data is a path)")
    command.add_argument("--arch", default="small_cnn")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--out", required=True, help="model file to write (.safetensors)")
    command.add_argument("--hold-out", dest="hold_out", type=_hold_out, default=DEFENDER_SHARE,
                         help="fraction or count of the training split left out of training "
                              "for the defender: --clean with the same data set later draws "
                              "from these images, which the model never saw (default "
                              f"{DEFENDER_SHARE:g}; 0 trains on all)")
    add_training_options(command, epochs=2)


def _add_attack(sub: Commands) -> None:
    attack = sub.add_parser("attack", help="train a backdoored model and save it",
                            epilog=methods_help("attacks for --attack", ATTACKS),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_training_command(attack)
    attack.add_argument("--attack", default="badnets", help="the attack (listed below)")
    attack.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="attack setting, repeatable (see 'goodnet list')")
    attack.set_defaults(func=cmd_attack)


def _add_train(sub: Commands) -> None:
    clean = sub.add_parser("train", help="train a clean model (a baseline) and save it")
    _add_training_command(clean)
    clean.set_defaults(func=cmd_train, param=[])


def _add_eval(sub: Commands) -> None:
    ev = sub.add_parser("eval", help="CA, ASR and RA of a saved model")
    ev.add_argument("model", type=Path)
    add_data_options(ev, "mnist")
    ev.add_argument("--attack", default=None,
                    help="attack to evaluate against (default: the one in the model card)")
    ev.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--poisoned", default=None,
                    help="already-poisoned test images labelled with their targets (the "
                         "CSAW-HackML bd_test.h5 layout)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    add_keras_options(ev)
    ev.set_defaults(func=cmd_eval)


def _add_zoo(sub: Commands) -> None:
    zoo = sub.add_parser("zoo", help="build and tabulate a zoo of backdoored models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=ArgumentParser)
    build = zoo_sub.add_parser("build", help="train every missing model of the grid")
    build.add_argument("--root", type=Path, default=Path("zoo"), help="zoo folder")
    build.add_argument("--attacks", nargs="+", default=None,
                       help="attacks (default: every attack, plus clean models)")
    build.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    build.add_argument("--arch", nargs="+", default=["small_cnn", "resnet20"])
    build.add_argument("--seeds", nargs="+", type=int, default=[0])
    build.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    build.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    build.add_argument("--lr", type=float, default=TrainConfig().lr)
    build.set_defaults(func=cmd_zoo_build)
    table = zoo_sub.add_parser("table", help="the zoo as a Markdown table")
    table.add_argument("--root", type=Path, default=Path("zoo"))
    table.set_defaults(func=cmd_zoo_table)


def _add_bench(sub: Commands) -> None:
    bench = sub.add_parser("bench", help="run a benchmark grid (attacks × defenses × data × "
                                         "architectures × seeds), resumably, and report it")
    bench.add_argument("grid", type=Path, help="grid file (YAML), e.g. benchmarks/smoke.yaml")
    bench.add_argument("--out", type=Path, default=None,
                       help="results folder (default: runs/<grid name>)")
    bench.add_argument("--executor", default="local", choices=["local", "ray"])
    bench.add_argument("--workers", type=int, default=0,
                       help="local: processes (0: run in this process); ray: CPUs of the local "
                            "instance started when no --address is given")
    bench.add_argument("--address", default=None, help="ray: address of a running cluster")
    bench.add_argument("--no-report", action="store_true", help="skip writing the report")
    bench.set_defaults(func=cmd_bench)


def _add_report(sub: Commands) -> None:
    rep = sub.add_parser("report", help="tables, CSV, plots and an HTML page from bench results")
    rep.add_argument("results", type=Path, help="results.jsonl, or the folder holding it")
    rep.add_argument("--out", type=Path, default=None, help="default: report/ beside results")
    rep.add_argument("--tolerance", type=float, default=2.0,
                     help="CA points a defense may lose and still be marked best (default 2)")
    rep.add_argument("--title", default=None)
    rep.set_defaults(func=cmd_report)


def _add_scan(sub: Commands) -> None:
    from goodnet.scans import SCANNERS

    scan = sub.add_parser("scan", help="is a model backdoored? the verdict, the suspected "
                                       "target class and its reversed trigger; writes "
                                       "scan.json, pictures and scan.html",
                          epilog=methods_help("scanners for --scanner", SCANNERS),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    scan.add_argument("model", type=Path)
    scan.add_argument("--scanner", default=None,
                      help="the scanner (listed below); default: nc with --clean, the "
                           "data-free mm-bd without")
    add_clean_options(scan, "; not needed by a data-free scanner")
    scan.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                      help="scanner setting, repeatable (see 'goodnet list')")
    scan.add_argument("--out", required=True,
                      help="output folder (made at the end; files of the same names in an "
                           "existing folder are replaced)")
    add_keras_options(scan)
    scan.set_defaults(func=cmd_scan)


def _add_repair(sub: Commands) -> None:
    from goodnet.defenses import DEFENSES

    repair = sub.add_parser("repair", help="repair a backdoored model; write the repaired "
                                           "models, GoodNets, curve and plots",
                            epilog=methods_help("defenses for --defense", DEFENSES),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    repair.add_argument("model", type=Path)
    repair.add_argument("--defense", help="the defense (listed below); without it, the "
                        "recommended repair (BENCHMARKS.md, 'The recommended repair')")
    add_clean_options(repair, "; not needed by the data-free clp")
    repair.add_argument("--test", default=None,
                        help="test data for the figures (default: the test split of --clean)")
    repair.add_argument("--layer", default=None, help="layer to prune (default: last conv)")
    repair.add_argument("--rank-layer", dest="rank_layer", default=None,
                        help="layer whose activations rank the channels")
    repair.add_argument("--semantics", choices=["channel", "keep-bias"], default=None)
    repair.add_argument("--max-drop", dest="max_drop", type=_numbers, default=None,
                        help="the accuracy-drop budget whose model is the result, e.g. 0.04")
    repair.add_argument("--max-drops", dest="max_drops", type=_numbers, default=None,
                        help="prune: every accuracy-drop budget to write a model for, e.g. "
                             "0.02,0.04,0.10,0.30")
    repair.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="defense setting, repeatable")
    repair.add_argument("--curve-limit", type=int, default=2000,
                        help="test images measured at each step of the curve")
    repair.add_argument("--poisoned", default=None,
                        help="already-poisoned test images labelled with their targets (the "
                             "CSAW-HackML bd_test.h5 layout), for the figures")
    repair.add_argument("--detect", default=None, metavar="NAMES", nargs="?", const="default",
                        help="the GoodNet's checks, comma-separated: input detectors ("
                             "mahalanobis, strip, scale-up, teco) calibrated on clean images "
                             "held out from the repair, and 'disagree' (the lab's: the original "
                             "and repaired models disagree); --detect alone (after the model): "
                             "the default set (BENCHMARKS.md); without --detect: disagree "
                             "alone")
    repair.add_argument("--false-alarm", dest="false_alarm", type=float, default=0.01,
                        help="with --detect: the share of clean inputs the detectors together "
                             "may answer N (default 0.01)")
    repair.add_argument("--confidence", type=_confidence, default=0.95,
                        help="with --detect: the chance, over calibration sets, that the "
                             "false-alarm rate on new clean inputs stays within --false-alarm "
                             "(default 0.95; the thresholds sit higher, so the rate is usually "
                             "below the one asked)")
    repair.add_argument("--calibration", type=int, default=None,
                        help="with --detect: clean images kept from the detectors' fit to "
                             "calibrate them (default: the fewest the rate and confidence need, "
                             "299 for one detector at 0.01 and 0.95; more give a threshold "
                             "closer to the rate asked)")
    repair.add_argument("--out", required=True, help="output folder")
    add_keras_options(repair)
    repair.set_defaults(func=cmd_repair)


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


def _add_finetune(sub: Commands) -> None:
    finetune = sub.add_parser("finetune", help="train a model (a repaired one keeps its masks) "
                                               "some more on clean data and save it")
    finetune.add_argument("model", type=Path)
    add_clean_options(finetune, required=True)
    finetune.add_argument("--test", default=None,
                          help="test data: report CA and ASR (the card's attack) before and "
                               "after, and store the new figures in the card")
    finetune.add_argument("--epochs", type=int, default=5, help="default 5")
    finetune.add_argument("--lr", type=float, default=0.01,
                          help="peak learning rate of SGD (momentum 0.9, weight decay 5e-4, "
                               "cosine schedule); default 0.01")
    finetune.add_argument("--batch-size", type=int, default=64, help="default 64")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", required=True, help="model file to write (.safetensors)")
    add_keras_options(finetune)
    finetune.set_defaults(func=cmd_finetune)


def _add_predict(sub: Commands) -> None:
    predict = sub.add_parser("predict", help="classify image files (a GoodNet answers N for "
                                             "inputs it judges poisoned)")
    predict.add_argument("model", type=Path)
    predict.add_argument("images", nargs="+", type=Path)
    add_keras_options(predict)
    predict.set_defaults(func=cmd_predict)


def _add_info(sub: Commands) -> None:
    info = sub.add_parser("info", help="print a saved model's card")
    info.add_argument("model", type=Path)
    add_keras_options(info)
    info.set_defaults(func=cmd_info)


def _add_import(sub: Commands) -> None:
    imp = sub.add_parser("import", help="convert a Keras .h5, ONNX or PyTorch model (read as "
                                        "data, never run) into a goodnet model file")
    imp.add_argument("model", type=Path)
    imp.add_argument("--out", required=True, help="model file to write (.safetensors)")
    add_keras_options(imp)
    imp.set_defaults(func=cmd_import)


def _add_export(sub: Commands) -> None:
    export = sub.add_parser("export", help="export a model, repaired model or GoodNet to ONNX "
                                           "(masks folded into the weights)")
    export.add_argument("model", type=Path)
    export.add_argument("--out", required=True, help="ONNX file to write")
    add_keras_options(export)
    export.set_defaults(func=cmd_export)


def _add_list(sub: Commands) -> None:
    listing = sub.add_parser("list", help="data sets, architectures, attacks, defenses and "
                                          "scanners on offer")
    listing.set_defaults(func=cmd_list)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = _one_line_warning
        return _run(args)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning (a renamed setting, say) as one line on stderr."""
    print(f"goodnet: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except GoodnetError as error:
        if args.debug:
            raise
        print(f"goodnet: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("goodnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (goodnet predict ... | head): stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so exit's flush cannot fail
        return EXIT_ERROR
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("goodnet: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug in goodnet: say so in one line; --debug shows it
        if args.debug:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        print(f"goodnet: internal error: {type(error).__name__}: {first} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
