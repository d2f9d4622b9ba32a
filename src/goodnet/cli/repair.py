"""``goodnet repair``: repair a backdoored model and write the repaired models, GoodNets, curve
and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from goodnet import defenses
from goodnet.artifacts import check_writable
from goodnet.cli.options import (
    Commands,
    add_clean_options,
    add_keras_options,
    clean_from_args,
    data_for,
    data_free,
    describe_defense,
    methods_help,
    numbers,
    open_model,
    poisoned_from_args,
)
from goodnet.data import DATASETS, ImageData
from goodnet.defenses import DEFENSES, defense_class, make_defense
from goodnet.defenses.base import Defense
from goodnet.detector import DISAGREE
from goodnet.detectors import DEFAULT_DETECTORS, DETECTORS
from goodnet.errors import GoodnetError
from goodnet.masking import get_layer
from goodnet.metrics import metrics_table
from goodnet.pipeline import RepairRun, calibration_count, repair, write_repair
from goodnet.settings import check_settings, pairs_to_dict
from goodnet.verdict import AUTO, MAX_AUTO_CLASSES, verdict_scanner

# Options of ``goodnet repair`` that are defense settings of the same name.
DEFENSE_OPTIONS = ("layer", "rank_layer", "semantics", "max_drop", "max_drops")


def defense_from_args(args: argparse.Namespace, classes: int | None = None) -> Defense[Any]:
    """The defense ``--defense`` names (none: the recommended repair for a model of
    ``classes`` classes), its settings from ``-p key=value`` and the options of the same names
    (``--layer``, ``--max-drop``, ...)."""
    name, base = (args.defense, {}) if args.defense else defenses.default_defense(classes)
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


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--confidence must lie in (0, 1), got {text!r}")
    return value


def detect_from_args(args: argparse.Namespace) -> tuple[list[str], bool]:
    """``--detect``: the detectors a GoodNet calibrates, and whether it keeps the lab's
    disagreement check (on without ``--detect``, and where ``--detect`` names it)."""
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


def cmd_repair(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # The recommended repair depends on the model's number of classes, so without --defense the
    # model is opened first; a named defense's settings are checked before the model is read.
    loaded = None if args.defense else open_model(args)
    defense = defense_from_args(args, loaded.card.spec.num_classes if loaded else None)
    detectors, disagree = detect_from_args(args)
    loaded = loaded or open_model(args)
    spec = loaded.card.spec
    _check_layers(args, loaded.model)
    if args.clean is None and defense.needs_clean:
        raise GoodnetError(f"{defense.name} needs clean data: give --clean")
    if args.clean is None and detectors:
        raise GoodnetError("--detect calibrates on clean data: give --clean")
    clean, caveat = clean_from_args(args, loaded.card) if args.clean is not None else (None, None)
    if detectors and clean is not None:  # refused before anything is written
        calibration_count(len(detectors), len(clean), args.false_alarm, args.confidence,
                          args.calibration)
    test_name = args.test or (args.clean if args.clean in DATASETS else None)
    regrowth = _regrowth(args, clean is not None, test_name is not None)
    check_writable(Path(args.out) / "repair.json")
    test = None
    if test_name is not None:
        test = data_for(spec, test_name, "test", args.data_root)
    poisoned = poisoned_from_args(args, spec)
    if poisoned is not None and test is None:
        raise GoodnetError("--poisoned needs clean test data too: give --test")
    verdict = verdict_scanner(args.verdict, clean, spec.num_classes)
    run = repair(loaded.model, loaded.card, loaded.extras, defense, clean, test=test,
                 poisoned=poisoned, detectors=detectors, disagree=disagree,
                 false_alarm=args.false_alarm, confidence=args.confidence,
                 calibration=args.calibration, seed=args.clean_seed, clean_caveat=caveat,
                 name=str(args.model), curve_limit=args.curve_limit, verdict=verdict,
                 regrowth=regrowth, progress=args.progress)
    written = write_repair(Path(args.out), run, loaded.model, loaded.card,
                           run.outcome(started))
    _print_run(args, run, defense, clean, test is not None, spec.num_classes)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _check_layers(args: argparse.Namespace, model: nn.Module) -> None:
    """A typo in --layer or --rank-layer fails now, not after loading the data."""
    if args.layer is not None:
        get_layer(model, args.layer)
    if args.rank_layer is not None:
        try:
            model.get_submodule(args.rank_layer)  # any layer can rank, pools included
        except AttributeError:
            raise GoodnetError(f"the model has no layer {args.rank_layer!r} to rank on") \
                from None


def _regrowth(args: argparse.Namespace, clean: bool, test: bool) -> int:
    """``--regrowth``, checked before anything is written: a whole number, and clean and test
    data to use it on."""
    if args.regrowth < 0:
        raise GoodnetError(f"--regrowth must be 0 or more epochs, got {args.regrowth}")
    if args.regrowth and not (clean and test):
        raise GoodnetError("--regrowth needs clean data (--clean) and test data (--test)")
    return int(args.regrowth)


def _print_run(args: argparse.Namespace, run: RepairRun, defense: Defense[Any],
               clean: ImageData | None, measured: bool, classes: int) -> None:
    """What ``goodnet repair`` prints of a run: the defense and its data, the GoodNet's checks,
    the defense's message and, with test data, the table."""
    report, screens = run.report, run.screens
    source = f"{len(clean)} clean images ({clean.name})" if clean is not None else "no data"
    what = defense.name if args.defense else f"the recommended repair ({describe_defense(defense)})"
    print(f"{what} on {args.model}: {source}, {report.result.seconds:.1f} s")
    if screens:
        checks = ", ".join(f"{s.detector} (threshold {s.threshold:.4g}, {100 * s.false_alarm:g} %)"
                           for s, _ in screens)
        lab = " and the models' disagreement" if run.disagree else ""
        print(f"GoodNet checks: {checks}{lab}; calibrated on {screens[0][0].calibration_images} "
              f"clean images, the rate held with {args.confidence:g} confidence")
    if report.result.message:
        print(report.result.message)
    if run.verdict is not None:
        print(run.verdict.line() + f", {run.verdict.seconds:.1f} s")
    elif args.verdict == AUTO:
        print(f"verdict: not scanned ({classes} classes, more than "
              f"{MAX_AUTO_CLASSES}); name a scanner with --verdict to scan anyway")
    if measured:
        print(metrics_table(report.rows()))
    if run.regrowth is not None:
        epochs, after = run.regrowth
        print(f"regrowth check: after {epochs} epochs of fine-tuning on the clean data, CA "
              f"{100 * after.clean_accuracy:.2f} %, ASR {100 * after.attack_success_rate:.2f} %")


def add_repair(sub: Commands) -> None:
    repair = sub.add_parser("repair", help="repair a backdoored model; write the repaired "
                                           "models, GoodNets, curve and plots",
                            epilog=methods_help("defenses for --defense", DEFENSES),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    repair.add_argument("model", type=Path)
    repair.add_argument("--defense", help="the defense (listed below); without it, the "
                        "recommended repair (goodnet list names it; BENCHMARKS.md, 'The "
                        "second rule for the recommended repair')")
    add_clean_options(repair, f"; not needed by the data-free {data_free(DEFENSES)}")
    repair.add_argument("--test", default=None,
                        help="test data for the figures (default: the test split of --clean)")
    repair.add_argument("--layer", default=None, help="layer to prune (default: last conv)")
    repair.add_argument("--rank-layer", dest="rank_layer", default=None,
                        help="layer whose activations rank the channels")
    repair.add_argument("--semantics", choices=["channel", "keep-bias"], default=None)
    repair.add_argument("--max-drop", dest="max_drop", type=numbers, default=None,
                        help="the accuracy-drop budget whose model is the result, e.g. 0.04")
    repair.add_argument("--max-drops", dest="max_drops", type=numbers, default=None,
                        help="prune: every accuracy-drop budget to write a model for, e.g. "
                             "0.02,0.04,0.10,0.30")
    repair.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="defense setting, repeatable")
    repair.add_argument("--curve-limit", type=int, default=2000,
                        help="test images measured at each step of the curve")
    repair.add_argument("--poisoned", default=None,
                        help="already-poisoned test images labelled with their targets (the "
                             "CSAW-HackML bd_test.h5 layout), for the figures")
    _add_checks(repair)
    repair.add_argument("--out", required=True, help="output folder")
    add_keras_options(repair)
    repair.set_defaults(func=cmd_repair)


def _add_checks(repair: argparse.ArgumentParser) -> None:
    """The options of the GoodNet's checks and of the verdict on the repaired model."""
    repair.add_argument("--detect", default=None, metavar="NAMES", nargs="?", const="default",
                        help="the GoodNet's checks, comma-separated: input detectors ("
                             f"{', '.join(DETECTORS)}) calibrated on clean images "
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
    repair.add_argument("--regrowth", type=int, default=0, metavar="EPOCHS",
                        help="fine-tune the repaired model EPOCHS epochs on the clean data "
                             "(as goodnet finetune) and measure it again: does the backdoor "
                             "come back? (needs test data; default 0: no check)")
    repair.add_argument("--verdict", default=AUTO, metavar="SCANNER",
                        help="scan the repaired model afterwards and say whether a backdoor is "
                             "still suspected: a scanner's name, 'none', or 'auto' (default: "
                             "the default scanner for the data given, on models of at most "
                             f"{MAX_AUTO_CLASSES} classes)")

