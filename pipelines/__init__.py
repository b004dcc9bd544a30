"""cohortcast orchestration: Dagster assets, checks, resources, schedules and the ``cohortcast`` CLI.

The only layer that knows about Dagster, storage locations and environment variables.
"""

import warnings

# Asset checks on task partitions are a Dagster preview feature, used on purpose: its warning,
# printed at every import, would bury the CLI's own one-line messages. Matched by its text, so that
# importing this package (the CLI does, and so does every ingest worker process it starts) does not
# import Dagster.
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec is currently in preview")
