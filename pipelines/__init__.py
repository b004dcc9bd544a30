"""cohortcast orchestration: Dagster assets, checks, resources, schedules and the ``cohortcast`` CLI.

The only layer that knows about Dagster, storage locations and environment variables.
"""
