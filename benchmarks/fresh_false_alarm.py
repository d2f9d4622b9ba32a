"""The default GoodNet's false-alarm rate on fresh models from the command line (issue 27).

A user trains a model with ``goodnet attack`` and repairs it with
``goodnet repair MODEL --clean DATA --detect --false-alarm 0.01``; the GoodNet's detectors
(Mahalanobis, the default) should answer N on at most 1 % of new clean inputs and catch the
triggered ones. For each data set × attack this runs exactly those commands (``--seed``, and
one repair per ``--clean-seeds`` entry: each draws another set of clean images, so the spread
shows how steady the rate is), and reads the GoodNet's figures on the whole test set from
``repair.json``: the share of clean test images answered N and of triggered test images (true
class not the target) answered N. The repair's defense does not change these figures (the
detectors read the original model, and ``--detect`` turns the models' disagreement off), so it
runs the quick ``prune``.

    python benchmarks/fresh_false_alarm.py --out runs/fresh_false_alarm

``--goodnet-src DIR`` runs another checkout's code (its ``src`` folder), to set the figures
beside an earlier version's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def goodnet(args: list[str], src: Path | None) -> None:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    subprocess.run([sys.executable, "-m", "goodnet", "--no-progress", *args], check=True,
                   env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend"])
    parser.add_argument("--seed", type=int, default=7, help="the models' seed")
    parser.add_argument("--clean-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--false-alarm", default="0.01")
    parser.add_argument("--out", type=Path, default=Path("runs/fresh_false_alarm"))
    parser.add_argument("--goodnet-src", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for data in args.data:
        for attack in args.attacks:
            model = args.out / f"{data}-{attack}-seed{args.seed}.safetensors"
            if not model.exists():
                goodnet(["attack", "--data", data, "--attack", attack, "--seed", str(args.seed),
                         "--out", str(model)], args.goodnet_src)
            alarms, detected = [], []
            for clean_seed in args.clean_seeds:
                out = args.out / f"{data}-{attack}-clean{clean_seed}"
                goodnet(["repair", str(model), "--defense", "prune", "--max-drop", "0.04",
                         "--clean", data, "--clean-seed", str(clean_seed), "--detect",
                         "--false-alarm", args.false_alarm, "--curve-limit", "0",
                         "--out", str(out)], args.goodnet_src)
                summary = json.loads((out / "repair.json").read_text())
                (figures,) = summary["goodnets"].values()
                alarms.append(100 * figures["false_alarm_rate"])
                detected.append(100 * figures["detection_rate"])
                checks = summary["goodnet_checks"]["screens"]
            rows.append(f"| {data} | {attack} | {checks[0]['calibration_images']} | "
                        f"{statistics.fmean(alarms):.2f} | {min(alarms):.2f}-{max(alarms):.2f} "
                        f"| {statistics.fmean(detected):.2f} | {min(detected):.2f} |")
            print(rows[-1], flush=True)
    print(f"\nGoodNet (default detectors) at --false-alarm {args.false_alarm}, models of seed "
          f"{args.seed}, clean seeds {' '.join(map(str, args.clean_seeds))}; whole test set")
    print("| data | attack | calibration images | FA % (mean) | FA % (range) | detection % "
          "(mean) | detection % (lowest) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
