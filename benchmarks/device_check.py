"""Every defense, scanner and input detector on a model that lives on a GPU: a check that
nothing in goodnet assumes the CPU, and the time each takes there beside the CPU's.

The planted-backdoor small CNN of the tests (stripes, 4 classes, BadNets target 1; trained on
the CPU, then moved) is repaired by every registered defense at its defaults and scanned by
every scanner, with the clean data and the test data on the CPU as a user's would be. For each:
the wall time, the device of the result's parameters (it must be the model's), and CA / ASR of
the result on the test data. One JSON line per method, to standard output and to ``--out``.

    python benchmarks/device_check.py --device cuda --out device_check.jsonl
    python benchmarks/device_check.py --device cpu --only prune,nc     # the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import plant_backdoor

from goodnet.defenses import DEFENSES, make_defense
from goodnet.metrics import evaluate
from goodnet.models import model_device
from goodnet.scans import SCANNERS, make_scanner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="", help="comma-separated method names (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    only = {n for n in args.only.split(",") if n}
    torch.manual_seed(0)
    model, clean, test, attack = plant_backdoor()
    model = model.to(device).eval()
    lines = []

    def record(kind: str, name: str, run) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        line: dict = {"kind": kind, "method": name, "device": str(device)}
        try:
            result_device, extra = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            line.update(seconds=round(time.perf_counter() - start, 2),
                        result_device=str(result_device),
                        ok=torch.device(result_device).type == device.type, **extra)
        except Exception as error:  # a report of every method, failures too
            where = traceback.extract_tb(error.__traceback__)[-3:]
            line.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                        at=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where])
        lines.append(line)
        print(json.dumps(line), flush=True)

    before = evaluate(model, test, attack)
    print(json.dumps({"backdoored": {"ca": before.clean_accuracy,
                                     "asr": before.attack_success_rate},
                      "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}))
    for name in sorted(DEFENSES):
        if only and name not in only:
            continue

        def repair(name: str = name):
            result = make_defense(name).repair(model, clean)
            metrics = evaluate(result.model, test, attack)
            return model_device(result.model), {
                "ca": round(metrics.clean_accuracy, 4),
                "asr": round(metrics.attack_success_rate, 4), "chosen": result.chosen}

        record("defense", name, repair)
    for name in sorted(SCANNERS):
        if only and name not in only:
            continue

        def scan(name: str = name):
            report = make_scanner(name).scan(model, clean)
            return model_device(model), {"backdoored": report.backdoored,
                                         "targets": list(report.targets)}

        record("scanner", name, scan)
    from goodnet.detector import calibrated
    from goodnet.detectors import DETECTORS

    for name in sorted(DETECTORS):
        if only and name not in only:
            continue

        def screen(name: str = name):
            goodnet = calibrated(model, model, {name: {}}, clean, clean, false_alarm=0.05)
            x, _ = test.get(torch.arange(16))
            answers = goodnet(x.to(device))
            return model_device(goodnet), {"answers": answers.argmax(1).tolist()}

        record("detector", name, screen)
    if args.out:
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0 if all(line["ok"] for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
