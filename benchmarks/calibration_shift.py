"""Does calibrating on images the model trained on raise the false-alarm rate on new images?
(issue 18; BENCHMARKS.md, "The default GoodNet's detectors").

The zoo's defender holds 1 % of the training set, which the backdoored model learned, so its
calibration images are not quite like the test images a GoodNet meets. For each model this
fits Mahalanobis on the same 300 training images as ``benchmarks/detectors.yaml`` and calibrates
it at 1 % twice: on the grid's 300 calibration images (training set), and on 300 test images
the measurements do not use; the false-alarm rate is measured on 5000 other test images (clean,
no trigger). The test images are drawn at random (seed 0), not in order: MNIST's test set puts
its two writer populations in halves, and a calibration from one half does not hold on the
other.

    python benchmarks/calibration_shift.py --arch small_cnn
    python benchmarks/calibration_shift.py --arch resnet20 --attacks badnets blend trojannn wanet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from goodnet.artifacts import load_model
from goodnet.data import load_dataset, split_clean
from goodnet.detectors import calibrate, make_detector
from goodnet.zoo import ZooCell

ATTACKS = ("adaptive-blend", "badnets", "blend", "input-aware", "label-consistent",
           "low-frequency", "multi-target", "sig", "trojannn", "wanet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the zoo model's seed (and split's)")
    args = parser.parse_args(argv)
    print("| data | attack | FA, calibrated on training images (%) | FA, calibrated on unseen "
          "test images (%) |\n|---|---|---|---|")
    for data in args.data:
        train, test = load_dataset(data, "train"), load_dataset(data, "test")
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
        unseen, measured = test.subset(order[:300]), test.subset(order[300:5300])
        for attack in args.attacks:
            path = ZooCell(data, args.arch, attack, args.seed).path(args.zoo)
            model = load_model(path).model
            clean, _ = split_clean(train, 0.01, seed=args.seed)
            calibration, fit = split_clean(clean, 300, seed=args.seed)
            detection = make_detector("mahalanobis").detect(model, fit)
            scores = detection.scores(measured)
            rates = []
            for source in (calibration, unseen):
                threshold = calibrate(detection.scores(source), args.rate)
                rates.append(100 * float((scores > threshold).float().mean()))
            print(f"| {data} | {attack} | {rates[0]:.2f} | {rates[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
