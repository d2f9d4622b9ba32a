"""Measure what a hostile input costs before it is refused: peak memory and time, per call.

Each call runs in one child Python process (goodnet and torch imported once), in order. Peak
resident memory only grows, so each call's cost is the growth of the child's peak across it: a
call that allocates gigabytes shows it even if it frees them before raising. A call that grows
the peak past ``limit_mib`` or runs past ``seconds`` fails its test.

Use:
    results = measure({"stride0": "read_checkpoint(PATH)"}, setup="from goodnet... import ...",
                      paths={"PATH": path})
    assert_refused_cheaply(results)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

# What a refusal may cost on top of an imported goodnet: generous for a few-KB file, far below
# the gigabytes the field report measured.
LIMIT_MIB = 300.0
SECONDS = 10.0

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, traceback
    calls, setup = json.loads(sys.argv[1]), sys.argv[2]
    scope = {}
    exec(setup, scope)

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    for name, expression in calls.items():
        before, start = peak_mib(), time.perf_counter()
        error, message = None, ""
        try:
            exec(expression, scope)
        except BaseException as exc:  # the parent asserts on the type
            error = type(exc).__name__
            message = (str(exc).splitlines() or [""])[0]
            if error != "GoodnetError":
                message += " | " + traceback.format_exc().splitlines()[-3].strip()
        record = {"name": name, "error": error, "message": message,
                  "grew_mib": peak_mib() - before, "seconds": time.perf_counter() - start}
        print(json.dumps(record), flush=True)
    """
)


@dataclass(frozen=True)
class Measured:
    name: str
    error: str | None  # the exception's type name, None when the call returned
    message: str
    grew_mib: float
    seconds: float


def measure(calls: dict[str, str], setup: str, timeout: float = 300.0,
            env: dict[str, str] | None = None) -> dict[str, Measured]:
    """Run each statement of ``calls`` (name -> Python statement) after ``setup`` in one child."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    src = str(Path(__file__).resolve().parents[1] / "src")
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, child_env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(calls), setup],
                          capture_output=True, text=True, timeout=timeout, env=child_env)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(records) == len(calls), done.stderr[-2000:]
    return {r["name"]: Measured(**r) for r in records}


def assert_refused_cheaply(results: dict[str, Measured], match: dict[str, str] | None = None,
                           limit_mib: float = LIMIT_MIB, seconds: float = SECONDS) -> None:
    """Every call raised GoodnetError (whose message contains ``match[name]``, when given),
    within ``limit_mib`` of peak-memory growth and ``seconds``."""
    for name, r in results.items():
        assert r.error == "GoodnetError", f"{name}: {r.error}: {r.message}"
        if match and name in match:
            assert match[name] in r.message, f"{name}: {r.message}"
        assert r.grew_mib < limit_mib, f"{name}: peak memory grew {r.grew_mib:.0f} MiB"
        assert r.seconds < seconds, f"{name}: took {r.seconds:.1f} s"
