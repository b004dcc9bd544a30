"""The ``cohortcast`` command: the one entry point for users.

Stage: orchestration. In: command-line arguments. Out: landing zones, Dagster runs and printed
summaries. Every expected failure (bad argument, unusable folder, bad input) is printed as one line
starting with ``error:`` and exits with status 2; nothing is written then.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from features.errors import CohortcastError
from features.simulate import SimulationConfig, simulate_hospital

console = Console()
REPO_DAGSTER_HOME = Path(__file__).resolve().parents[1] / "dagster_home"


@click.group(help="Turn a hospital's FHIR, notes, genomics and imaging into scored patient cohorts.")
def app() -> None:
    pass


@app.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the landing zone.")
@click.option("--patients", type=int, default=1000, show_default=True, help="Number of patients.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes to use; the output does not depend on it.")
def simulate(out: Path, patients: int, seed: int, overwrite: bool, workers: int) -> None:
    """Write a simulated hospital's landing zone (FHIR, notes, genomics, imaging) and its truth."""
    config = SimulationConfig(n_patients=patients, seed=seed)
    with console.status(f"simulating {patients:,} patients"):
        summary = simulate_hospital(out, config, overwrite=overwrite, workers=workers)
    table = Table(title=f"simulated hospital in {summary.out_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for resource_type, count in summary.resources_by_type.items():
        table.add_row(f"FHIR {resource_type}", f"{count:,}")
    table.add_row("patients as transaction Bundles", f"{summary.n_bundles:,}")
    table.add_row("notes-table notes", f"{summary.n_table_notes:,}")
    table.add_row("imaging studies (embeddings)", f"{summary.n_imaging_studies:,}")
    table.add_row("genotyped patients", f"{summary.n_genotyped:,}")
    table.add_row("event rate within horizon", f"{summary.event_rate_within_horizon:.3f}")
    console.print(table)


@app.command()
@click.option("--patients", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Patients to simulate.")
@click.option("--workspace", type=click.Path(path_type=Path), default=Path("workspace"), show_default=True,
              help="Folder for every output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
def demo(patients: int, workspace: Path, seed: int) -> None:
    """Simulate a hospital and materialize the whole Dagster graph on it."""
    if "DAGSTER_HOME" not in os.environ and REPO_DAGSTER_HOME.is_dir():
        os.environ["DAGSTER_HOME"] = str(REPO_DAGSTER_HOME)
    from pipelines.demo import run_demo

    run_demo(workspace, patients, seed, console)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; print expected failures as one line instead of a traceback."""
    try:
        app.main(args=argv, prog_name="cohortcast", standalone_mode=False)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message())
        sys.exit(0)
    except click.exceptions.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except CohortcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
