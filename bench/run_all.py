"""Run every benchmark of ``bench/`` that exists, one after the other, each in its own process.

    .venv-bench/bin/python -m bench.run_all            # what `make bench` runs
    .venv-bench/bin/python -m bench.run_all --only throughput bench_shell

Each module is started as ``python -m bench.<name>`` with no arguments (so with its own defaults,
and its own process: XLA flags and imports of one cannot leak into the next) and writes its own
report under ``bench/results/``. A module that is not there yet is listed as skipped; a module that
fails does not stop the others, but makes this command exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

#: The benchmarks, in the order they run: (module under ``bench``, what it measures).
BENCHMARKS = (
    ("throughput", "batched env-steps/s vs gymnax and gymnasium (results/throughput.md)"),
    ("bench_shell", "per-step time of the gymnasium shells (results/shell.md)"),
    ("bench_bptt", "BPTT training cost"),
    ("bench_trebuchet", "Trebuchet simulation cost"),
    ("bench_stochastic", "gradient estimators through discrete randomness against exact derivatives"),
    ("bench_identify", "system identification: recovery, noise, identifiability (results/identify.md)"),
    ("bench_adjoints", "Lotka-Volterra adjoints: gradient error and memory (results/adjoints.md)"),
    ("bench_sim2real", "identify-then-fine-tune against PPO on the real system (results/sim2real.md)"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [name for name, _ in BENCHMARKS]
    parser.add_argument("--only", nargs="+", choices=names, default=names, help="run these benchmarks only")
    args = parser.parse_args(argv)

    repository_root = Path(__file__).resolve().parent.parent
    outcomes = []
    for name, what in BENCHMARKS:
        if name not in args.only:
            continue
        module = f"bench.{name}"
        if importlib.util.find_spec(module) is None:
            outcomes.append((name, "skipped (module not present)", 0.0))
            continue
        print(f"=== {module}: {what}", flush=True)
        start = time.perf_counter()
        returncode = subprocess.run([sys.executable, "-m", module], cwd=repository_root).returncode
        status = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
        outcomes.append((name, status, time.perf_counter() - start))

    print("\nbenchmark          status                          wall s")
    for name, status, wall_s in outcomes:
        print(f"{name:18s} {status:31s} {wall_s:6.0f}")
    return 1 if any(status.startswith("FAILED") for _, status, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
