"""Ingest speed and memory on a simulated landing zone; prints a table.

Usage::

    .venv/bin/cohortcast simulate --out /tmp/sim10k --patients 10000
    .venv/bin/python benchmarks/ingest_speed.py /tmp/sim10k [--small /tmp/sim1k] [--r4b-sample 20000]

Each mode runs as its own process and is timed whole (interpreter start, imports, reading, writing),
so the rates compare like with like on the same machine:

(a) ``orjson``: read every FHIR file and ``orjson.loads`` each resource, nothing else;
(b) ``default``: :func:`features.ingest.ingest_landing_zone` (fast-path validation, all tables);
(c) ``strict``: the same with ``strict=True`` (every resource also validated by fhir.resources R4B);
(d) ``r4b``: ``orjson.loads`` + ``fhir.resources.R4B`` ``model_validate`` one by one in one process,
    on ``--r4b-sample`` resources (it is slow) taken from the head of every NDJSON file in proportion
    to its lines, so the sample has the export's mix of resource types; rate extrapolated.

The table also gives each mode's CPU time (user + sys of its process and workers): on a machine
shared with other jobs it is the steadier figure.

Peak memory is the largest resident set of the mode's process tree (the process itself or its
largest worker), from ``getrusage``. With ``--small`` the default mode also runs on a smaller
landing zone, to show how peak memory grows with input size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"


def _fhir_files(landing: Path) -> list[Path]:
    return sorted(p for p in (landing / "fhir").rglob("*") if p.name.endswith((".ndjson", ".json", ".ndjson.gz")))


def child(mode: str, landing: Path, quotas_json: str) -> dict[str, float]:
    """Run one mode in this process; return the resources it handled."""
    import orjson

    if mode == "orjson":
        count = 0
        for path in _fhir_files(landing):
            if path.name.endswith(".json"):
                count += len(orjson.loads(path.read_bytes()).get("entry", []))
                continue
            with path.open("rb") as handle:
                for line in handle:
                    orjson.loads(line)
                    count += 1
        return {"resources": count}
    if mode == "r4b":
        from fhir.resources.R4B import get_fhir_model_class

        count = 0
        # The quotas are counted by the parent: reading every file to count lines is not validation.
        for name, quota in json.loads(Path(quotas_json).read_text()).items():
            with Path(name).open("rb") as handle:
                for _, line in zip(range(quota), handle, strict=False):
                    res = orjson.loads(line)
                    get_fhir_model_class(res["resourceType"]).model_validate(res)
                    count += 1
        return {"resources": count}
    from features.ingest import ingest_landing_zone

    with tempfile.TemporaryDirectory() as out:
        summary = ingest_landing_zone(landing, Path(out), strict=mode == "strict", workers=2)
    return {"resources": summary.fhir_resources_in, "records": summary.records_in, "balanced": float(summary.balanced)}


def r4b_quotas(landing: Path, sample: int) -> dict[Path, int]:
    """Lines to validate from the head of each NDJSON file: ``sample`` in all, shared in proportion
    to the files' line counts, so the sample has the export's mix of resource types (validation
    cost differs a lot by type: an Observation or a DocumentReference costs more than an allergy)."""
    lines = {path: path.read_bytes().count(b"\n") for path in _fhir_files(landing) if path.name.endswith(".ndjson")}
    total = sum(lines.values())
    return {path: max(1, round(sample * n / total)) for path, n in lines.items() if n}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(mode: str, landing: Path, sample: int) -> dict[str, float]:
    """Run a mode as a fresh process; wall time, CPU time and peak RSS of its process tree.

    The CPU time (user + sys of the process and its workers) is the figure to compare when other
    jobs share the machine: they stretch the wall time, much less the CPU time.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json") as quotas:
        if mode == "r4b":
            json.dump({str(path): n for path, n in r4b_quotas(landing, sample).items()}, quotas)
            quotas.flush()
        cpu = _children_cpu()
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, CHILD, mode, str(landing), quotas.name], check=True, capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = wall
    result["cpu_seconds"] = _children_cpu() - cpu
    result["rate"] = result["resources"] / wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("landing", type=Path)
    parser.add_argument("--small", type=Path, help="A smaller landing zone, for peak-memory growth.")
    parser.add_argument("--r4b-sample", type=int, default=20_000)
    parser.add_argument("--modes", default="orjson,default,strict,r4b")
    args = parser.parse_args()
    rows = {mode: measure(mode, args.landing, args.r4b_sample) for mode in args.modes.split(",")}
    print(f"\nlanding zone: {args.landing}")
    print(f"{'mode':<10}{'resources':>12}{'seconds':>10}{'CPU s':>8}{'resources/s':>14}{'peak MiB':>10}")
    for mode, row in rows.items():
        print(
            f"{mode:<10}{row['resources']:>12,.0f}{row['seconds']:>10.1f}{row['cpu_seconds']:>8.1f}"
            f"{row['rate']:>14,.0f}{row['peak_mib']:>10.0f}"
        )
    if "default" in rows and "orjson" in rows:
        print(f"default / orjson rate: {rows['default']['rate'] / rows['orjson']['rate']:.2f} (target >= 0.5)")
        cpu_ratio = rows["orjson"]["cpu_seconds"] / rows["default"]["cpu_seconds"]
        print(f"  (by CPU time instead of wall time: {cpu_ratio:.2f}; the 2 workers can at most double it)")
    if "strict" in rows and "r4b" in rows:
        print(f"strict / r4b rate: {rows['strict']['rate'] / rows['r4b']['rate']:.2f} (target >= 1.8)")
    if args.small is not None:
        small = measure("default", args.small, args.r4b_sample)
        big = rows.get("default") or measure("default", args.landing, args.r4b_sample)
        print(
            f"default peak memory: {small['peak_mib']:.0f} MiB for {small['resources']:,.0f} resources, "
            f"{big['peak_mib']:.0f} MiB for {big['resources']:,.0f} "
            f"({big['resources'] / small['resources']:.1f}x input, {big['peak_mib'] / small['peak_mib']:.2f}x memory)"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        out = child(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
        peak_kib = max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        )
        out["peak_mib"] = peak_kib / 1024
        print(json.dumps(out))
    else:
        main()
