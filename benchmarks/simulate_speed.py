"""Benchmark: how fast the simulated hospital is written.

Stage: benchmark. In: patient counts and worker counts. Out: a table (printed) of wall time,
patients and FHIR resources per second, output size and the main process's peak memory, each run
in a fresh subprocess so that runs do not share caches or memory.

Run: ``.venv/bin/python benchmarks/simulate_speed.py [--patients 1000 10000] [--workers 1 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure(patients: int, workers: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "landing"
        command = [sys.executable, "-m", "pipelines.cli", "simulate", "--out", str(out),
                   "--patients", str(patients), "--seed", str(seed), "--workers", str(workers)]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            raise SystemExit(f"simulate failed for {patients} patients ({status})")
        manifest = json.loads((out / "simulation.json").read_text())
        resources = sum(manifest["resources_by_type"].values())
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    return {
        "patients": patients,
        "workers": workers,
        "seconds": seconds,
        "patients_per_s": patients / seconds,
        "resources": resources,
        "resources_per_s": resources / seconds,
        "size_mb": size_mb,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (f"{'patients':>9} {'workers':>7} {'seconds':>8} {'patients/s':>11} {'resources':>10} "
              f"{'resources/s':>12} {'output MB':>10} {'main peak MB':>13}")
    print(f"simulator speed on {os.cpu_count()} cores")
    print(header)
    print("-" * len(header))
    for patients in args.patients:
        for workers in args.workers:
            r = measure(patients, workers, args.seed)
            print(f"{r['patients']:>9,} {r['workers']:>7} {r['seconds']:>8.1f} {r['patients_per_s']:>11,.0f} "
                  f"{r['resources']:>10,} {r['resources_per_s']:>12,.0f} {r['size_mb']:>10,.0f} "
                  f"{r['peak_rss_mb']:>13,.0f}")


if __name__ == "__main__":
    main()
