"""Figures of the foundation: the demo's BadNet on MNIST and the same CNN on Fashion-MNIST.

For each data set and seed, trains a BadNets model and a clean model with the demo's settings,
each as its own ``goodnet`` process (so peak memory is per run), and reports CA, ASR and RA as
mean ± standard deviation over seeds, seconds per epoch and peak resident memory. Then times the
whole ``goodnet demo`` once, on a warm data cache.

    python benchmarks/foundation.py --seeds 0 1 2 --out runs/foundation

Writes ``results.json`` and ``table.md`` in ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from goodnet import read_card


def run(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return its wall seconds and peak resident memory in MiB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def spread(values: list[float], scale: float = 100) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/foundation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    goodnet = [sys.executable, "-m", "goodnet", "--no-progress"]
    records = []
    for data in args.data:
        for kind in ("badnets", "clean"):
            for seed in args.seeds:
                path = args.out / f"{data}-{kind}-{seed}.safetensors"
                verb = ["attack", "--attack", "badnets"] if kind == "badnets" else ["train"]
                command = [*goodnet, *verb, "--data", data, "--seed", str(seed),
                           "--epochs", str(args.epochs), "--out", str(path)]
                seconds, peak = run(command)
                card = read_card(path)
                metrics = card.metrics
                if kind == "clean":  # how often the BadNets patch alone yields the target
                    report = subprocess.run(
                        [*goodnet, "eval", str(path), "--data", data, "--attack", "badnets",
                         "--json"], capture_output=True, text=True, check=True)
                    metrics = json.loads(report.stdout)
                records.append({
                    "data": data, "kind": kind, "seed": seed, "wall_seconds": seconds,
                    "peak_mib": peak, "metrics": metrics,
                    "seconds_per_epoch": card.training["seconds_per_epoch"],
                    "command": " ".join(command[2:]).replace("-m goodnet", "goodnet"),
                })
                print(f"{data} {kind} seed {seed}: CA {metrics['clean_accuracy']:.4f} "
                      f"ASR {metrics['attack_success_rate']:.4f} "
                      f"({seconds:.0f} s, {peak:.0f} MiB)", flush=True)
    demo_seconds, demo_peak = run([*goodnet, "demo", "--out", str(args.out / "demo")])
    table = ["| data | model | CA % | ASR % | RA % | s / epoch | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for data in args.data:
        for kind in ("badnets", "clean"):
            rows = [r for r in records if r["data"] == data and r["kind"] == kind]
            metric = {k: [r["metrics"][k] for r in rows]
                      for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")}
            epoch = [s for r in rows for s in r["seconds_per_epoch"]]
            asr = spread(metric["attack_success_rate"])
            ra = spread(metric["robust_accuracy"])
            if kind == "clean":  # ASR of a clean model: how often the patch alone gives the target
                asr, ra = f"({asr})", f"({ra})"
            table.append(
                f"| {data} | small_cnn, {'BadNets' if kind == 'badnets' else 'clean'} | "
                f"{spread(metric['clean_accuracy'])} | {asr} | {ra} | "
                f"{statistics.median(epoch):.1f} | {max(r['peak_mib'] for r in rows):.0f} |"
            )
    summary = (f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
               f"{args.epochs} epochs; mean ± std over seeds; "
               f"`goodnet demo` end to end: {demo_seconds:.0f} s, peak {demo_peak:.0f} MiB; "
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.")
    text = "\n".join(table) + summary
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"records": records, "demo_seconds": demo_seconds, "demo_peak_mib": demo_peak},
        indent=2))
    print(text)


if __name__ == "__main__":
    main()
