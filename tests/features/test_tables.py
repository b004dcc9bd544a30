"""Notes, genomics and imaging tables: good rows in, bad rows quarantined with a reason."""

from __future__ import annotations

import gzip
import math
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import features.genomics
import features.imaging
import features.ingest
import features.notes
import features.tables
from features.ingest import IngestSummary, ingest_landing_zone
from features.schemas import IMAGING_INPUT, NOTES_INPUT

EXPORT = datetime(2025, 1, 1)
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1960-05-05"}


def day_end(year: int, month: int, day: int) -> datetime:
    """The time a date without a time of day is stored as: the last microsecond of that day."""
    return datetime(year, month, day, 23, 59, 59, 999999)


def run(
    tmp_path: Path, files: dict[str, bytes | pa.Table], patients: int = 1, zone: str = "UTC"
) -> tuple[IngestSummary, pl.DataFrame]:
    """Ingest ``files`` beside a FHIR export of patients p1 (and p2, ... up to ``patients``)."""
    landing = tmp_path / "landing"
    (landing / "fhir").mkdir(parents=True)
    (landing / "fhir" / "Patient.ndjson").write_bytes(
        b"".join(orjson.dumps({**PATIENT, "id": f"p{i}"}) + b"\n" for i in range(1, patients + 1))
    )
    for name, data in files.items():
        path = landing / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, pa.Table):
            pq.write_table(data, path)
        else:
            path.write_bytes(data)
    summary = ingest_landing_zone(landing, tmp_path / "out", workers=1, export_time=EXPORT, site_timezone=zone)
    assert summary.balanced
    return summary, pl.read_parquet(tmp_path / "out" / "quarantine.parquet")


def notes_table(**overrides: list[object]) -> pa.Table:
    columns: dict[str, list[object]] = {
        "patient_id": ["p1", "p1"],
        "note_id": ["n1", "n2"],
        "time": [datetime(2020, 1, 1), datetime(2020, 2, 1)],
        "note_type": ["nursing_note"] * 2,
        "text": ["Pt well.", "Pt short of breath."],
    }
    columns.update(overrides)
    return pa.table(columns)


def test_notes_table_ingested(tmp_path: Path) -> None:
    _summary, quarantine = run(
        tmp_path, {"notes/notes.parquet": pa.Table.from_pydict(notes_table().to_pydict(), schema=NOTES_INPUT)}
    )
    assert quarantine.height == 0
    notes = pl.read_parquet(tmp_path / "out" / "notes.parquet")
    assert notes.select("note_id", "text", "record_number").rows() == [
        ("n1", "Pt well.", 1),
        ("n2", "Pt short of breath.", 2),
    ]
    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("modality") == "notes")
    assert events.select("code", "text_value").rows() == [("NOTE//nursing_note", "n1"), ("NOTE//nursing_note", "n2")]


def test_notes_missing_column_is_one_row(tmp_path: Path) -> None:
    _summary, quarantine = run(tmp_path, {"notes/notes.parquet": notes_table().drop(["text"])})
    assert quarantine.select("record_number", "reason_code").rows() == [(0, "missing_columns")]
    assert "lacks column(s) text" in quarantine["reason"][0]


def test_notes_row_with_missing_value(tmp_path: Path) -> None:
    summary, quarantine = run(tmp_path, {"notes/notes.parquet": notes_table(text=["ok", None])})
    assert quarantine.select("record_number", "reason").rows() == [(2, "column text is empty")]
    assert summary.table_rows["notes"] == 1


def test_notes_csv_wrong_type(tmp_path: Path) -> None:
    csv = (
        b"patient_id,note_id,time,note_type,text\n"
        b"p1,n1,2020-01-01T00:00:00,nursing_note,fine\np1,n2,yesterday,nursing_note,x\n"
    )
    _summary, quarantine = run(tmp_path, {"notes/notes.csv": csv})
    assert quarantine.select("record_number", "reason_code").rows() == [(2, "bad_date")]


def test_notes_unknown_patient(tmp_path: Path) -> None:
    _summary, quarantine = run(tmp_path, {"notes/notes.parquet": notes_table(patient_id=["p1", "ghost"])})
    assert quarantine.select("source_kind", "record_number", "reason_code").rows() == [("notes", 2, "orphan_reference")]



@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_notes_checked_by_column_equals_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    n = 16
    columns: dict[str, list[object]] = {
        "patient_id": ["p1"] * n, "note_id": [f"n{i}" for i in range(n)],
        "time": [datetime(2020, 1, 1 + i) for i in range(n)], "note_type": ["nursing_note"] * n,
        "text": [f"Pt seen on day {i}." for i in range(n)],
    }
    columns["patient_id"][1] = "p 1"
    columns["note_id"][2] = None
    columns["time"][3] = datetime(2030, 1, 1)  # after the export
    columns["note_type"][4] = " "
    columns["text"][5] = "呼吸困难"  # no ASCII letter: left to the per-row check, which accepts it
    columns["text"][6] = None
    table = pa.table(columns)
    data: bytes | pa.Table = table
    if suffix == "csv":
        def cell(value: object) -> str:
            return "" if value is None else f"{value:%Y-%m-%dT%H:%M:%SZ}" if isinstance(value, datetime) else str(value)

        rows = [",".join(cell(v) for v in row.values()) for row in table.to_pylist()]
        data = ("\n".join([",".join(columns), *rows]) + "\n").encode()
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 5)
    _summary, by_column = run(tmp_path / "fast", {f"notes/notes.{suffix}": data})
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "notes.parquet")
    cleared: list[int] = []
    real_clear = features.notes.clear_columns

    def clear_none(batch: pa.Table, *args: Any) -> np.ndarray:
        cleared.append(int(real_clear(batch, *args).sum()))
        return np.zeros(batch.num_rows, dtype=bool)

    monkeypatch.setattr(features.notes, "clear_columns", clear_none)
    _summary, per_row = run(tmp_path / "slow", {f"notes/notes.{suffix}": data})
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "notes.parquet"), check_exact=True)
    assert_frame_equal(by_column, per_row, check_exact=True)
    assert by_column["record_number"].to_list() == [2, 3, 4, 5, 7]
    assert sum(cleared) == n - 5 - 1
    assert fast.height == n - 5 and "呼吸困难" in fast["text"].to_list()


def test_csv_note_times_read_by_column_equal_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CSV table's times are text: every spelling is read by column as the per-row check reads it,
    # or left to it.
    times = [
        ("2020-01-02T10:11:12Z", True),
        ("2020-01-02 10:11:12", True),  # a space for the T
        (" 2020-01-03 ", True),
        ("2020-01-04T10:00:00+02:00", True),
        ("2020-01-04T10:00:00.123-05:00", True),
        ("2020-01-05", True),
        ("2020-01", False),  # a partial date: read per row, as the end of its month
        ("2020-02-30", False),  # not a real date: quarantined per row
        ("2030-01-01", False),  # after the export
        ("1799-12-31", False),  # before 1800
        ("\u00a02020-01-06", False),  # a no-break space, which only Python's strip() removes
        ("2020-01-07T10:11:12.123456789Z", False),  # nanoseconds: truncated per row
        ("yesterday", False),
        ("", False),
    ]
    rows = [f"p1,n{i},{time},nursing_note,Pt seen." for i, (time, _) in enumerate(times)]
    data = ("patient_id,note_id,time,note_type,text\n" + "\n".join(rows) + "\n").encode()
    _summary, by_column = run(tmp_path / "fast", {"notes/notes.csv": data})
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "notes.parquet")
    cleared: list[np.ndarray] = []
    real_clear = features.notes.clear_columns

    def clear_none(batch: pa.Table, *args: Any) -> np.ndarray:
        cleared.append(real_clear(batch, *args))
        return np.zeros(batch.num_rows, dtype=bool)

    monkeypatch.setattr(features.notes, "clear_columns", clear_none)
    _summary, per_row = run(tmp_path / "slow", {"notes/notes.csv": data})
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "notes.parquet"), check_exact=True)
    assert_frame_equal(by_column, per_row, check_exact=True)
    assert np.concatenate(cleared).tolist() == [by_column for _, by_column in times]
    assert fast["time"].to_list()[:7] == [
        datetime(2020, 1, 2, 10, 11, 12), datetime(2020, 1, 2, 10, 11, 12), day_end(2020, 1, 3),
        datetime(2020, 1, 4, 8), datetime(2020, 1, 4, 15, 0, 0, 123000), day_end(2020, 1, 5), day_end(2020, 1, 31),
    ]  # a date is known by the end of its day, a month by the end of the month
    assert by_column["reason_code"].to_list() == ["bad_date", "future_date", "bad_date", "bad_date", "missing_value"]



def test_table_times_without_a_zone_are_the_sites_wall_clock_by_column_and_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A notes system exports local times without a zone: read as UTC, a New York note written at
    # 15:00 would be placed 4-5 hours before it was written, before a prediction it came after.
    new_york = timezone(timedelta(hours=-4))
    files: dict[str, bytes | pa.Table] = {
        "notes/naive.parquet": notes_table(time=[datetime(2020, 6, 1, 15), datetime(2020, 11, 1, 1, 30)]),
        "notes/zoned.parquet": notes_table(note_id=["n3", "n4"], time=pa.array(
            [datetime(2020, 6, 1, 15, tzinfo=new_york)] * 2, pa.timestamp("us", tz="America/New_York"))),
        "notes/days.parquet": notes_table(note_id=["n5", "n6"], time=[date(2020, 6, 1), date(2020, 12, 31)]),
        "notes/text.csv": b"patient_id,note_id,time,note_type,text\n"
                          b"p1,n7,2020-06-01 15:00:00,nursing_note,Pt seen.\n"
                          b"p1,n8,2020-03-08T02:30:00,nursing_note,Pt seen.\n"
                          b"p1,n9,2020-06-01T15:00:00Z,nursing_note,Pt seen.\n",
        "imaging/studies.parquet": pa.table({
            "patient_id": ["p1"], "study_id": ["s1"], "time": [datetime(2020, 6, 1, 15)], "modality": ["CT"],
            "body_site": ["chest"], "embedding": [[0.5, 1.5]]}),
    }
    summary, by_column = run(tmp_path / "fast", files, zone="America/New_York")
    assert summary.site_timezone == "America/New_York" and by_column.height == 0
    fast = {table: pl.read_parquet(tmp_path / "fast" / "out" / f"{table}.parquet") for table in ("notes", "imaging")}
    assert dict(fast["notes"].select("note_id", "time").iter_rows()) == {
        "n1": datetime(2020, 6, 1, 19), "n2": datetime(2020, 11, 1, 5, 30),  # 01:30 occurs twice: the first (EDT)
        "n3": datetime(2020, 6, 1, 19), "n4": datetime(2020, 6, 1, 19),
        "n5": datetime(2020, 6, 2, 3, 59, 59, 999999), "n6": datetime(2021, 1, 1, 4, 59, 59, 999999),
        "n7": datetime(2020, 6, 1, 19), "n8": datetime(2020, 3, 8, 7, 30),  # 02:30 is skipped: read as EST
        "n9": datetime(2020, 6, 1, 15),
    }
    assert fast["imaging"]["time"].to_list() == [datetime(2020, 6, 1, 19)]
    cleared: list[int] = []
    for module in (features.notes, features.imaging):
        def clear_none(batch: pa.Table, *args: Any, real: Any = module.clear_columns) -> np.ndarray:
            cleared.append(int(real(batch, *args).sum()))
            return np.zeros(batch.num_rows, dtype=bool)

        monkeypatch.setattr(module, "clear_columns", clear_none)
    _summary, per_row = run(tmp_path / "slow", files, zone="America/New_York")
    # All but a date column's (read per row) and the skipped hour (which polars leaves to the per-row check).
    assert cleared == [0, 2, 2, 2, 1]
    for table, frame in fast.items():
        assert_frame_equal(frame, pl.read_parquet(tmp_path / "slow" / "out" / f"{table}.parquet"), check_exact=True)
    assert per_row.height == 0


@pytest.mark.parametrize(("zone", "placeholder"), [("Asia/Tokyo", datetime(1, 1, 1)),
                                                   ("America/New_York", datetime(9999, 12, 31, 23))])
def test_a_placeholder_time_beyond_the_calendar_in_utc_is_quarantined(
    tmp_path: Path, zone: str, placeholder: datetime
) -> None:
    # SQL Server's least and greatest dates, read on a site's clock, fall outside years 1-9999 in UTC.
    table = notes_table(time=[placeholder, datetime(2020, 2, 1)])
    _summary, quarantine = run(tmp_path, {"notes/notes.parquet": table}, zone=zone)
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (1, "bad_date", f"column time {placeholder.isoformat()} is outside the dates a calendar can hold "
                        "(years 1 to 9999 in UTC)")]
    assert pl.read_parquet(tmp_path / "out" / "notes.parquet")["note_id"].to_list() == ["n2"]


NANOSECONDS_2020 = 1_577_872_800_000_000_000  # 2020-01-01T10:00Z as nanoseconds


@pytest.mark.parametrize("unit", ["ms", "us"])
@pytest.mark.parametrize("table", ["notes", "imaging"])
def test_a_time_no_calendar_holds_is_one_quarantined_row_not_a_crash(tmp_path: Path, unit: str, table: str) -> None:
    # A nanosecond count written into a millisecond or microsecond column (a unit mixed up in an
    # export): neither Python nor a cast to microseconds can hold it.
    good = 1_577_872_800_000 if unit == "ms" else 1_577_872_800_000_000
    times = pa.array([good, NANOSECONDS_2020], pa.timestamp(unit))
    data = (notes_table(time=times) if table == "notes" else
            imaging_table([[0.1, 0.2], [0.3, 0.4]]).set_column(2, "time", times))
    summary, quarantine = run(tmp_path, {f"{table}/a.parquet": data})
    unit_name = {"ms": "milliseconds", "us": "microseconds"}[unit]
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (2, "bad_date", f"column time holds {NANOSECONDS_2020} {unit_name} since 1970-01-01, outside the dates a "
                        "calendar can hold (years 1 to 9999; a count in another unit than the column's, such as "
                        "nanoseconds in a microsecond column?)")]
    assert summary.table_rows[table] == 1
    assert pl.read_parquet(tmp_path / "out" / f"{table}.parquet")["time"].to_list() == [datetime(2020, 1, 1, 10)]


@pytest.mark.parametrize(("zone", "placeholder"), [("Asia/Tokyo", datetime(9999, 12, 31, 23, 30)),
                                                   ("America/New_York", datetime(1, 1, 1, 2))])
def test_a_zoned_time_whose_own_zone_leaves_the_calendar_is_one_quarantined_row(
        tmp_path: Path, zone: str, placeholder: datetime) -> None:
    # On the calendar in UTC, off it in the column's own zone, which is how Python reads it.
    micros = [int((t - datetime(1970, 1, 1)) / timedelta(microseconds=1)) for t in (datetime(2020, 1, 1), placeholder)]
    times = pa.array(micros, pa.timestamp("us", zone))
    summary, quarantine = run(tmp_path, {"notes/a.parquet": notes_table(time=times)})
    assert quarantine.select("record_number", "reason_code").rows() == [(2, "bad_date")]
    assert summary.table_rows["notes"] == 1


def test_a_date_beyond_year_9999_is_one_quarantined_row(tmp_path: Path) -> None:
    days = pa.array([18262, 3_000_000], pa.date32())  # 2020-01-01, and a date in year 10183
    summary, quarantine = run(tmp_path, {"notes/a.parquet": notes_table(time=days)})
    assert quarantine.select("record_number", "reason_code").rows() == [(2, "bad_date")]
    assert "holds 3000000 days since 1970-01-01" in quarantine["reason"][0]
    assert summary.table_rows["notes"] == 1


def test_a_zoneless_table_time_is_judged_by_the_year_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 09:00 on 1 January 1800 in Tokyo is 1799 in UTC: kept, as a FHIR dateTime without an offset is;
    # 1799 as written is refused, and both by column and per row.
    table = notes_table(time=[datetime(1800, 1, 1, 9), datetime(1799, 12, 31, 23)])
    _summary, quarantine = run(tmp_path / "fast", {"notes/notes.parquet": table}, zone="Asia/Tokyo")
    monkeypatch.setattr(features.notes, "clear_columns", lambda batch, *args: np.zeros(batch.num_rows, dtype=bool))
    _summary, per_row = run(tmp_path / "slow", {"notes/notes.parquet": table}, zone="Asia/Tokyo")
    assert_frame_equal(quarantine, per_row, check_exact=True)
    assert quarantine.select("record_number", "reason").rows() == [
        (2, "column time 1799-12-31T23:00:00 is before 1800")]
    for run_name in ("fast", "slow"):
        assert pl.read_parquet(tmp_path / run_name / "out" / "notes.parquet")["time"].to_list() == [
            datetime(1799, 12, 31, 23, 41, 1)]  # Tokyo's local mean time then, UTC+9:18:59


def test_a_notes_table_dated_by_day_is_read_as_the_end_of_each_day(tmp_path: Path) -> None:
    # A date column (no time of day): a note of 2020-01-02 is known by the end of that day. Dates
    # and timestamps before 1800 are refused as FHIR dates and text times are.
    table = notes_table(time=[date(2020, 1, 2), date(2020, 2, 1)])
    assert table.schema.field("time").type == pa.date32()
    _summary, quarantine = run(tmp_path, {"notes/notes.parquet": table})
    assert quarantine.height == 0
    notes = pl.read_parquet(tmp_path / "out" / "notes.parquet")
    assert notes["time"].to_list() == [day_end(2020, 1, 2), day_end(2020, 2, 1)]
    for kind, old in (("date", date(1799, 12, 31)), ("timestamp", datetime(1799, 12, 31, 12))):
        _summary, quarantine = run(tmp_path / kind, {"notes/notes.parquet": notes_table(time=[old, old])})
        assert quarantine.select("reason_code").to_series().to_list() == ["bad_date", "bad_date"]
        assert quarantine["reason"][0].endswith("is before 1800")


def test_a_large_table_is_staged_a_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 notes read 5 at a time: each batch is staged as it is read (memory holds one batch), and
    # the notes table comes out as from one part.
    n = 12
    table = notes_table(
        patient_id=["p1"] * n, note_id=[f"n{i}" for i in range(n)], time=[datetime(2020, 1, 1 + i) for i in range(n)],
        note_type=["nursing_note"] * n, text=[f"Note {i}." for i in range(n)],
    )
    _summary, _quarantine = run(tmp_path / "whole", {"notes/notes.parquet": table})
    staged: list[tuple[str, int]] = []
    real_stage = features.ingest._stage_table_read

    def stage(staging: Path, read: features.tables.TableRead, part: str) -> int:
        staged.append((part, sum(f.num_rows for f in read.frames["notes"]) + len(read.rows["notes"])))
        return real_stage(staging, read, part)

    monkeypatch.setattr(features.ingest, "_stage_table_read", stage)
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 5)
    summary, quarantine = run(tmp_path / "batched", {"notes/notes.parquet": table})
    assert staged == [("t0000000-00000", 5), ("t0000000-00001", 5), ("t0000000-00002", 2), ("t0000000-00003", 0)]
    assert quarantine.height == 0 and summary.table_rows["notes"] == n
    assert_frame_equal(
        pl.read_parquet(tmp_path / "batched" / "out" / "notes.parquet"),
        pl.read_parquet(tmp_path / "whole" / "out" / "notes.parquet"),
    )


def test_genomics_long_variants(tmp_path: Path) -> None:
    variants = pa.table(
        {
            "patient_id": ["p1", "p1"],
            "gene": ["CYP2C19", "LPA"],
            "variant": ["rs4244285", "rs10455872"],
            "genotype": pa.array([1, 3], pa.int8()),
        }
    )
    _summary, quarantine = run(tmp_path, {"genomics/variants.parquet": variants})
    assert quarantine.select("record_number", "reason").rows() == [(2, "genotype 3 is not 0, 1 or 2 alternate alleles")]
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "variant", "value").rows() == [("GENE//CYP2C19", "rs4244285", 1.0)]


def test_genomics_wide_tsv_non_finite(tmp_path: Path) -> None:
    tsv = b'"patient_id"\t"IL6"\t"CRP"\np1\t8.5\t12.1\np1\tnan\t3\np1\tabc\t1\np1\t2\t-1e39\np1\t1e39\t1\n'
    _summary, quarantine = run(tmp_path, {"genomics/expression_panel.tsv": tsv})
    assert quarantine.select("record_number", "reason").rows() == [
        (2, "column IL6 is not a finite number (nan)"),
        (3, "column IL6 should be a number, found 'abc'"),
        # The events table holds float32: stored, it would read as minus infinity.
        (4, "column CRP -1e+39 is beyond the range stored (expected a magnitude of at most 3.40282347e+38, float32)"),
        # IL6 is a text column (it holds "abc"): its numbers are parsed, then bounded alike.
        (5, "column IL6 1e+39 is beyond the range stored (expected a magnitude of at most 3.40282347e+38, float32)"),
    ]
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "value").rows() == [("EXPRESSION//IL6", 8.5), ("EXPRESSION//CRP", 12.1)]



def _wide_panel(text: bool) -> pa.Table:
    """30 patients x 4 expression features, with the odd values a panel can hold."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(30, 4)).round(6)
    columns: dict[str, list[object]] = {"patient_id": [f"p{i}" for i in range(1, 31)]}
    for j, gene in enumerate(["IL6", "CRP", "TNF", "BNP"]):
        column: list[object] = [float(v) for v in values[:, j]]
        columns[gene] = [str(v) for v in column] if text else column
    odd = {
        (1, "IL6"): math.nan, (2, "CRP"): math.inf, (3, "TNF"): None, (4, "patient_id"): "p 1",
        (5, "patient_id"): None,
    }
    if text:
        odd |= {(6, "IL6"): " 1.5", (7, "CRP"): "1_000", (8, "TNF"): "abc", (9, "BNP"): "1e-3", (10, "IL6"): "-.5",
                (11, "CRP"): "1e400", (12, "TNF"): "+2."}
    for (row, name), value in odd.items():
        columns[name][row] = str(value) if text and isinstance(value, float) else value
    if not text:
        columns["BNP"] = [int(v * 100) for v in values[:, 3]]  # an integer column reads as numbers
    return pa.table(columns)


@pytest.mark.parametrize("suffix", ["parquet", "tsv"])
def test_wide_genomics_checked_by_column_equals_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    panel = _wide_panel(text=suffix == "tsv")
    if suffix == "tsv":
        data: bytes | pa.Table = "\n".join(
            "\t".join("" if v is None else str(v) for v in row.values()) for row in [
                {name: name for name in panel.column_names}, *panel.to_pylist()]
        ).encode() + b"\n"
    else:
        data = panel
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 8)  # four batches
    _summary, by_column = run(tmp_path / "fast", {f"genomics/expression_panel.{suffix}": data}, patients=30)
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "genomics.parquet")
    cleared: list[int] = []
    real_clear = features.genomics.clear_wide_rows

    def clear_none(table: pa.Table, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows, values = real_clear(table, names)
        cleared.append(int(rows.sum()))
        return np.zeros(table.num_rows, dtype=bool), values

    monkeypatch.setattr(features.genomics, "clear_wide_rows", clear_none)
    _summary, per_row = run(tmp_path / "slow", {f"genomics/expression_panel.{suffix}": data}, patients=30)
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "genomics.parquet"), check_exact=True)
    assert_frame_equal(by_column, per_row, check_exact=True)

    reasons = dict(by_column.select("record_number", "reason").rows())
    expected = {
        2: "column IL6 is NaN", 3: "column CRP is not a finite number (inf)", 4: "column TNF is empty",
        5: "patient_id 'p 1' is not a valid FHIR id", 6: "column patient_id is empty",
    }
    if suffix == "tsv":
        expected |= {
            2: "column IL6 is not a finite number (nan)", 8: "column CRP should be a number, found '1_000'",
            9: "column TNF should be a number, found 'abc'", 12: "column CRP is not a finite number (inf)",
        }
    assert reasons == expected
    # The column checks cleared every row but the odd ones; ' 1.5' was left to the per-row checks,
    # which accept it ('+2.', '-.5' and '1e-3' are plain numbers).
    assert sum(cleared) == 30 - len(expected) - (1 if suffix == "tsv" else 0)
    assert fast.height == 4 * (30 - len(expected))

    def value(record: int, gene: str) -> float:
        return float(fast.filter((pl.col("record_number") == record) & (pl.col("code") == f"EXPRESSION//{gene}"))[
            "value"].item())

    if suffix == "tsv":
        assert (value(7, "IL6"), value(10, "BNP"), value(11, "IL6"), value(13, "TNF")) == (1.5, 0.001, -0.5, 2.0)
    else:
        assert value(30, "BNP") == float(panel.column("BNP")[29].as_py())
    assert fast["code"].head(4).to_list() == [f"EXPRESSION//{gene}" for gene in ("IL6", "CRP", "TNF", "BNP")]




@pytest.mark.parametrize("suffix", ["parquet", "csv"])
@pytest.mark.parametrize("form", ["variants", "features"])
def test_long_genomics_checked_by_column_equals_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, form: str
) -> None:
    n = 20
    text = suffix == "csv"
    columns: dict[str, list[object]] = {"patient_id": [f"p{i}" for i in range(1, n + 1)]}
    if form == "variants":
        columns |= {"gene": ["CYP2C19"] * n, "variant": [f"rs{i}" for i in range(n)],
                    "genotype": [i % 3 for i in range(n)]}
        odd: dict[tuple[int, str], object] = {(1, "genotype"): 3, (2, "genotype"): None, (3, "gene"): "  ",
                                              (4, "variant"): None, (5, "patient_id"): "p 5"}
        if text:
            odd |= {(6, "genotype"): " 1", (7, "genotype"): "1.0", (8, "genotype"): "-1"}
        name = "genomics/variants"
    else:
        columns |= {"feature": [f"score{i % 4}" for i in range(n)], "value": [0.5 * i for i in range(n)]}
        odd = {(1, "value"): math.nan, (2, "value"): None, (3, "feature"): "", (4, "patient_id"): None}
        if text:
            odd |= {(6, "value"): "1_000", (7, "value"): "abc", (8, "value"): "1e400"}
        name = "genomics/risk_scores"
    for (row, column), value in odd.items():
        columns[column][row] = value
    if text:
        rows = [",".join("" if v is None else str(v) for v in values) for values in zip(*columns.values(), strict=True)]
        data: bytes | pa.Table = ("\n".join([",".join(columns), *rows]) + "\n").encode()
    else:
        data = pa.table(columns)
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 6)
    _summary, by_column = run(tmp_path / "fast", {f"{name}.{suffix}": data}, patients=n)
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "genomics.parquet")
    cleared: list[int] = []
    real_clear = features.genomics.clear_long_rows

    def clear_none(table: pa.Table, kind: str) -> tuple[np.ndarray, np.ndarray]:
        rows, values = real_clear(table, kind)
        cleared.append(int(rows.sum()))
        return np.zeros(table.num_rows, dtype=bool), values

    monkeypatch.setattr(features.genomics, "clear_long_rows", clear_none)
    _summary, per_row = run(tmp_path / "slow", {f"{name}.{suffix}": data}, patients=n)
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "genomics.parquet"), check_exact=True)
    assert_frame_equal(by_column, per_row, check_exact=True)
    # Left to the per-row check and accepted by it: genotypes ' 1' and '1.0' (an integral float, as
    # pandas writes integers beside a missing value); the feature value '1_000' is refused there.
    accepted_per_row = {("variants", "csv"): [7, 8]}.get((form, suffix), [])
    quarantined = sorted(by_column["record_number"].to_list())
    assert len(quarantined) + len(accepted_per_row) + sum(cleared) == n
    assert fast["record_number"].to_list() == [i for i in range(1, n + 1) if i not in quarantined]
    assert set(accepted_per_row) <= set(fast["record_number"].to_list())


def test_wide_genomics_patient_twice_is_one_duplicate_row(tmp_path: Path) -> None:
    # The second file's row repeats IL6 (with another value) and CRP for p1, beside a new feature:
    # the row is one record, quarantined whole and counted once, and the accounting stays balanced.
    first = b"patient_id,IL6,CRP\np1,8.5,12.1\n"
    again = b"patient_id,IL6,CRP,TNF\np1,9.0,12.1,3.3\n"
    summary, quarantine = run(tmp_path, {"genomics/a_expression.csv": first, "genomics/b_expression.csv": again})
    assert quarantine.select("source_file", "record_number", "reason_code").rows() == [
        ("genomics/b_expression.csv", 1, "duplicate")
    ]
    assert quarantine["reason"][0] == (
        "duplicate of genomics row p1/EXPRESSION//IL6: the copy in genomics/a_expression.csv record 1 is kept "
        "(first in file order)"
    )
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "value").rows() == [("EXPRESSION//IL6", 8.5), ("EXPRESSION//CRP", 12.1)]
    assert summary.duplicates == 1


def test_a_dropped_wide_row_wins_none_of_its_other_features(tmp_path: Path) -> None:
    # b's panel repeats a's G1 and is dropped whole; its G2 must not then beat c's, which would be
    # dropped citing a copy that is not kept, and p1 would have no G2 at all.
    files = {"genomics/a_long.csv": b"patient_id,feature,value\np1,G1,1.0\n",
             "genomics/b_wide.csv": b"patient_id,G1,G2\np1,2.0,3.0\n",
             "genomics/c_long.csv": b"patient_id,feature,value\np1,G2,4.0\np1,G1,5.0\n"}
    summary, quarantine = run(tmp_path, files)
    assert quarantine.select("source_file", "record_number", "reason").rows() == [
        ("genomics/b_wide.csv", 1, "duplicate of genomics row p1/FEATURE//G1: the copy in genomics/a_long.csv "
                                   "record 1 is kept (first in file order)"),
        ("genomics/c_long.csv", 2, "duplicate of genomics row p1/FEATURE//G1: the copy in genomics/a_long.csv "
                                   "record 1 is kept (first in file order)"),
    ]
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "value", "source_file").sort("code").rows() == [
        ("FEATURE//G1", 1.0, "genomics/a_long.csv"), ("FEATURE//G2", 4.0, "genomics/c_long.csv")]
    assert summary.duplicates == 2


def test_decimal_columns_of_a_sql_export_are_numbers(tmp_path: Path) -> None:
    from decimal import Decimal

    long = pa.table({"patient_id": ["p1", "p1"], "feature": ["IL6", "CRP"],
                     "value": pa.array([Decimal("1.25"), Decimal("2.50")], pa.decimal128(10, 2))})
    wide = pa.table({"patient_id": ["p1"], "BRCA1": pa.array([Decimal("0.50")], pa.decimal128(5, 2))})
    variants = pa.table({"patient_id": ["p1"], "gene": ["CYP2C19"], "variant": ["rs4244285"],
                         "genotype": pa.array([Decimal("1")], pa.decimal128(3, 0))})
    summary, quarantine = run(tmp_path, {"genomics/long.parquet": long, "genomics/wide.parquet": wide,
                                         "genomics/variants.parquet": variants})
    assert quarantine.height == 0
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert sorted(genomics.select("code", "value").rows()) == [
        ("FEATURE//BRCA1", 0.5), ("FEATURE//CRP", 2.5), ("FEATURE//IL6", 1.25), ("GENE//CYP2C19", 1.0)]
    assert summary.table_rows["genomics"] == 4


def test_a_numeric_patient_id_is_named_as_the_wrong_type(tmp_path: Path) -> None:
    wide = pa.table({"patient_id": [1], "BRCA1": [0.5]})
    _summary, quarantine = run(tmp_path, {"genomics/wide.parquet": wide})
    assert quarantine.select("reason_code", "reason").rows() == [
        ("bad_type", "column patient_id should be text, found int 1")]


def test_a_blank_line_in_a_csv_is_one_blank_line_row(tmp_path: Path) -> None:
    csv = (b"patient_id,note_id,time,note_type,text\r\np1,n1,2020-01-01T10:00:00Z,progress,Pt well.\r\n\r\n"
           b"p1,n2,2020-01-02T10:00:00Z,progress,Pt better.\r\n")
    summary, quarantine = run(tmp_path, {"notes/notes.csv": csv})
    assert quarantine.select("record_number", "reason_code", "reason", "raw_text").rows() == [
        (2, "blank_line", "blank line (a table holds one record per line)", "")]
    assert summary.table_rows["notes"] == 2


def test_a_row_of_another_width_than_the_header_shows_its_fields(tmp_path: Path) -> None:
    csv = NOTES_HEADER + b"p1,n1,2020-01-01,progress,Pt well.,extra\n"
    _summary, quarantine = run(tmp_path, {"notes/notes.csv": csv})
    assert quarantine.select("record_number", "reason_code", "reason", "raw_text").rows() == [
        (1, "bad_row", "row has a different number of fields than the header",
         '["p1","n1","2020-01-01","progress","Pt well.","extra"]')]


def test_blank_lines_of_a_csv_written_in_windows_text_mode_say_why(tmp_path: Path) -> None:
    # Python's csv writer ends rows \r\n, and a file opened in text mode on Windows writes \n as \r\n.
    csv = (b"patient_id,note_id,time,note_type,text\r\r\np1,n1,2020-01-01T10:00:00Z,progress,Pt well.\r\r\n"
           b"p1,n2,2020-01-02T10:00:00Z,progress,Pt better.\r\r\n")
    summary, quarantine = run(tmp_path, {"notes/notes.csv": csv})
    reason = ("blank line: this file ends its lines with \\r\\r\\n, so an empty line follows each record (a CSV "
              "written in text mode on Windows, such as Python's csv module without newline=''); write it with \\n "
              "or \\r\\n line ends")
    assert quarantine.select("record_number", "reason_code", "reason", "raw_text").rows() == [
        (1, "blank_line", reason, ""), (3, "blank_line", reason, ""), (5, "blank_line", reason, "")]
    assert summary.table_rows["notes"] == 2


def test_two_patients_notes_with_one_id_are_an_id_conflict_not_a_duplicate(tmp_path: Path) -> None:
    # Two feeds that both number their notes from 1: the second patient's note is not a copy.
    csv = NOTES_HEADER + b"p1,1,2020-01-01,progress,Pt well.\np2,1,2020-01-02,progress,Pt short of breath.\n"
    summary, quarantine = run(tmp_path, {"notes/notes.csv": csv}, patients=2)
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (2, "id_conflict", "notes row 1 of Patient/p2 has the id of Patient/p1's in notes/notes.csv record 1, which "
                           "is kept (first in file order): ids must be unique across patients (feeds that number "
                           "their records alike need a prefix each)")]
    assert summary.duplicates == 0


def test_a_notes_table_row_with_the_id_of_another_patients_versioned_document_is_an_id_conflict(
        tmp_path: Path) -> None:
    import base64

    document = {"resourceType": "DocumentReference", "id": "n1", "status": "current",
                "meta": {"lastUpdated": "2021-01-01T00:00:00Z"}, "subject": {"reference": "Patient/p1"},
                "type": {"text": "Progress note"}, "date": "2020-01-01T10:00:00Z",
                "content": [{"attachment": {"contentType": "text/plain",
                                            "data": base64.b64encode(b"Pt well.").decode()}}]}
    files = {"fhir/DocumentReference.ndjson": orjson.dumps(document) + b"\n",
             "notes/a.csv": NOTES_HEADER + b"p2,n1,2020-01-02,progress,Pt short of breath.\n"}
    summary, quarantine = run(tmp_path, files, patients=2)
    # The table row has no version: it is not an older copy of the document, whatever the document's meta.
    assert quarantine.select("source_file", "reason_code").rows() == [("notes/a.csv", "id_conflict")]
    assert "which is kept (newer: lastUpdated 2021-01-01T00:00:00Z, this copy has none)" in quarantine["reason"][0]
    assert summary.duplicates == 0


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("notes/a.csv", b"patient_id,note_id,time,note_type,text,patient_id\np1,n1,2020-01-01T00:00:00Z,x,y,p2\n",
     "notes table names column(s) patient_id 2 times"),
    ("genomics/l.csv", b"patient_id,feature,value,value\np1,IL6,1.5,99\n",
     "genomics features table names column(s) value 2 times"),
    ("genomics/v.csv", b"patient_id,gene,variant,genotype,patient_id\np1,CYP2C19,rs1,1,p2\n",
     "genomics table names column(s) patient_id 2 times"),
    ("genomics/w.csv", b"patient_id,IL6,patient_id\np1,1.5,p2\n", "genomics table names column(s) patient_id 2 times"),
    ("imaging/i.parquet", pa.Table.from_arrays(
        [pa.array(["p1"]), pa.array(["s1"]), pa.array([datetime(2020, 1, 1)]), pa.array(["CT"]), pa.array(["chest"]),
         pa.array([[0.5, 0.25]], type=pa.list_(pa.float32())), pa.array(["p2"])],
        names=["patient_id", "study_id", "time", "modality", "body_site", "embedding", "patient_id"]),
     "imaging table names column(s) patient_id 2 times"),
])
def test_a_contract_column_given_twice_rejects_the_file(
        tmp_path: Path, name: str, data: bytes | pa.Table, reason: str) -> None:
    # Read as its last copy, the row was filed under p2 (or took the value 99) without a trace.
    summary, quarantine = run(tmp_path, {name: data}, patients=2)
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        (name, 0, "duplicate_columns", f"{reason} (expected each once: which copy a row means is unknown)")]
    assert summary.records_out == 2  # the two patients
    # The raw text shows the header the reason is about: the file's start, or a Parquet file's columns.
    assert quarantine["raw_text"][0] == (
        data.decode() if isinstance(data, bytes) else
        "Parquet file, 1 rows, columns: patient_id, study_id, time, modality, body_site, embedding, patient_id")


def test_a_column_name_with_a_line_break_rejects_the_file(tmp_path: Path) -> None:
    csv = b'patient_id,"g1\nprobe A",g2\np1,1.5,2.5\n'
    _summary, quarantine = run(tmp_path, {"genomics/w.csv": csv})
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (0, "bad_column_name", "column 2's name 'g1\\nprobe A' holds a line break or another control character "
                               "(expected one line of text per column name)")]


def test_a_gzip_file_named_as_csv_is_named_as_compressed(tmp_path: Path) -> None:
    import gzip

    csv = gzip.compress(b"patient_id,note_id,time,note_type,text\np1,n1,2020-01-01T00:00:00Z,x,y\n")
    _summary, quarantine = run(tmp_path, {"notes/a.csv": csv})
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (0, "unsupported_file", "file is gzip-compressed, though named .csv (decompress it: tables are read "
                                "uncompressed)")]


def test_a_missing_column_there_in_other_letter_case_is_named(tmp_path: Path) -> None:
    csv = b"Patient_ID,note_id,time,note_type,text\np1,n1,2020-01-01T00:00:00Z,x,y\n"
    _summary, quarantine = run(tmp_path, {"notes/a.csv": csv})
    assert quarantine["reason"].to_list() == [
        "notes table lacks column(s) patient_id (expected patient_id, note_id, time, note_type, text; found "
        "Patient_ID: names are matched with their letter case)"]


def test_a_table_row_dropped_after_staging_keeps_its_raw_text_as_the_file_holds_it(tmp_path: Path) -> None:
    # Staged, the note's time was in UTC and its type a slug, and a wide row one row per feature:
    # the quarantine showed 01:04 for a note written at 03:04+02:00, and only g1 of the panel.
    files = {"notes/a.csv": b"patient_id,note_id,time,note_type,text\n"
                            b"p9,n1,2020-01-02T03:04:05+02:00,Progress Note,orphan note\n",
             "genomics/w.csv": b"patient_id,g1,g2,g3\np1,0.5,0.25,0.125\np9,1.5,2.5,3.5\n",
             "genomics/panel.parquet": pa.table({"patient_id": ["p9"], "g1": [1.5], "g2": [2.5]})}
    _summary, quarantine = run(tmp_path, files)
    rows = quarantine.sort("source_file").select("source_file", "record_number", "reason_code", "raw_text").rows()
    assert rows == [
        ("genomics/panel.parquet", 1, "orphan_reference", '{"patient_id":"p9","g1":1.5,"g2":2.5}'),
        ("genomics/w.csv", 2, "orphan_reference", '{"patient_id":"p9","g1":"1.5","g2":"2.5","g3":"3.5"}'),
        ("notes/a.csv", 1, "orphan_reference",
         '{"patient_id":"p9","note_id":"n1","time":"2020-01-02T03:04:05+02:00","note_type":"Progress Note",'
         '"text":"orphan note"}'),
    ]


def test_a_note_of_no_known_patient_takes_no_id_from_a_usable_note(tmp_path: Path) -> None:
    # The orphan is listed first; before, it was kept as the copy, the real patient's note was an
    # id_conflict "with the copy kept", and then the orphan was quarantined too: n1 was lost.
    files = {"notes/a.csv": NOTES_HEADER + b"p9,n1,2020-01-01T00:00:00Z,x,note of an unknown patient\n",
             "notes/b.csv": NOTES_HEADER + b"p1,n1,2020-01-01T00:00:00Z,x,note of p1\n"}
    summary, quarantine = run(tmp_path, files)
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        ("notes/a.csv", 1, "orphan_reference", "notes record refers to Patient/p9, which is not in this export")]
    notes = pl.read_parquet(tmp_path / "out" / "notes.parquet")
    assert notes.select("note_id", "patient_id", "text").rows() == [("n1", "p1", "note of p1")]
    assert summary.duplicates == 0


def test_a_newer_fhir_version_of_no_known_patient_still_outranks_the_older_copy(tmp_path: Path) -> None:
    # A version that states itself newer decides, even when its patient is missing: the older
    # copy is not brought back.
    copies = []
    for patient, meta in (("p1", {"versionId": "1"}), ("p9", {"versionId": "2"})):
        observation = {"resourceType": "Observation", "id": "o1", "status": "final", "meta": meta,
                       "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2020-01-01T10:00:00Z",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                       "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}
        copies.append(orjson.dumps(observation) + b"\n")
    _summary, quarantine = run(tmp_path, {"fhir/Observation.ndjson": b"".join(copies)})
    assert quarantine.select("record_number", "reason_code").rows() == [(1, "duplicate"), (2, "orphan_reference")]
    assert pl.read_parquet(tmp_path / "out" / "observations.parquet").height == 0


@pytest.mark.parametrize(("metas", "reason_code"), [
    # A later version moves the record to another patient: the older copy is a duplicate.
    ([None, {"versionId": "2", "lastUpdated": "2024-03-01T00:00:00Z"}], "duplicate"),
    # Two servers numbering alike, each at its version 1: no version tells them apart.
    ([{"versionId": "1", "lastUpdated": "2024-03-01T00:00:00Z"}] * 2, "id_conflict"),
])
def test_two_patients_fhir_copies_of_one_id_clash_unless_one_is_a_newer_version(
        tmp_path: Path, metas: list[dict[str, str] | None], reason_code: str) -> None:
    copies = []
    for patient, meta in zip(("p1", "p2"), metas, strict=True):
        observation = {"resourceType": "Observation", "id": "o1", "status": "final",
                       "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2020-01-01T10:00:00Z",
                       "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                       "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}
        copies.append(orjson.dumps(observation | ({"meta": meta} if meta else {})) + b"\n")
    summary, quarantine = run(tmp_path, {"fhir/Observation.ndjson": b"".join(copies)}, patients=2)
    assert quarantine.select("reason_code").to_series().to_list() == [reason_code]
    assert summary.duplicates == (reason_code == "duplicate")


def test_genomics_values_in_other_digits_or_with_separators_are_not_numbers(tmp_path: Path) -> None:
    csv = ("patient_id,feature,value\np1,IL6,\u0663\np1,CRP,\uff11\uff12\np1,TNF,1_000\np1,IL1,1e3\n"
           "p1,IL2, 2.5 \n").encode()
    _summary, quarantine = run(tmp_path, {"genomics/scores.csv": csv})
    assert quarantine.select("record_number", "reason").rows() == [
        (1, "column value should be a number, found '\u0663'"),
        (2, "column value should be a number, found '\uff11\uff12'"),
        (3, "column value should be a number, found '1_000'"),
    ]
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "value").rows() == [("FEATURE//IL1", 1000.0), ("FEATURE//IL2", 2.5)]


def test_genomics_long_features_beyond_float32_are_quarantined(tmp_path: Path) -> None:
    features = pa.table({"patient_id": ["p1", "p1", "p1"], "feature": ["IL6", "CRP", "TNF"],
                         "value": [3.4e38, 3.5e38, -2.0]})
    _summary, quarantine = run(tmp_path, {"genomics/scores.parquet": features})
    assert quarantine.select("record_number", "reason").rows() == [
        (2, "column value 3.5e+38 is beyond the range stored (expected a magnitude of at most 3.40282347e+38, "
            "float32)"),
    ]
    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("modality") == "genomics")
    assert events.select("code", "numeric_value").rows() == [
        ("FEATURE//IL6", pytest.approx(3.4e38, rel=1e-6)), ("FEATURE//TNF", -2.0),
    ]


def test_genomics_long_features_missing_column(tmp_path: Path) -> None:
    _summary, quarantine = run(tmp_path, {"genomics/scores.csv": b"patient_id,feature\np1,x\n"})
    assert quarantine.select("record_number", "reason").rows() == [
        (0, "genomics features table lacks column(s) value (expected patient_id, feature, value)")]


def imaging_table(embeddings: list[list[float]]) -> pa.Table:
    n = len(embeddings)
    return pa.Table.from_pydict(
        {
            "patient_id": ["p1"] * n,
            "study_id": [f"s{i}" for i in range(n)],
            "time": [datetime(2020, 1, 1)] * n,
            "modality": ["CT"] * n,
            "body_site": ["heart"] * n,
            "embedding": embeddings,
        },
        schema=IMAGING_INPUT,
    )


def test_imaging_wrong_length_and_non_finite(tmp_path: Path) -> None:
    table = imaging_table([[0.1, 0.2, 0.3], [0.1, 0.2], [0.1, math.inf, 0.3], [0.4, 0.5, 0.6]])
    _summary, quarantine = run(tmp_path, {"imaging/embeddings.parquet": table})
    assert quarantine.select("record_number", "reason").rows() == [
        (2, "embedding has 2 values, expected 3 (the landing zone's usual length: one image encoder per warehouse)"),
        (3, "embedding holds a non-finite value (inf)"),
    ]
    imaging = pl.read_parquet(tmp_path / "out" / "imaging.parquet")
    assert imaging["study_id"].to_list() == ["s0", "s3"]
    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("modality") == "imaging")
    assert events.select("code", "text_value").rows() == [("IMAGING//CT", "s0"), ("IMAGING//CT", "s3")]



def test_empty_embeddings_do_not_set_the_landing_zones_usual_length(tmp_path: Path) -> None:
    # Three studies with no embedding yet ([]), two with one: the two are read, the three quarantined.
    summary, quarantine = run(tmp_path, {"imaging/a.parquet": imaging_table([[], [], [], [0.1, 0.2], [0.3, 0.4]])})
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (n, "bad_embedding", "embedding is an empty list (expected the study's embedding values)") for n in (1, 2, 3)]
    assert summary.table_rows["imaging"] == 2


def test_imaging_embeddings_of_integers_or_beyond_float32(tmp_path: Path) -> None:
    # An encoder that writes integers (a quantized one) or doubles: the warehouse stores float32.
    integers = pa.table({
        "patient_id": ["p1"] * 3, "study_id": ["s0", "s1", "s2"], "time": [datetime(2020, 1, 1)] * 3,
        "modality": ["CT"] * 3, "body_site": ["heart"] * 3,
        "embedding": pa.array([[2**24 + 1, 5, 1], [2**62, 0, -(2**62)], [1, 2, 3]], pa.list_(pa.int64())),
    })
    doubles = pa.table({
        "patient_id": ["p1"] * 2, "study_id": ["d0", "d1"], "time": [datetime(2020, 1, 1)] * 2,
        "modality": ["MR"] * 2, "body_site": ["brain"] * 2,
        "embedding": pa.array([[1e39, 0.0, 0.0], [0.5, 0.25, 3e38]], pa.list_(pa.float64())),
    })
    summary, quarantine = run(tmp_path, {"imaging/quantized.parquet": integers, "imaging/doubles.parquet": doubles})
    assert summary.balanced
    assert quarantine.select("source_file", "record_number", "reason").rows() == [
        ("imaging/doubles.parquet", 1, "embedding holds 1e+39, beyond the range stored (expected a magnitude of at "
                                       "most 3.40282347e+38, float32)"),
    ]
    imaging = pl.read_parquet(tmp_path / "out" / "imaging.parquet").sort("study_id")
    assert imaging["study_id"].to_list() == ["d1", "s0", "s1", "s2"]
    assert imaging["embedding"].to_list() == [
        [0.5, 0.25, pytest.approx(3e38, rel=1e-6)], [2.0**24, 5.0, 1.0], [2.0**62, 0.0, -(2.0**62)], [1.0, 2.0, 3.0],
    ]


def test_imaging_files_of_another_encoder_are_quarantined_against_the_landing_zone(tmp_path: Path) -> None:
    # Site A's encoder gives 3 values, site B's 2: each file is consistent on its own, but the model
    # reads all studies through one projection. The landing zone's usual length (3, from 3 of 5
    # rows) wins, and site B's studies are quarantined with the reason; the warehouse stays usable.
    site_a = imaging_table([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    site_b = imaging_table([[0.1, 0.2], [0.3, 0.4]])
    summary, quarantine = run(tmp_path, {"imaging/site_a.parquet": site_a, "imaging/site_b.parquet": site_b})
    assert summary.balanced
    assert quarantine.select("source_file", "record_number", "reason_code").rows() == [
        ("imaging/site_b.parquet", 1, "bad_embedding"), ("imaging/site_b.parquet", 2, "bad_embedding")
    ]
    assert quarantine["reason"][0] == (
        "embedding has 2 values, expected 3 (the landing zone's usual length: one image encoder per warehouse)"
    )
    imaging = pl.read_parquet(tmp_path / "out" / "imaging.parquet")
    assert imaging["embedding"].list.len().to_list() == [3, 3, 3]
    # A file rejected whole (no time column) has no say, however many rows it holds.
    no_time = imaging_table([[0.1, 0.2]] * 5).drop_columns(["time"])
    _summary, quarantine = run(tmp_path / "second",
                               {"imaging/site_a.parquet": site_a, "imaging/no_time.parquet": no_time})
    assert quarantine.select("source_file", "reason_code").rows() == [("imaging/no_time.parquet", "missing_columns")]
    assert pl.read_parquet(tmp_path / "second" / "out" / "imaging.parquet").height == 3


@pytest.mark.parametrize("kind", ["float32, naive", "float64 values, UTC+2 times in ms", "integer values"])
def test_imaging_checked_by_column_equals_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    rng = np.random.default_rng(1)
    n = 24
    embeddings: list[list[object] | None] = [[float(v) for v in rng.normal(size=4).round(3)] for _ in range(n)]
    times = [datetime(2020, 1, 1, 12) for _ in range(n)]
    columns: dict[str, list[object]] = {
        "patient_id": ["p1"] * n, "study_id": [f"s{i}" for i in range(n)], "modality": ["CT"] * n,
        "body_site": ["heart"] * n,
    }
    embeddings[1] = [0.1, 0.2]  # short
    embeddings[2] = [0.1, math.nan, 0.3, 0.4]
    embeddings[3] = [0.1, None, 0.3, 0.4]
    embeddings[4] = []
    embeddings[5] = None
    columns["patient_id"][6] = "p 1"
    columns["study_id"][7] = "s 7"
    columns["modality"][8] = "  "
    columns["modality"][9] = "超声"  # no ASCII letter: left to the per-row check, which accepts it
    times[10] = datetime(2030, 1, 1)  # after the export
    columns["body_site"][11] = None
    value_type = {"float32, naive": pa.float32(), "float64 values, UTC+2 times in ms": pa.float64(),
                  "integer values": pa.int64()}[kind]
    if kind == "integer values":
        embeddings = [None if e is None else [v if not isinstance(v, float) or v != v else int(v * 1000) for v in e]
                      for e in embeddings]
        embeddings[2] = [1, 2, 3, 4]
    time_type = pa.timestamp("us")
    if kind.startswith("float64"):
        time_type = pa.timestamp("ms", tz="+02:00")
        times = [t.replace(tzinfo=timezone(timedelta(hours=2))) for t in times]
    table = pa.table({**columns, "time": pa.array(times, time_type),
                      "embedding": pa.array(embeddings, pa.list_(value_type))})
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 10)
    _summary, by_column = run(tmp_path / "fast", {"imaging/embeddings.parquet": table})
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "imaging.parquet")
    cleared: list[int] = []
    real_clear = features.imaging.clear_imaging_rows

    def clear_none(batch: pa.Table, length: int | None, latest: datetime, zone: str) -> np.ndarray:
        cleared.append(int(real_clear(batch, length, latest, zone).sum()))
        return np.zeros(batch.num_rows, dtype=bool)

    monkeypatch.setattr(features.imaging, "clear_imaging_rows", clear_none)
    _summary, per_row = run(tmp_path / "slow", {"imaging/embeddings.parquet": table})
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "imaging.parquet"), check_exact=True)
    assert_frame_equal(by_column, per_row, check_exact=True)

    quarantined = by_column["record_number"].to_list()
    expected = [2, 3, 4, 5, 6, 7, 8, 9, 11, 12] if kind != "integer values" else [2, 4, 5, 6, 7, 8, 9, 11, 12]
    assert quarantined == expected
    assert sum(cleared) == n - len(expected) - 1  # the non-ASCII modality went per row
    assert fast.height == n - len(expected) and "超声" in fast["modality"].to_list()
    if kind.startswith("float64"):
        assert fast["time"][0] == datetime(2020, 1, 1, 10)  # 12:00 at UTC+2, kept as UTC


def test_imaging_embedding_column_that_is_not_a_list_rejects_each_row(tmp_path: Path) -> None:
    table = imaging_table([[0.1], [0.2]]).set_column(5, "embedding", pa.array([0.1, 0.2]))
    _summary, quarantine = run(tmp_path, {"imaging/embeddings.parquet": table})
    assert quarantine.select("record_number", "reason").rows() == [
        (1, "embedding should be a non-empty list of floats, found float"),
        (2, "embedding should be a non-empty list of floats, found float"),
    ]


def test_corrupt_page_after_good_rows_rejects_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two row groups of 20 studies read 20 rows at a time: the first is read and accepted before the
    # second's damaged embedding page is reached.
    monkeypatch.setattr(features.tables, "BATCH_ROWS", 20)
    good = tmp_path / "good.parquet"
    pq.write_table(imaging_table([[0.1 * i + j for j in range(8)] for i in range(40)]), good, row_group_size=20)
    chunk = max((pq.ParquetFile(good).metadata.row_group(1).column(j) for j in range(6)),
                key=lambda c: c.total_compressed_size)
    end = (chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset) + \
        chunk.total_compressed_size
    damaged = bytearray(good.read_bytes())
    damaged[end - 40 : end] = b"\xff" * 40
    _summary, quarantine = run(tmp_path, {"imaging/embeddings.parquet": bytes(damaged)})
    assert quarantine.select("record_number", "reason_code").rows() == [(0, "unreadable_file")]
    assert quarantine["reason"][0].startswith("file is not a readable Parquet file: ")
    assert pl.read_parquet(tmp_path / "out" / "imaging.parquet").height == 0
    assert pl.read_parquet(tmp_path / "out" / "patients.parquet").height == 1  # the run went on


def test_imaging_missing_column(tmp_path: Path) -> None:
    _summary, quarantine = run(tmp_path, {"imaging/embeddings.parquet": imaging_table([[0.1]]).drop(["embedding"])})
    assert quarantine.select("record_number", "reason_code").rows() == [(0, "missing_columns")]


def test_unreadable_parquet_is_one_row(tmp_path: Path) -> None:
    _summary, quarantine = run(tmp_path, {"imaging/embeddings.parquet": b"PAR1 not really",
                                          "notes/notes.csv": gzip.compress(NOTES_HEADER)})
    assert quarantine.select("source_file", "record_number", "reason_code").rows() == [
        ("imaging/embeddings.parquet", 0, "unreadable_file"), ("notes/notes.csv", 0, "unsupported_file")]
    # What the file is, seen from its first bytes: text that is not Parquet, and a gzip stream.
    assert quarantine["raw_text"][0] == "PAR1 not really"
    assert quarantine["raw_text"][1][2:].startswith("\\x1f\\x8b\\x08")  # after b' (or b" when it holds a ')


NOTES_HEADER = b"patient_id,note_id,time,note_type,text\n"


def test_a_quote_never_closed_rejects_the_notes_file_instead_of_joining_its_rows(tmp_path: Path) -> None:
    rows = [b'p1,n%d,2020-01-01,Progress note,"Pt seen ""well"" today"\n' % i for i in range(1, 41)]
    rows[2] = b'p1,n3,2020-01-01,Progress note,"He said ""ok\n'  # the opening quote never closes
    summary, quarantine = run(tmp_path, {"notes/notes.csv": NOTES_HEADER + b"".join(rows)})
    assert quarantine.select("source_file", "record_number", "reason_code").rows() == [
        ("notes/notes.csv", 0, "unreadable_file")]
    assert quarantine["reason"][0].startswith("CSV/TSV quoting breaks in record 3 (read to line ")
    assert summary.table_rows["notes"] == 0


def test_a_tsv_field_quoted_only_in_part_names_why_the_file_is_rejected(tmp_path: Path) -> None:
    tsv = (b"patient_id\tnote_id\ttime\tnote_type\ttext\n"
           b"p1\tn1\t2020-01-01\tprogress\tPt well.\n"
           b'p1\tn2\t2020-01-02\tprogress\t"Doing well" per patient.\n')
    _summary, quarantine = run(tmp_path, {"notes/notes.tsv": tsv})
    assert quarantine["reason"].to_list() == [
        "CSV/TSV quoting breaks in record 2 (read to line 3): '\t' expected after '\"'; a field that starts with a "
        'quote is read as quoted, so it must end with one, its own quotes doubled (a note beginning with a '
        'quotation: """Doing well"" per patient")']


def test_a_note_longer_than_the_csv_modules_default_field_limit_is_read_whole(tmp_path: Path) -> None:
    long_text = "Discharge summary. " * 10_000  # 190,000 characters: the default limit is 131,072
    csv = NOTES_HEADER + f'p1,n1,2020-01-01,Discharge summary,"{long_text}"\n'.encode()
    _summary, quarantine = run(tmp_path, {"notes/notes.csv": csv})
    assert quarantine.height == 0
    assert pl.read_parquet(tmp_path / "out" / "notes.parquet")["text"].to_list() == [long_text]


def test_a_byte_order_mark_and_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts with a byte-order mark; a Windows-1252 row (0xb5 is µ there, 0xb0 °)
    # is quarantined by itself, early or late in the file, never stored with its bytes replaced.
    rows = [b"p1,n%d,2020-01-01,Nursing note,Pt well\n" % i for i in range(1, 301)]
    rows[1] = b"p1,n2,2020-01-01,Nursing note,Pt 5 \xb5g at 37\xb0C\n"
    rows[250] = b"p1,n251,2020-01-01,Nursing note,caf\xe9\n"
    summary, quarantine = run(tmp_path, {"notes/notes.csv": b"\xef\xbb\xbf" + NOTES_HEADER + b"".join(rows)})
    assert quarantine.select("record_number", "reason_code").rows() == [(2, "not_utf8"), (251, "not_utf8")]
    assert quarantine["reason"][0] == "row holds bytes that are not UTF-8 (shown as U+FFFD; export the file as UTF-8)"
    # The row's fields, as the file holds them (the bytes shown as U+FFFD).
    assert quarantine["raw_text"][0] == '["p1","n2","2020-01-01","Nursing note","Pt 5 \ufffdg at 37\ufffdC"]'
    assert summary.table_rows["notes"] == 298
    # The note type is spelled as a DocumentReference's is: one code per kind of note.
    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("modality") == "notes")
    assert events["code"].unique().to_list() == ["NOTE//nursing_note"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_table_note_types_are_slugged_alike_by_column_and_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   suffix: str) -> None:
    # Kinds of note in other scripts keep their names, marks included: a Japanese discharge summary
    # and progress note are two codes, not two "document"s; a full-width label, or a Turkish one with
    # a capital İ, is the same kind as its usual form.
    types = ["Progress note", "Progress note ", " History & Physical", "***", "退院サマリー", "経過記録",
             "डिस्चार्ज सारांश", "İlerleme notu", "ilerleme notu", "Röntgen-Befund",
             "\uff30\uff52\uff4f\uff47\uff52\uff45\uff53\uff53\u3000\uff4e\uff4f\uff54\uff45"]
    n = len(types)
    table = pa.table({"patient_id": ["p1"] * n, "note_id": [f"n{i}" for i in range(n)],
                      "time": ["2020-01-01T10:00:00Z"] * n, "note_type": types, "text": ["Pt well."] * n})
    data: bytes | pa.Table = table if suffix == "parquet" else table.to_pandas().to_csv(index=False).encode()
    slugs = ["progress_note", "progress_note", "history_physical", "document", "退院サマリー", "経過記録",
             "डिस्चार्ज_सारांश", "ilerleme_notu", "ilerleme_notu", "röntgen_befund", "progress_note"]
    _summary, quarantine = run(tmp_path / "column", {f"notes/notes.{suffix}": data})
    assert quarantine.height == 0
    assert pl.read_parquet(tmp_path / "column" / "out" / "notes.parquet")["note_type"].to_list() == slugs
    monkeypatch.setattr(features.notes, "clear_columns", lambda table, *a, **k: np.zeros(table.num_rows, bool))
    _summary, quarantine = run(tmp_path / "row", {f"notes/notes.{suffix}": data})
    assert quarantine.height == 0
    assert pl.read_parquet(tmp_path / "row" / "out" / "notes.parquet")["note_type"].to_list() == slugs


def test_genotypes_written_as_floats_or_odd_digits(tmp_path: Path) -> None:
    # pandas writes an integer column with a missing value as floats; '²' is a digit to str.isdigit.
    csv = (b"patient_id,gene,variant,genotype\np1,CYP2C19 ,rs4244285,1.0\np1, LPA,rs10455872,2\n"
           b"p1,F5,rs6025,\xc2\xb2\np1,PCSK9,rs11591147,1.5\n")
    _summary, quarantine = run(tmp_path, {"genomics/variants.csv": csv})
    assert quarantine.select("record_number", "reason").rows() == [
        (3, "column genotype should be an integer, found str '²'"),
        (4, "column genotype should be an integer, found str '1.5'"),
    ]
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("code", "variant", "value").rows() == [
        ("GENE//CYP2C19", "rs4244285", 1.0), ("GENE//LPA", "rs10455872", 2.0)]


@pytest.mark.parametrize(("header", "code", "reason"), [
    (b",patient_id,IL6,CRP\n0,p1,1.5,2.0\n", "unnamed_columns",
     "wide genomics table has unnamed column(s) at position(s) 1 (a row index or a trailing delimiter; write the "
     "table without them, e.g. pandas to_csv(index=False))"),
    (b"patient_id,IL6,CRP,IL6 \np1,0.64,2.0,64\n", "duplicate_columns",
     "wide genomics table names feature(s) IL6 more than once (expected one column per feature; name each probe "
     "apart)"),
])
def test_wide_genomics_with_unnamed_or_repeated_columns_is_one_row(tmp_path: Path, header: bytes, code: str,
                                                                   reason: str) -> None:
    summary, quarantine = run(tmp_path, {"genomics/expression.csv": header})
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [(0, code, reason)]
    assert summary.table_rows["genomics"] == 0


def test_a_table_file_of_a_format_not_read_is_one_row_not_left_out(tmp_path: Path) -> None:
    summary, quarantine = run(tmp_path, {"genomics/expression.tsv.gz": b"\x1f\x8b", "notes/notes.txt": b"x"})
    assert quarantine.select("source_file", "reason_code", "reason").sort("source_file").rows() == [
        ("genomics/expression.tsv.gz", "unsupported_file",
         ".tsv.gz is not a table format cohortcast reads (expected .parquet, .csv, .tsv; decompress .gz files)"),
        ("notes/notes.txt", "unsupported_file",
         ".txt is not a table format cohortcast reads (expected .parquet, .csv, .tsv; decompress .gz files)"),
    ]
    assert {account.source_file for account in summary.files} >= {"genomics/expression.tsv.gz", "notes/notes.txt"}


def test_a_blank_note_text_is_named_blank(tmp_path: Path) -> None:
    summary, quarantine = run(tmp_path, {"notes/notes.parquet": notes_table(text=["ok", " \r\n "])})
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (2, "missing_value", "column text is blank (only spaces or line breaks)")]
    assert summary.table_rows["notes"] == 1


def test_view_typed_parquet_columns_are_read(tmp_path: Path) -> None:
    # pyarrow writes a string_view column's type into the file and reads it back as one; an
    # embedding may likewise come back as a list_view.
    notes = notes_table()
    notes = notes.set_column(0, "patient_id", notes.column("patient_id").cast(pa.string_view()))
    notes = notes.set_column(4, "text", notes.column("text").cast(pa.string_view()))
    imaging = pa.table({
        "patient_id": pa.array(["p1"], pa.string_view()), "study_id": ["s1"], "time": [datetime(2020, 3, 1)],
        "modality": ["CT"], "body_site": ["chest"],
        "embedding": pa.array([[0.5, -1.0, 2.0]], pa.list_view(pa.float32())),
    })
    _summary, quarantine = run(tmp_path, {"notes/notes.parquet": notes, "imaging/studies.parquet": imaging})
    assert quarantine.height == 0
    assert pl.read_parquet(tmp_path / "out" / "notes.parquet").select("note_id", "text").rows() == [
        ("n1", "Pt well."), ("n2", "Pt short of breath.")]
    assert pl.read_parquet(tmp_path / "out" / "imaging.parquet").select("study_id", "embedding").rows() == [
        ("s1", [0.5, -1.0, 2.0])]


def test_parquet_column_names_are_trimmed_as_a_csv_headers_are(tmp_path: Path) -> None:
    # One gene is one code whichever file format the panel came in.
    panel = pa.table({"patient_id": ["p1"], " IL6": [1.5], "CRP ": [2.5]})
    csv = b"patient_id, IL6 ,CRP\np2,3.0,4.0\n"
    run(tmp_path, {"genomics/a_panel.parquet": panel, "genomics/b_panel.csv": csv}, patients=2)
    genomics = pl.read_parquet(tmp_path / "out" / "genomics.parquet")
    assert genomics.select("patient_id", "code", "value").rows() == [
        ("p1", "FEATURE//IL6", 1.5), ("p1", "FEATURE//CRP", 2.5),
        ("p2", "FEATURE//IL6", 3.0), ("p2", "FEATURE//CRP", 4.0)]


def test_a_genotype_sentinel_beyond_float_precision_is_one_quarantined_row(tmp_path: Path) -> None:
    variants = pa.table({"patient_id": ["p1", "p1"], "gene": ["CYP2C19", "LPA"], "variant": ["rs4244285", "rs10455872"],
                         "genotype": pa.array([1, -(2**63)], pa.int64())})
    _summary, quarantine = run(tmp_path, {"genomics/variants.parquet": variants})
    assert quarantine.select("record_number", "reason").rows() == [
        (2, f"genotype {-(2**63)} is not 0, 1 or 2 alternate alleles")]
    assert pl.read_parquet(tmp_path / "out" / "genomics.parquet")["code"].to_list() == ["GENE//CYP2C19"]


def test_an_imaging_modality_is_read_as_its_dicom_code_by_column_and_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One modality written two ways would be two codes to the model.
    table = imaging_table([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    table = table.set_column(3, "modality", pa.array([" ct", "CT", "Mr\t"]))
    run(tmp_path / "fast", {"imaging/studies.parquet": table})
    fast = pl.read_parquet(tmp_path / "fast" / "out" / "imaging.parquet")
    assert fast["modality"].to_list() == ["CT", "CT", "MR"]
    events = pl.read_parquet(tmp_path / "fast" / "out" / "events.parquet").filter(pl.col("modality") == "imaging")
    assert events["code"].to_list() == ["IMAGING//CT", "IMAGING//CT", "IMAGING//MR"]
    monkeypatch.setattr(features.imaging, "clear_columns", lambda batch, *args: np.zeros(batch.num_rows, dtype=bool))
    run(tmp_path / "slow", {"imaging/studies.parquet": table})
    assert_frame_equal(fast, pl.read_parquet(tmp_path / "slow" / "out" / "imaging.parquet"), check_exact=True)
