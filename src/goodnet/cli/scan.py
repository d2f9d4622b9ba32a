"""``goodnet scan``: is a model backdoored?
"""

from __future__ import annotations

import argparse
from pathlib import Path

from goodnet.cli.options import (
    Commands,
    add_clean_options,
    add_keras_options,
    clean_from_args,
    methods_help,
    open_model,
)
from goodnet.errors import GoodnetError
from goodnet.scan_output import check_out, pictured_classes, scores_name, write_scan
from goodnet.scans import DEFAULT_SCANNERS, SCANNERS, default_scanner, make_scanner, scanner_class
from goodnet.settings import pairs_to_dict


def cmd_scan(args: argparse.Namespace) -> int:
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


def add_scan(sub: Commands) -> None:
    scan = sub.add_parser("scan", help="is a model backdoored? the verdict, the suspected "
                                       "target class and its reversed trigger; writes "
                                       "scan.json, pictures and scan.html",
                          epilog=methods_help("scanners for --scanner", SCANNERS),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    scan.add_argument("model", type=Path)
    scan.add_argument("--scanner", default=None,
                      help="the scanner (listed below); default: "
                           f"{DEFAULT_SCANNERS['with-clean']} with --clean, the data-free "
                           f"{DEFAULT_SCANNERS['data-free']} without")
    add_clean_options(scan, "; not needed by a data-free scanner")
    scan.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                      help="scanner setting, repeatable (see 'goodnet list')")
    scan.add_argument("--out", required=True,
                      help="output folder (made at the end; files of the same names in an "
                           "existing folder are replaced)")
    add_keras_options(scan)
    scan.set_defaults(func=cmd_scan)

