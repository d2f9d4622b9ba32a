"""The input-level detectors on the small-CNN zoo (issue 18): AUROC, detection at a requested
false-alarm rate, the false-alarm rate measured on test images, and the time per input.

    python benchmarks/detectors_zoo.py --out benchmarks/results/detectors_zoo/results.jsonl
    python benchmarks/detectors_zoo.py --out ... --table      # the markdown table of a run

For each zoo model (seed 0 by default, every attack, MNIST and Fashion-MNIST): the defender's
1 % clean split of the training set (600 images, as the repairs) is cut into 200 calibration
images and 400 the detectors fit on (STRIP's overlays); each detector scores the first
``--test-limit`` test images and their triggered copies (the inputs of other classes than the
target, as ASR counts them). Per requested false-alarm rate (1 % and 5 %) the threshold is
calibrated on the 200 held-out images only; the detection rate is the share of triggered test
inputs above it, the measured false-alarm rate the share of clean test inputs above it.
Resumable: lines already in ``--out`` are not run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from goodnet.artifacts import load_model
from goodnet.backdoor import attack_from_card
from goodnet.data import load_dataset, split_clean
from goodnet.detectors import calibrate, make_detector
from goodnet.metrics import auroc, poisoned_batches

ATTACKS = ("adaptive_blend", "badnets", "blend", "input_aware", "label_consistent",
           "low_frequency", "multi_target", "sig", "trojannn", "wanet")
DETECTORS = {"strip": {}, "scale-up": {}, "scale-up-soft": {"soft": True}, "teco": {}}
RATES = (0.01, 0.05)


def measure(zoo: Path, data: str, attack: str, seed: int, label: str, test_limit: int
            ) -> dict:
    loaded = load_model(zoo / data / "small_cnn" / attack / f"seed{seed}.safetensors")
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    test = test.subset(torch.arange(min(test_limit, len(test))))
    clean, _ = split_clean(train, 0.01, seed=seed)
    calibration, fit = split_clean(clean, 200, seed=seed)
    name = label.removesuffix("-soft")
    detection = make_detector(name, DETECTORS[label]).detect(loaded.model, fit)
    model_attack = attack_from_card(loaded.card, loaded.extras, test)
    calibration_scores = detection.scores(calibration)
    start = time.perf_counter()
    clean_scores = detection.scores(test)
    with torch.no_grad():
        triggered = torch.cat([detection(x_poisoned).cpu() for _, _, parts in
                               poisoned_batches(test, model_attack, 256)
                               for _, x_poisoned, _, _ in parts])
    seconds = time.perf_counter() - start
    record = {"data": data, "attack": attack, "seed": seed, "detector": label,
              "settings": DETECTORS[label], "calibration_images": len(calibration),
              "fit_images": len(fit), "test_images": len(test), "triggered": len(triggered),
              "auroc": auroc(triggered.tolist(), clean_scores.tolist()),
              "ms_per_input": 1000 * seconds / (len(test) + len(triggered)),
              "model_asr": loaded.card.metrics.get("attack_success_rate")}
    for rate in RATES:
        threshold = calibrate(calibration_scores, rate)
        record[f"detection@{rate:g}"] = float((triggered > threshold).float().mean())
        record[f"false_alarm@{rate:g}"] = float((clean_scores > threshold).float().mean())
    return record


def table(records: list[dict]) -> str:
    lines = ["| data | detector | models | mean AUROC | detection at 1 % | FA measured at 1 % "
             "(max) | detection at 5 % | FA measured at 5 % (max) | ≥ 95 % at ≤ 1 % FA | ms per "
             "input |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["detector"]), []).append(r)
    for (data, label), rows in sorted(groups.items()):
        def mean(key: str, rows: list[dict] = rows) -> float:
            return statistics.fmean(r[key] for r in rows)

        good = sum(r["detection@0.01"] >= 0.95 and r["false_alarm@0.01"] <= 0.01 for r in rows)
        lines.append(
            f"| {data} | {label} | {len(rows)} | {mean('auroc'):.3f} | "
            f"{100 * mean('detection@0.01'):.1f} | {100 * mean('false_alarm@0.01'):.2f} "
            f"({100 * max(r['false_alarm@0.01'] for r in rows):.2f}) | "
            f"{100 * mean('detection@0.05'):.1f} | {100 * mean('false_alarm@0.05'):.2f} "
            f"({100 * max(r['false_alarm@0.05'] for r in rows):.2f}) | {good} | "
            f"{mean('ms_per_input'):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true",
                        help="print the table of --out, run nothing")
    args = parser.parse_args(argv)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] \
        if args.out.exists() else []
    if args.table:
        print(table(done))
        return 0
    seen = {(r["data"], r["attack"], r["seed"], r["detector"]) for r in done}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for attack in args.attacks:
            for label in args.detectors:
                if (data, attack, args.seed, label) in seen:
                    continue
                record = measure(args.zoo, data, attack, args.seed, label, args.test_limit)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(f"{data} {attack} {label}: AUROC {record['auroc']:.3f}, detection at 1 % "
                      f"{100 * record['detection@0.01']:.1f} % "
                      f"(FA {100 * record['false_alarm@0.01']:.2f} %)", flush=True)
    print(table([json.loads(line) for line in args.out.read_text().splitlines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
