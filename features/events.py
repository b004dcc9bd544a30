"""The MEDS-form ``events`` table, built from the normalized tables of the warehouse.

Stage: ingest. In: the normalized tables (Parquet, read lazily). Out: rows of
:data:`features.schemas.EVENTS`, streamed to Parquet, and the MEDS code metadata
(:data:`features.schemas.CODES`: each code's description and parent codes). The event vocabulary:

==================  ===================================  ==============================  =========
table               code                                 value                           time
==================  ===================================  ==============================  =========
patients            ``MEDS_BIRTH``, ``MEDS_DEATH``,      -                               birth /
                    ``SEX//<sex>``                                                       death /
                                                                                         null (sex;
                                                                                         a death
                                                                                         of unknown
                                                                                         date)
encounters          type code (``SNOMED//11429006``), or  text: ``ENCOUNTER//<class>``    start
                    ``ENCOUNTER//<class>`` without one
                    (not for a ``cancelled`` or only
                    ``planned`` visit)
conditions, ...     the primary coding (``SNOMED//..``)  -                               time
                    (not when the act did not happen:
                    ``not-done``, ``cancelled``, ...,
                    the diagnosis was ``refuted``, an
                    order says ``do_not_perform``, or a
                    request is only a ``proposal`` or
                    an ``option``)
observations        ``LOINC//..`` (components too; not   numeric_value and its unit, or  time
                    when ``cancelled`` or only           text_value
                    ``registered``)
notes               ``NOTE//<note_type>``                text: note_id                   time
imaging_studies     ``IMAGING_STUDY//<modality>`` (not   text: study_id                  started
                    when ``cancelled``)
imaging             ``IMAGING//<modality>``              text: study_id                  time
genomics            ``GENE//<gene>``, ``EXPRESSION//..`` numeric (genotype or value),    null
                                                         text: variant
==================  ===================================  ==============================  =========

``source`` is ``<table>/<record id>``. The note text and the image embedding stay in their tables:
later stages embed them, keyed by the id in ``text_value``.

``time`` is when the fact happened (a diagnosis's onset, a specimen's draw): cohorts and labels read
it. Birth is the first instant of the birth date on the site's calendar. ``known_time`` is when it
became known, where that is later: a condition's, allergy's or report's ``recorded_time``
(recordedDate, issued) and an observation's ``issued_time``. Model inputs are placed at it
(:func:`features.tokenize.events_before`), so that a result drawn before a prediction time but
issued after it is not an input, nor is an outcome's work-up an outcome.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.fhir.columnar import site_date_start
from features.fhir.specs import (
    CODED_TABLES,
    DID_NOT_HAPPEN,
    NO_RESULT_YET,
    NOT_MEASURED,
    NOT_YET_ORDERED,
    RECORDED_TYPES,
    TABLE_OF_TYPE,
    VISIT_DID_NOT_HAPPEN,
)
from features.fhir.validate import SITE_ZONE
from features.schemas import CODES, EVENTS
from features.units import unit_conversion

SUBJECT = pl.col("subject_id")


def _null(dtype: pl.DataType) -> pl.Expr:
    return pl.lit(None, dtype=dtype)


def _frame(
    lf: pl.LazyFrame, code: pl.Expr, time: pl.Expr, numeric: pl.Expr, text: pl.Expr, modality: str, source: pl.Expr,
    known: pl.Expr | None = None, unit: pl.Expr | None = None,
) -> pl.LazyFrame:
    """EVENTS-shaped rows; ``known``: when each became known, kept as ``known_time`` where later than
    ``time``; ``unit``: the unit of ``numeric``, where it has one."""
    known_time = _null(pl.Datetime("us")) if known is None else pl.when(known > time).then(known)
    return lf.select(
        SUBJECT.cast(pl.Int64),
        time.cast(pl.Datetime("us")).alias("time"),
        known_time.cast(pl.Datetime("us")).alias("known_time"),
        code.cast(pl.String).alias("code"),
        numeric.cast(pl.Float32).alias("numeric_value"),
        (_null(pl.String()) if unit is None else unit).cast(pl.String).alias("unit"),
        text.cast(pl.String).alias("text_value"),
        pl.lit(modality).alias("modality"),
        source.cast(pl.String).alias("source"),
    )


def _happened(did_not_happen: tuple[str, ...], column: str = "status") -> pl.Expr:
    """Rows whose ``column`` is none of ``did_not_happen`` (a record without one happened)."""
    return ~pl.col(column).is_in(did_not_happen).fill_null(False)


def merged_patients(patients: pl.DataFrame) -> dict[str, str]:
    """Patient id -> the id of the patient it was merged into (``replaced_by``, followed to the
    end of a chain), for merges whose survivor is in ``patients``. A chain that loops, or ends at a
    patient not in the export, is not applied: those records stay their own patients."""
    replaced = {
        old: new for old, new in patients.select("patient_id", "replaced_by").iter_rows() if new is not None
    }
    present = set(patients["patient_id"].to_list())
    merged: dict[str, str] = {}
    for old in replaced:
        seen, current = {old}, replaced[old]
        while current in replaced and current not in seen:
            seen.add(current)
            current = replaced[current]
        if current not in seen and current in present:
            merged[old] = current
    return merged


def event_frames(tables: dict[str, pl.LazyFrame], zone: str = SITE_ZONE) -> list[pl.LazyFrame]:
    """One lazy EVENTS-shaped frame per source of events. ``tables`` maps table name -> frame;
    ``zone`` is the site time zone the tables were read in.

    A patient merged into another (:func:`merged_patients`) has no events of its own: ingest
    gives its records to the patient it was merged into."""
    merged = merged_patients(tables["patients"].select("patient_id", "replaced_by").collect())
    patients = tables["patients"].filter(~pl.col("patient_id").is_in(list(merged)))
    subjects = patients.select("patient_id", "subject_id")

    def with_subject(name: str) -> pl.LazyFrame:
        return tables[name].join(subjects, on="patient_id", how="inner", maintain_order="left")

    no_num, no_text = _null(pl.Float32()), _null(pl.String())
    frames = [
        _frame(
            patients.filter(pl.col("birth_date").is_not_null()),
            pl.lit("MEDS_BIRTH"),
            # A birth date is a day on the site's calendar: birth is its first instant, so that no
            # record of the day of birth precedes it.
            site_date_start(pl.col("birth_date"), zone),
            no_num,
            no_text,
            "ehr",
            pl.lit("patients/") + pl.col("patient_id"),
        ),
        _frame(
            patients.filter(pl.col("death_time").is_not_null()),
            pl.lit("MEDS_DEATH"),
            pl.col("death_time"),
            no_num,
            no_text,
            "ehr",
            pl.lit("patients/") + pl.col("patient_id"),
        ),
        # Recorded as deceased without a date: a death of unknown time, which cohorts exclude (it
        # cannot be placed before or after a prediction time).
        _frame(
            patients.filter(pl.col("deceased") & pl.col("death_time").is_null()),
            pl.lit("MEDS_DEATH"),
            _null(pl.Datetime("us")),
            no_num,
            no_text,
            "ehr",
            pl.lit("patients/") + pl.col("patient_id"),
        ),
        _frame(
            patients.filter(pl.col("sex").is_not_null()),
            pl.lit("SEX//") + pl.col("sex"),
            _null(pl.Datetime("us")),
            no_num,
            no_text,
            "ehr",
            pl.lit("patients/") + pl.col("patient_id"),
        ),
        _frame(
            with_subject("encounters").filter(_happened(VISIT_DID_NOT_HAPPEN)),
            # Coded by the visit's type (as MEDS ETLs code visits), so a task can name the kind of
            # visit its prediction time follows; the class (ambulatory, inpatient, ...) is the value.
            pl.coalesce(pl.col("type_code"), pl.lit("ENCOUNTER//") + pl.col("encounter_class").fill_null("UNKNOWN")),
            pl.col("start_time"),
            no_num,
            pl.lit("ENCOUNTER//") + pl.col("encounter_class").fill_null("UNKNOWN"),
            "ehr",
            pl.lit("encounters/") + pl.col("encounter_id"),
        ),
    ]
    recorded = {TABLE_OF_TYPE[rt] for rt in RECORDED_TYPES}
    for name in CODED_TABLES:
        happened = _happened(DID_NOT_HAPPEN) & _happened(("refuted",), "verification_status")
        if name == "medications":
            # An order not to give the drug (an allergy, an interaction): the patient must not have it.
            happened = happened & ~pl.col("do_not_perform").fill_null(False)
            # A suggestion nobody acted on, or one alternative of several: not given either.
            happened = happened & ~pl.col("intent").is_in(NOT_YET_ORDERED).fill_null(False)
        frames.append(
            _frame(
                with_subject(name).filter(happened),
                pl.col("code"),
                pl.col("time"),
                no_num,
                no_text,
                "ehr",
                pl.lit(f"{name}/") + pl.col("resource_id"),
                # A diagnosis entered in 2018 with onset 2015 was not known in 2016: read at its
                # onset, it would be an input to predictions made before anyone recorded it. A
                # report over a period (a 24-hour collection) has no result before the period ends.
                (pl.max_horizontal("end_time", "recorded_time") if name == "diagnostic_reports"
                 else pl.col("recorded_time") if name in recorded else None),
            )
        )
    frames += [
        _frame(
            with_subject("observations").filter(_happened(NO_RESULT_YET)
                                                & _happened(NOT_MEASURED, "data_absent_reason")),
            pl.col("code"),
            pl.col("time"),
            pl.col("numeric_value"),
            pl.col("text_value"),
            "ehr",
            pl.lit("observations/") + pl.col("resource_id"),
            # A result is an input only once issued: a lab drawn before a prediction time but
            # resulted after it was not on anyone's screen at that time; nor, before it ended, one
            # of a collection over a period (a 24-hour urine).
            pl.max_horizontal("end_time", "issued_time"),
            pl.when(pl.col("numeric_value").is_not_null()).then(pl.col("unit")),
        ),
        _frame(
            with_subject("notes"),
            pl.lit("NOTE//") + pl.col("note_type"),
            pl.col("time"),
            no_num,
            pl.col("note_id"),
            "notes",
            pl.lit("notes/") + pl.col("note_id"),
        ),
        _frame(
            with_subject("imaging_studies").filter(_happened(("cancelled",))),
            pl.lit("IMAGING_STUDY//") + pl.col("modality").fill_null("UNKNOWN"),
            pl.col("time"),
            no_num,
            pl.col("study_id"),
            "ehr",
            pl.lit("imaging_studies/") + pl.col("study_id"),
        ),
        _frame(
            with_subject("imaging"),
            pl.lit("IMAGING//") + pl.col("modality"),
            pl.col("time"),
            no_num,
            pl.col("study_id"),
            "imaging",
            pl.lit("imaging/") + pl.col("study_id"),
        ),
        _frame(
            with_subject("genomics"),
            pl.col("code"),
            _null(pl.Datetime("us")),
            pl.col("value"),
            pl.col("variant"),
            "genomics",
            pl.lit("genomics/") + pl.col("patient_id"),
        ),
    ]
    return frames


def build_events(warehouse_dir: Path, zone: str = SITE_ZONE) -> pl.LazyFrame:
    """The lazy ``events`` query over the normalized tables written in ``warehouse_dir``, read in
    the site time zone ``zone``.

    Every event's subject is a patient of ``patients`` (rows of other tables whose patient is not
    there were quarantined before, and the inner join would drop nothing else).
    """
    names = ["patients", "encounters", *CODED_TABLES, "observations", "notes", "imaging_studies", "imaging", "genomics"]
    tables = {name: pl.scan_parquet(warehouse_dir / f"{name}.parquet", glob=False) for name in names}
    return pl.concat(event_frames(tables, zone), how="vertical").select(EVENTS.names)


def codes_in_several_units(events: pl.LazyFrame) -> pl.DataFrame:
    """The codes whose numeric values come in more than one unit: ``code``, ``unit`` (null where a
    value has none) and ``values``, codes in name order, their units most values first.

    Model inputs convert a value into its token's main unit where UCUM allows and keep the other
    units apart (:mod:`features.tokenize`), so nothing is misread; but a feed that starts charting a
    code in a new unit (another site's scale, in pounds) is something a data engineer wants to hear
    of, and an eGFR sent both per 1.73 m2 and not is two quantities under one code, which the site
    may want to map to two.
    """
    counts = (
        events.filter(pl.col("numeric_value").is_not_null())
        .group_by("code", "unit").agg(pl.len().alias("values"))
        .filter(pl.len().over("code") > 1)
        .sort(["code", "values", "unit"], descending=[False, True, False], nulls_last=True)
        .collect()
    )
    return counts.with_columns(pl.col("values").cast(pl.Int64))


UNIT_CODES_LISTED = 10
"""Codes charted in more than one unit that the ingest's listings show (all are counted)."""


def units_by_code(several: pl.DataFrame) -> pl.DataFrame:
    """:func:`codes_in_several_units`' rows as one per code: ``code``, ``units`` as text, each unit
    after the code's most common one marked as the model inputs read it against that one,
    ``converted`` or ``kept apart`` (:func:`features.units.unit_conversion`):
    ``mL/min/{1.73_m2} (86), mL/min (20, kept apart)``, ``kg (40), [lb_av] (9, converted)``. A
    value without a unit is ``no unit``."""
    rows: list[tuple[str, str]] = []
    for (code,), units in several.group_by("code", maintain_order=True):
        main = units["unit"][0]
        described = [f"{'no unit' if main is None else main} ({units['values'][0]})"]
        for unit, values in units.select("unit", "values").slice(1).iter_rows():
            read = "converted" if None not in (unit, main) and unit_conversion(unit, main) else "kept apart"
            described.append(f"{'no unit' if unit is None else unit} ({values}, {read})")
        rows.append((str(code), ", ".join(described)))
    return pl.DataFrame(rows, schema={"code": pl.String, "units": pl.String}, orient="row")


def most_common(frame: pl.LazyFrame, key: str, value: str) -> pl.LazyFrame:
    """Per ``key``, its most common ``value`` and how often it occurs (``count``); ties go to the
    value first in alphabetical order, so the choice does not depend on row order."""
    return (
        frame.group_by(key, value)
        .agg(count=pl.len())
        .sort("count", value, descending=[True, False])
        .group_by(key, maintain_order=True)
        .first()
    )


def build_codes(warehouse_dir: Path) -> pl.LazyFrame:
    """The lazy ``codes`` query: every code of ``events`` with its description and parent codes.

    A code's description is the display the export gives it most often (the coded tables' and
    observations' ``display``, the encounters' ``type_display``; ties go to the alphabetically
    first), since exports word the same code in several ways ("Hemoglobin A1c" beside "Hemoglobin
    A1c/Hemoglobin.total in Blood"). The codes this module makes are described by family ("Sex:
    female", "Expression of GDF15"); a code the export never describes has none.
    """
    described = [*CODED_TABLES, "observations"]
    displays = pl.concat(
        [
            *(pl.scan_parquet(warehouse_dir / f"{name}.parquet", glob=False).select("code", "display")
              for name in described),
            pl.scan_parquet(warehouse_dir / "encounters.parquet", glob=False).select(
                pl.col("type_code").alias("code"), pl.col("type_display").alias("display")
            ),
        ]
    )
    descriptions = most_common(displays.drop_nulls("display"), "code", "display").select(
        "code", pl.col("display").alias("description")
    )
    parents = (
        pl.scan_parquet(warehouse_dir / "observations.parquet", glob=False)
        .drop_nulls("parent_code")
        .group_by("code")
        .agg(pl.col("parent_code").unique().sort().alias("parent_codes"))
    )
    return (
        pl.scan_parquet(warehouse_dir / "events.parquet", glob=False)
        .select("code")
        .unique()
        .join(descriptions, on="code", how="left")
        .join(parents, on="code", how="left")
        .with_columns(
            pl.coalesce(pl.col("description"), _own_code_description(pl.col("code"))).alias("description"),
            pl.col("parent_codes").fill_null([]),
        )
        .sort("code")
        .select(CODES.names)
    )


_OWN_CODE_FAMILIES = {
    "SEX": "Sex: ",
    "ENCOUNTER": "Visit, class ",
    "NOTE": "Note: ",
    "IMAGING_STUDY": "Imaging study: ",
    "IMAGING": "Image: ",
    "GENE": "Variant in ",
    "EXPRESSION": "Expression of ",
}
"""Descriptions of the codes this module makes (see the table above), by vocabulary."""


def _own_code_description(code: pl.Expr) -> pl.Expr:
    """``Sex: female`` for ``SEX//female``, ``Birth`` for ``MEDS_BIRTH``, ...; null for other codes."""
    parts = code.str.split_exact("//", 1)
    vocabulary, value = parts.struct.field("field_0"), parts.struct.field("field_1")
    prefix = vocabulary.replace_strict(_OWN_CODE_FAMILIES, default=None, return_dtype=pl.String)
    return (
        pl.when(code == "MEDS_BIRTH").then(pl.lit("Birth"))
        .when(code == "MEDS_DEATH").then(pl.lit("Death"))
        .otherwise(prefix + value)
    )
