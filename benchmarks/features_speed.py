"""Time and peak memory to build one task's labels and model inputs, note embedding included.

Usage: ``python benchmarks/features_speed.py [--patients 10000] [--workdir DIR]``. Simulates a
hospital, ingests it into a warehouse with ``features.ingest.ingest_landing_zone``, then runs
``features.task_inputs.build_all`` twice for ``tasks/simulated_mace_1y.yaml`` and prints a table:
per-step seconds, notes/second of the encoder on CPU (wall, and estimated on idle cores from CPU
time), peak resident memory, and what the second run recomputed (nothing, when unchanged).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features import task_inputs  # noqa: E402
from features.ingest import ingest_landing_zone  # noqa: E402
from features.note_embeddings import NoteEncoder  # noqa: E402
from features.simulate import SimulationConfig, simulate_hospital  # noqa: E402
from features.tasks import load_task  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="features_speed_"))
    landing, warehouse = workdir / "landing", workdir / "warehouse"
    t = time.perf_counter()
    if not (landing / "truth.parquet").exists():
        simulate_hospital(landing, SimulationConfig(n_patients=args.patients, seed=0), workers=2)
    if not (warehouse / "events.parquet").exists():
        ingest_landing_zone(landing, warehouse, workers=2, export_time=datetime(2026, 1, 1))
    prep = time.perf_counter() - t
    task = load_task(REPO / "tasks" / "simulated_mace_1y.yaml")
    rows = []
    for run in (1, 2):
        encoder = NoteEncoder(cache_dir=warehouse / "cache" / "note_embeddings")
        steps = {}
        start = time.perf_counter()
        for name, build in [
            ("cohort", task_inputs.build_cohort), ("labels", task_inputs.build_task_labels),
            ("splits", task_inputs.build_splits), ("event_tokens", task_inputs.build_event_tokens),
            ("tabular_features", task_inputs.build_tabular_features),
            ("note_embeddings", lambda w, tk, e=encoder: task_inputs.build_note_embeddings(w, tk, e)),
            ("imaging_inputs", task_inputs.build_imaging_inputs),
        ]:
            s, c = time.perf_counter(), time.process_time()
            result = build(warehouse, task)
            steps[name] = (time.perf_counter() - s, result.recomputed)
            if name == "note_embeddings":
                notes_cpu = time.process_time() - c
        total = time.perf_counter() - start
        notes_s = steps["note_embeddings"][0]
        rate = encoder.n_embedded / notes_s if encoder.n_embedded else float("nan")
        # On a shared machine wall time overstates the cost: CPU seconds over the threads used
        # estimate the rate on idle cores.
        cpu_rate = encoder.n_embedded * encoder.num_threads / notes_cpu if encoder.n_embedded else float("nan")
        rows.append((run, total, steps, encoder.n_embedded, rate, cpu_rate))
    print(f"patients {args.patients:,}; simulate + ingest {prep:.1f} s; torch threads "
          f"{__import__('torch').get_num_threads()}; cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    print("| run | total s | " + " | ".join(f"{n} s" for n in rows[0][2])
          + " | notes embedded | notes/s | notes/s on idle cores (est.) | recomputed |")
    print("|" + "---|" * (len(rows[0][2]) + 6))
    for run, total, steps, n, rate, cpu_rate in rows:
        recomputed = [k for k, (_, r) in steps.items() if r] or ["none"]
        print(f"| {run} | {total:.1f} | " + " | ".join(f"{s:.1f}" for s, _ in steps.values())
              + f" | {n:,} | {rate:.0f} | {cpu_rate:.0f} | {', '.join(recomputed)} |")
    print(f"peak resident memory {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
