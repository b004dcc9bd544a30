"""External systems and storage locations, as Dagster resources.

Stage: orchestration. In: the deployment's environment (``COHORTCAST_WORKSPACE``,
``COHORTCAST_SITE_TIMEZONE``). Out: the
resources every asset receives. This is the only module of cohortcast that reads environment
variables.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from features.errors import CohortcastError
from features.fhir.validate import site_zone

DEFAULT_WORKSPACE = "workspace"
DEFAULT_SITE_TIMEZONE = "UTC"


class Workspace(dg.ConfigurableResource):  # type: ignore[misc]
    """The folder a cohortcast deployment reads from and writes to.

    ``landing/`` is the landing zone (the hospital's export, or the simulator's), ``batches/`` the
    nightly exports as they land, and every later stage writes under its own sub-folder.
    """

    root: str = DEFAULT_WORKSPACE
    # The site's IANA time zone (America/Chicago): FHIR dates, and times without an offset in the
    # exports, are read on its clock; the nightly schedule runs on it too.
    site_timezone: str = DEFAULT_SITE_TIMEZONE

    @property
    def root_dir(self) -> Path:
        return Path(self.root).absolute()

    @property
    def landing_dir(self) -> Path:
        return self.root_dir / "landing"

    @property
    def warehouse_dir(self) -> Path:
        return self.root_dir / "warehouse"

    @property
    def batches_dir(self) -> Path:
        """Where landing batches arrive, one export folder each: ``batches/<name>/``."""
        return self.root_dir / "batches"

    def batch_warehouse_dir(self, batch: str) -> Path:
        """Where a landing batch is ingested, before it is promoted to ``warehouse/``."""
        return self.warehouse_dir / "batches" / batch


def workspace_root_from_environment() -> str:
    """The workspace folder named by ``COHORTCAST_WORKSPACE``, else ``./workspace``."""
    return os.environ.get("COHORTCAST_WORKSPACE", DEFAULT_WORKSPACE)


def site_timezone_from_environment() -> str:
    """The site's time zone named by ``COHORTCAST_SITE_TIMEZONE`` (unset or empty: UTC).

    Raises
    ------
    CohortcastError
        When the variable names no IANA time zone: Dagster's definitions, the schedule's clock
        included, are not loaded on a wrong one.
    """
    name = os.environ.get("COHORTCAST_SITE_TIMEZONE") or DEFAULT_SITE_TIMEZONE
    try:
        site_zone(name)
    except CohortcastError as exc:
        raise CohortcastError(f"COHORTCAST_SITE_TIMEZONE: {exc}") from None
    return name


def resources_for_deployment(workspace_root: str | None = None,
                             site_timezone: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """Return the resources of one deployment; ``workspace_root`` and ``site_timezone`` override
    the environment."""
    return {"workspace": Workspace(root=workspace_root or workspace_root_from_environment(),
                                   site_timezone=site_timezone or site_timezone_from_environment())}
