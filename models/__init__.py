"""cohortcast model layer: the fusion transformer, baselines, training, scoring and metrics.

Depends on ``features`` only; never on Dagster, storage or environment variables.
"""
