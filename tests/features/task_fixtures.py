"""Tiny hand-built events tables for the tasks-stage tests (days counted from 2023-01-01)."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from features.tasks import parse_task

T0 = datetime(2023, 1, 1, 9, 0)
VISIT = "SNOMED//11429006"
MI = "SNOMED//22298006"
DRUG = "RXNORM//309362"
BP = "LOINC//8480-6"


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def events_frame(rows: list[tuple[int, datetime | None, str, float | None, str | None, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(*r, "test") for r in rows],
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                "numeric_value": pl.Float32, "text_value": pl.String, "modality": pl.String,
                "source": pl.String},
        orient="row",
    ).with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("known_time"))


def task(**overrides: object) -> object:
    raw: dict[str, object] = {
        "name": "toy",
        "cohort": {"prediction_time": {"first_event": {"codes": [VISIT], "on_or_after": "2023-01-01"}},
                   "min_age_years": 18},
        "outcome": {"codes": [MI], "death": True},
        "horizon_days": 365,
        "treatment": {"codes": [DRUG], "window_days": [0, 30]},
    }
    raw.update(overrides)
    return parse_task(raw)


def toy_events() -> pl.DataFrame:
    """Five patients around an index visit at day 0.

    1: MI at day 100 (positive). 2: followed to day 500, no event (negative), treated at day 5.
    3: last record at day 100, no event (censored before the horizon). 4: MI at day 400 (negative
    for risk, event for progression). 5: aged 10 (excluded by age). Every patient has a blood
    pressure before day 0 and patient 1 one after it.
    """
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str]] = []
    for sid in range(1, 6):
        age = 10 if sid == 5 else 60
        rows += [
            (sid, None, "SEX//female" if sid % 2 else "SEX//male", None, None, "ehr"),
            (sid, day(-365.25 * age), "MEDS_BIRTH", None, None, "ehr"),
            (sid, day(-200), BP, 100.0 + 10 * sid, None, "ehr"),
            (sid, day(-30), "SNOMED//59621000", None, None, "ehr"),
            (sid, day(0), VISIT, None, None, "ehr"),
        ]
    rows += [
        (1, day(50), BP, 180.0, None, "ehr"),
        (1, day(100), MI, None, None, "ehr"),
        (2, day(5), DRUG, None, None, "ehr"),
        (2, day(500), VISIT, None, None, "ehr"),
        (3, day(100), VISIT, None, None, "ehr"),
        (4, day(400), MI, None, None, "ehr"),
        (4, day(450), VISIT, None, None, "ehr"),
    ]
    return events_frame(rows)
