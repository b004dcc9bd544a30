"""Tests that the Dagster definitions load and hold the assets the README names."""

from __future__ import annotations

import dagster as dg
import pytest

from pipelines.definitions import defs


def test_definitions_load_with_every_asset_and_resource() -> None:
    asset_graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in asset_graph.get_all_asset_keys()}
    assert {"simulated_landing_zone", "events", "patients", "cohort", "labels", "event_tokens"} <= keys
    for job in ("ingest", "task_pipeline", "ingest_batch"):
        assert defs.resolve_job_def(job) is not None
    assert {"fusion_model", "deployed_model", "risk_scores", "published_cohort"} <= keys
    assert defs.resolve_schedule_def("nightly_rescore").cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("publish_after_ingest") is not None
    assert "workspace" in defs.resources


def test_dagster_home_turns_telemetry_off() -> None:
    from pathlib import Path

    import yaml

    settings = yaml.safe_load((Path(__file__).resolve().parents[2] / "dagster_home" / "dagster.yaml").read_text())
    assert settings["telemetry"] == {"enabled": False}
    assert isinstance(dg.DagsterInstance, type)


def test_the_site_time_zone_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.resources import resources_for_deployment
    from pipelines.schedules import nightly_schedule

    assert defs.resolve_schedule_def("nightly_rescore").execution_timezone == "UTC"
    monkeypatch.setenv("COHORTCAST_SITE_TIMEZONE", "America/Chicago")
    assert resources_for_deployment()["workspace"].site_timezone == "America/Chicago"
    assert resources_for_deployment(site_timezone="UTC")["workspace"].site_timezone == "UTC"
    job = defs.resolve_job_def("task_pipeline")
    assert nightly_schedule(job, "America/Chicago").execution_timezone == "America/Chicago"


def test_a_site_time_zone_variable_that_names_no_zone_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from features.errors import CohortcastError
    from pipelines.resources import site_timezone_from_environment

    monkeypatch.setenv("COHORTCAST_SITE_TIMEZONE", "")
    assert site_timezone_from_environment() == "UTC"
    # A file name zoneinfo reads, which is no IANA name (polars, the fast path, refuses it).
    monkeypatch.setenv("COHORTCAST_SITE_TIMEZONE", "posix/America/New_York")
    with pytest.raises(CohortcastError, match=r"^COHORTCAST_SITE_TIMEZONE: site time zone 'posix/America/New_York' "
                                              r"is not an IANA time zone name"):
        site_timezone_from_environment()
