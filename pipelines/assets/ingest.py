"""Ingest assets: the landing zone into normalized tables, quarantine and MEDS ``events``.

Stage: ingest. In: the workspace's ``landing/`` folder (the simulator's, or a hospital export named
by ``IngestRunConfig.landing_dir``). Out: ``patients``, ``encounters``, ... ``events``,
``quarantine`` as Parquet in the workspace's ``warehouse/``, all from one library call
(:func:`features.ingest.ingest_landing_zone`), which keeps the warehouse's tables when the new ones
have a problem the checks look for or too few patients; checks prove the accounting balances, every event's
patient exists, nothing is dated after the export and duplicates are reported; one more warns when
a source file has more of its records quarantined than a set share, one when a numeric code's
values come in more than one unit, and one fails (without blocking) when ``fhir.resources`` raised
on a record for no known reason.

Nightly batches, one partition each, the sensor that ingests them and the one that promotes the
newest to the warehouse (``from_batch``): :mod:`pipelines.sensors`.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from features.events import UNIT_CODES_LISTED, codes_in_several_units, units_by_code
from features.fhir.validate import LIBRARY_ERROR
from features.ingest import (
    MIN_PATIENT_SHARE,
    SUMMARY_FILE,
    TABLES,
    IngestSummary,
    duplicate_records,
    events_after,
    ingest_landing_zone,
    is_batch_name,
    promote_warehouse,
    prune_ingested_batches,
    quarantine_shares,
    quarantined_with,
    records_without_patient,
    warehouse_read,
)
from pipelines.resources import Workspace

INGEST_ASSETS = [*TABLES, "events", "codes", "quarantine"]


class BatchIngestRunConfig(dg.Config):  # type: ignore[misc]
    """How to run an ingest."""

    # Validate every FHIR resource fully with fhir.resources.R4B (FHIR R4 models) as well: slower.
    strict: bool = False
    # Processes reading FHIR; the output does not depend on it.
    workers: int = 2


class IngestRunConfig(BatchIngestRunConfig):
    """How to run the warehouse's ingest, and from what."""

    # A hospital export to read instead of the workspace's landing/ folder.
    landing_dir: str = ""
    # A landing batch, already ingested by `ingested_batch`, whose tables become the warehouse's
    # (no second read of the export); set by the `promote_newest_batch` sensor.
    from_batch: str = ""
    # Promote from_batch even when the warehouse holds a newer batch: a deliberate rollback. Off, a
    # re-run of an old promotion fails instead of replacing newer data (the sensor never sets it).
    allow_older_batch: bool = False
    # After promoting a batch, the ingested copies kept under warehouse/batches/ (the promoted one
    # and the newest older ones); older copies are deleted. The exports under batches/ are not touched.
    keep_ingested_batches: int = 3
    # A batch (or an export) with fewer patients than this share of the warehouse's does not replace
    # its tables (an export or a copy cut short); 0 lets it.
    min_patient_share: float = MIN_PATIENT_SHARE


def _metadata(summary: IngestSummary, warehouse: Path, table: str) -> dict[str, Any]:
    # Counts and paths only: no identifiers or note text in Dagster metadata.
    return {
        "path": dg.MetadataValue.path(str(warehouse / f"{table}.parquet")),
        "rows": summary.table_rows[table],
        "dagster/row_count": summary.table_rows[table],
    }


@dg.multi_asset(
    specs=[
        dg.AssetSpec(name, deps=["simulated_landing_zone"], group_name="ingest", kinds={"parquet"})
        for name in INGEST_ASSETS
    ],
    can_subset=False,
)
def ingested_tables(context: dg.AssetExecutionContext, config: IngestRunConfig, workspace: Workspace):  # type: ignore[no-untyped-def]
    """Every normalized table, quarantine and events, from one ingest of the landing zone (or a batch's)."""
    if config.from_batch and config.landing_dir:
        raise dg.Failure(
            f"ingested_tables: landing_dir {config.landing_dir!r} and from_batch {config.from_batch!r} are both set "
            "(expected one: an export to ingest, or an ingested batch to promote)"
        )
    if config.keep_ingested_batches < 1:
        raise dg.Failure(f"ingested_tables: keep_ingested_batches must be at least 1 (the promoted batch), "
                         f"found {config.keep_ingested_batches}")
    if config.from_batch and not is_batch_name(config.from_batch):
        raise dg.Failure(f"ingested_tables: from_batch {config.from_batch!r} is not a batch name (expected a folder "
                         "name under batches/ that starts with its landing date written YYYY-MM-DD, such as "
                         "2024-06-01 or 2024-06-01T02:00:00Z)")
    if config.from_batch:
        ingested = workspace.batch_warehouse_dir(config.from_batch)
        summary = promote_warehouse(ingested, workspace.warehouse_dir, allow_older_batch=config.allow_older_batch,
                                    min_patient_share=config.min_patient_share)
        try:
            pruned = prune_ingested_batches(ingested.parent, config.from_batch, config.keep_ingested_batches)
        except OSError as exc:
            # The warehouse is the new batch's already: failing the run now would hide that (no
            # materialization, no checks, no publishing) over disk space the next promotion frees.
            context.log.warning(f"the warehouse holds batch {config.from_batch}, but older ingested copies under "
                                f"{ingested.parent} could not be deleted ({exc}); the next promotion tries again")
        else:
            if pruned:
                context.log.info(f"deleted the ingested copies of {len(pruned)} older batches: {', '.join(pruned)}")
    else:
        landing = Path(config.landing_dir) if config.landing_dir else workspace.landing_dir
        # The tables replace the warehouse only without a problem: the nightly re-scoring reads the
        # warehouse whatever this run's checks say afterwards.
        summary = ingest_landing_zone(landing, workspace.warehouse_dir, strict=config.strict, workers=config.workers,
                                      refuse_problems=True, min_patient_share=config.min_patient_share,
                                      site_timezone=workspace.site_timezone)
    context.log.info(
        f"ingested {summary.records_in} records: {summary.records_out} out, "
        f"{summary.quarantined} quarantined {summary.quarantined_by_reason}"
    )
    for name in INGEST_ASSETS:
        metadata = _metadata(summary, workspace.warehouse_dir, name)
        if name == "quarantine":
            metadata.update({f"reason/{reason}": count for reason, count in summary.quarantined_by_reason.items()})
        if name == "events":
            metadata.update(
                {
                    "records_in": summary.records_in,
                    "records_out": summary.records_out,
                    "quarantined": summary.quarantined,
                    "duplicates": summary.duplicates,
                    "export_time": summary.export_time.isoformat(),
                    "export_time_source": summary.export_time_source,
                }
            )
        yield dg.MaterializeResult(asset_key=name, metadata=metadata)


def _per_table(counts: dict[str, int]) -> str:
    """Counts per table for a check's metadata: ``encounters 1, events 3``, or ``none``."""
    return ", ".join(f"{table} {count}" for table, count in counts.items()) or "none"


def _summary(workspace: Workspace) -> IngestSummary:
    return IngestSummary.from_json(workspace.warehouse_dir / SUMMARY_FILE)


@dg.asset_check(asset="events", blocking=True, description="records_in == records_out + quarantined, per file.")
def ingest_accounting_balances(workspace: Workspace) -> dg.AssetCheckResult:
    summary = _summary(workspace)
    unbalanced = [account.source_file for account in summary.files if not account.balanced]
    return dg.AssetCheckResult(
        passed=not unbalanced,
        metadata={
            "records_in": summary.records_in,
            "records_out": summary.records_out,
            "quarantined": summary.quarantined,
            "unbalanced_files": len(unbalanced),
            "first_unbalanced": unbalanced[0] if unbalanced else "",
        },
    )


@dg.asset_check(asset="events", blocking=True,
                description="Every row of events and of each patient table belongs to a patient in patients.")
def events_subjects_exist(workspace: Workspace) -> dg.AssetCheckResult:
    with warehouse_read(workspace.warehouse_dir):
        missing = records_without_patient(workspace.warehouse_dir)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"rows_without_patient": sum(missing.values()),
                  "events_without_patient": missing.get("events", 0),
                  "tables": _per_table(missing)},
    )


@dg.asset_check(asset="events", blocking=True,
                description="The FHIR files match the export's Bulk manifest.json, when there is one (every listed "
                            "file there, with the records listed).")
def export_matches_manifest(workspace: Workspace) -> dg.AssetCheckResult:
    summary = _summary(workspace)
    return dg.AssetCheckResult(
        passed=summary.complete,
        metadata={"manifest_mismatches": len(summary.manifest_mismatches),
                  "first_mismatch": summary.manifest_mismatches[0] if summary.manifest_mismatches else "",
                  "fhir_export_time": summary.fhir_export_time.isoformat() if summary.fhir_export_time else ""},
    )


@dg.asset_check(asset="events", blocking=True, description="No event is dated after the export time.")
def events_not_after_export(workspace: Workspace) -> dg.AssetCheckResult:
    summary = _summary(workspace)
    with warehouse_read(workspace.warehouse_dir):
        late = events_after(workspace.warehouse_dir, summary.export_time)
    return dg.AssetCheckResult(
        passed=late == 0, metadata={"events_after_export": late, "export_time": summary.export_time.isoformat()}
    )


class CodeUnitsConfig(dg.Config):  # type: ignore[misc]
    """Codes the site knows to come in more than one unit."""

    # Listed by the check but not warned of: a data engineer who has looked at a code (an eGFR sent
    # both per 1.73 m2 and not) keeps the check for the next code a feed starts sending otherwise.
    known_codes: list[str] = Field(default_factory=list)


@dg.asset_check(asset="events", description="Each numeric code's values come in one unit, or the code is among "
                                            "known_codes (warns: the model's inputs convert the units UCUM converts "
                                            "and keep the others apart, but a feed charting a code in a new unit, or "
                                            "two quantities under one code, is worth a look).")
def codes_in_one_unit(config: CodeUnitsConfig, workspace: Workspace) -> dg.AssetCheckResult:
    with warehouse_read(workspace.warehouse_dir):
        several = units_by_code(codes_in_several_units(pl.scan_parquet(workspace.warehouse_dir / "events.parquet",
                                                                        glob=False)))
    several = several.with_columns(known=pl.col("code").is_in(config.known_codes)).sort("known", maintain_order=True)
    listed = "\n".join(["| code | units (values) | known |", "| --- | --- | --- |",
                         *(f"| {code} | {units} | {'yes' if known else 'no'} |"
                           for code, units, known in several.head(UNIT_CODES_LISTED).iter_rows())])
    new = int((~several["known"]).sum())
    return dg.AssetCheckResult(
        passed=new == 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"codes_in_several_units": several.height, "not_known": new,
                  "codes": dg.MetadataValue.md(listed if several.height else "every code in one unit")},
    )


@dg.asset_check(asset="quarantine", blocking=True,
                description="Duplicate records are counted in the summary and quarantined, and no table holds "
                            "one id from two records.")
def duplicates_reported(workspace: Workspace) -> dg.AssetCheckResult:
    summary = _summary(workspace)
    with warehouse_read(workspace.warehouse_dir):
        quarantined = quarantined_with(workspace.warehouse_dir, "duplicate")
        left = duplicate_records(workspace.warehouse_dir)
    return dg.AssetCheckResult(
        passed=quarantined == summary.duplicates and not left,
        metadata={"duplicates": summary.duplicates, "quarantined_duplicates": quarantined,
                  "ids_from_two_records": sum(left.values()),
                  "tables": _per_table(left)},
    )


@dg.asset_check(
    asset="quarantine",
    description="fhir.resources raised on no record for a reason cohortcast does not know (strict mode): "
                "such records are quarantined, but the library, not the export, may be at fault.",
)
def fhir_library_read_every_record(workspace: Workspace) -> dg.AssetCheckResult:
    # Not blocking: the records are accounted for and the rest of the run is sound. An error, not a
    # warning: a broken or mismatched fhir.resources quarantines good data until someone looks.
    with warehouse_read(workspace.warehouse_dir):
        unexplained = quarantined_with(workspace.warehouse_dir, LIBRARY_ERROR)
    return dg.AssetCheckResult(
        passed=unexplained == 0, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"records": unexplained, "reason_code": LIBRARY_ERROR},
    )


class QuarantineShareConfig(dg.Config):  # type: ignore[misc]
    """When a source file's quarantined share warns."""

    # A share of a file's records above this warns. Exports carry a few bad records; a feed that
    # changed format upstream (a new date style, a renamed code system) loses most of a file.
    max_share: float = 0.05


@dg.asset_check(
    asset="quarantine",
    description="No source file has more than max_share of its records quarantined (warns; run config sets the share).",
)
def quarantine_share_within_limit(config: QuarantineShareConfig, workspace: Workspace) -> dg.AssetCheckResult:
    summary = _summary(workspace)
    with warehouse_read(workspace.warehouse_dir):
        shares = quarantine_shares(summary, workspace.warehouse_dir)
    over = shares.filter(pl.col("share") > config.max_share)
    # File names, counts and reason codes only: no record text in Dagster metadata.
    return dg.AssetCheckResult(
        passed=over.is_empty(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "max_share": config.max_share,
            "files_over": over.height,
            "quarantined_share": round(summary.quarantined / summary.records_in, 6) if summary.records_in else 0.0,
            "worst_files": dg.MetadataValue.md(_markdown_table(shares.head(10))),
        },
    )


def _markdown_table(frame: pl.DataFrame) -> str:
    """A small frame as a Markdown table, for Dagster's metadata view."""
    if frame.is_empty():
        return "no record quarantined"
    rows = [" | ".join(frame.columns), " | ".join("---" for _ in frame.columns)]
    rows += [" | ".join(f"{value:.4f}" if isinstance(value, float) else str(value) for value in row)
             for row in frame.iter_rows()]
    return "\n".join(rows)
