"""``cohortcast ingest``: prints a summary and exits 0 with quarantined records; one-line errors."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from pipelines.cli import main


def test_ingest_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "Patient.ndjson").write_bytes(b'{"resourceType":"Patient","id":"p1"}\nnot json\n')
    main(["ingest", str(tmp_path / "landing"), "--out", str(tmp_path / "out"), "--workers", "1"])
    printed = capsys.readouterr().out
    assert "invalid_json" in printed
    assert "2 in = 1 out + 1 quarantined (balanced)" in printed
    # The worst file, its records, quarantined records, share and main reason.
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in printed.splitlines()]
    assert ["fhir/Patient.ndjson", "2", "1", "50.0%", "invalid_json"] in rows, printed
    assert (tmp_path / "out" / "ingest_summary.json").is_file()


def test_ingest_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: landing zone {tmp_path / 'nope'} is not a folder (missing or not a directory)\n"
    assert captured.out == ""  # no progress bar, not even its empty line


def test_ingest_prints_how_the_export_differs_from_its_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "Patient.ndjson").write_bytes(b'{"resourceType":"Patient","id":"p1"}\n')
    (landing / "manifest.json").write_text(
        '{"transactionTime": "2025-01-01T00:00:00Z", "output": [{"type": "Patient", "url": "https://x/Patient.ndjson",'
        ' "count": 1}, {"type": "Observation", "url": "https://x/Observation.ndjson", "count": 4}]}')
    main(["ingest", str(tmp_path / "landing"), "--out", str(tmp_path / "out"), "--workers", "1"])
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "FHIR export time (manifest.json transactionTime): 2025-01-01T00:00:00 UTC" in printed
    assert ("the landing zone does not match its manifest (a copy cut short?): Observation.ndjson: listed in "
            "fhir/manifest.json, not in the landing zone") in printed
    assert "1 in = 1 out + 0 quarantined (balanced)" in printed


def test_ingest_reads_dates_on_the_sites_clock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import polars as pl

    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "Patient.ndjson").write_bytes(b'{"resourceType":"Patient","id":"p1","deceasedDateTime":"2020-05-01"}\n')
    main(["ingest", str(tmp_path / "landing"), "--out", str(tmp_path / "out"), "--workers", "1",
          "--timezone", "America/Chicago"])
    assert "dates, and times without an offset, read on the America/Chicago clock" in capsys.readouterr().out
    # The end of 1 May in Chicago (CDT, UTC-5).
    assert pl.read_parquet(tmp_path / "out" / "patients.parquet")["death_time"].to_list() == [
        datetime(2020, 5, 2, 4, 59, 59, 999999)]
    monkeypatch.setenv("COHORTCAST_SITE_TIMEZONE", "Chicago")
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", str(tmp_path / "landing"), "--out", str(tmp_path / "out2")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: site time zone 'Chicago' is not an IANA time zone name "
                                               "(expected like 'America/Chicago' or 'UTC')")


def test_ingest_lists_the_codes_charted_in_more_than_one_unit(
        shared_fhir_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ingest", str(shared_fhir_dir / "synthea-bundles"), "--out", str(tmp_path / "out"), "--workers", "1"])
    printed = capsys.readouterr().out
    assert "codes in more than one unit: 1" in printed
    assert "the model's inputs convert a value into its code's main unit where UCUM allows" in printed
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in printed.splitlines()]
    assert ["LOINC//33914-3", "mL/min/{1.73_m2} (86), mL/min (20, kept apart)"] in rows, printed


def test_a_unit_in_square_brackets_is_printed_not_read_as_markup(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def weight(rid: str, value: float, unit: str) -> str:
        return json.dumps({
            "resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2020-01-01", "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit}})

    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    lines = ['{"resourceType":"Patient","id":"p1"}', weight("o1", 70, "kg"), weight("o2", 154, "[lb_av]")]
    (landing / "export.ndjson").write_text("\n".join(lines) + "\n")
    main(["ingest", str(tmp_path / "landing"), "--out", str(tmp_path / "out"), "--workers", "1"])
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()]
    assert ["LOINC//29463-7", "[lb_av] (1), kg (1, converted)"] in rows
