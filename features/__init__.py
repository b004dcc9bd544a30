"""cohortcast feature layer: pure functions from landing-zone files to model-ready tables.

Nothing here imports Dagster, reads environment variables or touches a path it was not given.
"""
