"""Reading a wide genomics table (an expression matrix); prints a table of rates and peak memory.

Stage: benchmark. In: nothing (it writes a synthetic panel of ``--patients`` x ``--genes`` numbers,
as TSV and as Parquet, into a temporary folder). Out: a printed table; per format, one fresh
process reads the panel with :func:`features.genomics.read_genomics_file` and reports its time and
its peak memory (``getrusage``).

Run: ``.venv/bin/python benchmarks/genomics_speed.py [--patients 2000] [--genes 2000]``
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

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

CHILD = "--child"


def child(path: Path) -> dict[str, float]:
    from features.genomics import read_genomics_file

    started = time.perf_counter()
    read = read_genomics_file(path, path.name)
    seconds = time.perf_counter() - started
    rows = sum(len(r) for r in read.rows.values()) + sum(f.num_rows for fs in read.frames.values() for f in fs)
    return {"seconds": seconds, "values": rows, "rejects": len(read.rejects),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write_panel(folder: Path, patients: int, genes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=(patients, genes)).round(4)
    table = pa.table({"patient_id": [f"p{i}" for i in range(patients)],
                      **{f"GENE{j}": values[:, j] for j in range(genes)}})
    tsv, parquet = folder / "expression_panel.tsv", folder / "expression_panel.parquet"
    pacsv.write_csv(table, tsv, pacsv.WriteOptions(delimiter="\t", quoting_style="none"))
    pq.write_table(table, parquet)
    return [tsv, parquet]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == CHILD:
        print(json.dumps(child(Path(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_panel(Path(tmp), args.patients, args.genes)
        print(f"wide panel: {args.patients:,} patients x {args.genes:,} genes = {args.patients * args.genes:,} values")
        print(f"{'format':<10}{'MB':>8}{'seconds':>10}{'values/s':>14}{'peak MiB':>10}")
        for path in paths:
            out = subprocess.run([sys.executable, __file__, CHILD, str(path)], capture_output=True, text=True,
                                 check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["values"] == args.patients * args.genes and result["rejects"] == 0, result
            print(f"{path.suffix[1:]:<10}{path.stat().st_size / 1e6:>8.1f}{result['seconds']:>10.2f}"
                  f"{result['values'] / result['seconds']:>14,.0f}{result['peak_mib']:>10,.0f}")


if __name__ == "__main__":
    main()
