"""How long the default Neural Cleanse repairs take on the lab's 1283-class face network (issue
29, item 6): ``goodnet repair`` of the CSAW-HackML DeepID (``lab3_bd_weights.h5``, imported
from its Keras weights) with the ``unlearn`` and ``nc`` defenses at their defaults, end to end,
on a clean set of the lab's validation size (11,547 images of 3×55×47).

The YouTube Faces data are not here, so the clean images are smooth random colour images of
the faces' shape, labelled with the network's own answers (as ``tests/test_csaw_workflow.py``
makes them): right for a TIME (every step runs as on the real data: the same network, image
count and shapes), meaningless for accuracy or for whether the backdoor is found.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/deepid_time.py --threads 1

The unlearning runs with ``-p unlearn_lr=0.0001`` (``--param``), not its default 0.01: at 0.01
(and at 0.001) SGD on this network (no BatchNorm, logits of several hundred) diverges or
collapses within a few steps (``goodnet repair`` stops with "training diverged"), whatever
the scan found. The learning rate does not change the work done, so the time is the default
repair's.

``--defenses default`` runs ``goodnet repair`` without ``--defense`` (the recommended repair
for 1283 classes, ``goodnet.defenses.default_defense(1283)``) and without the ``--param``
settings; a repair that fails prints its one-line error:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/deepid_time.py --threads 1 \
        --defenses default

prints one line per run: the defense, the threads, the wall seconds of the whole command
(import, loading, scan, unlearning, writing), its CPU seconds (user + system: with one thread,
about the wall time the command would take on an otherwise idle machine; the machine here is
shared, so the wall time depends on its load, printed too) and the scan's flagged classes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from goodnet.data.dataset import ImageData
from goodnet.data.npz import save_npz
from goodnet.importers.keras import import_keras

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT.parent / "shared" / "data" / "csaw-hackml" / "lab3_bd_weights.h5"
VALIDATION = 11547  # the lab's clean validation set (valid.h5)


def faces(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour images, 3×55×47, uint8."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 5, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(55, 47), mode="bilinear")
    return (images * 255).round().to(torch.uint8)


def clean_set(path: Path) -> None:
    model = import_keras(WEIGHTS, arch="deepid").model.eval()
    images = faces(VALIDATION, seed=0)
    with torch.no_grad():
        labels = torch.cat([model(part.float() / 255).argmax(1) for part in images.split(512)])
    save_npz(path, ImageData(images, labels, 1283, "random faces"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--defenses", default="unlearn,nc")
    parser.add_argument("--param", action="append", default=[],
                        help="a defense setting, as goodnet repair -p (repeatable; default "
                             "for unlearn: unlearn_lr=0.0001)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clean = Path(folder) / "valid.npz"
        clean_set(clean)
        for threads in args.threads.split(","):
            for defense in args.defenses.split(","):
                out = Path(folder) / f"{defense}-{threads}"
                command = [sys.executable, "-m", "goodnet", "--no-progress", "repair",
                           str(WEIGHTS), "--arch", "deepid", "--clean", str(clean),
                           "--out", str(out)]
                if defense != "default":  # the recommended repair: no --defense, no -p
                    command += ["--defense", defense]
                    pairs = args.param or (["unlearn_lr=0.0001"] if defense == "unlearn"
                                           else [])
                    for pair in pairs:
                        command += ["-p", pair]
                env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                           PYTHONPATH=str(ROOT / "src"))
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                run = subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
                seconds = time.perf_counter() - start
                if run.returncode:
                    print(f"{defense}: failed after {seconds:.0f} s: "
                          f"{run.stderr.strip().splitlines()[-1]}", flush=True)
                    continue
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                notes = json.loads((out / "repair.json").read_text()).get("notes", {})
                print(f"{defense}: {threads} thread(s), {seconds:.0f} s end to end, {cpu:.0f} "
                      f"CPU s, load average {os.getloadavg()[0]:.1f}; flagged "
                      f"{notes.get('flagged')}, fully reversed {notes.get('fully_reversed')}",
                      flush=True)


if __name__ == "__main__":
    main()
