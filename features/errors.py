"""Error types raised by the feature and model layers.

Stage: shared. Every error is a ``ValueError`` whose message names the place, what was expected and
what was found, so that the CLI can print it as one line and Dagster can show it as the run's reason.
"""

from __future__ import annotations


class CohortcastError(ValueError):
    """Base class of every error cohortcast raises on purpose about its inputs or settings."""


class SchemaError(CohortcastError):
    """A table does not have the columns or types its contract in ``features.schemas`` asks for."""


class LandingZoneError(CohortcastError):
    """A landing zone or output folder cannot be used at all (missing, unreadable, unwritable)."""


class SimulationError(CohortcastError):
    """The simulator was given settings it cannot honour."""


class CohortDefinitionError(CohortcastError):
    """A task file (cohort, outcome, horizon, treatment) is malformed."""


class TrainingDataError(CohortcastError):
    """A task's inputs cannot train, calibrate or evaluate a model (a split with too few outcomes,
    inputs from another encoder, no follow-up to the horizon)."""


class ModelSettingsError(CohortcastError):
    """Model or training settings that cannot work (heads that do not divide the hidden size, no
    epochs, a run that diverged)."""
