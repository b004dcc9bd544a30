"""cohortcast orchestration: Dagster assets, checks, resources, schedules and the ``cohortcast`` CLI.

The only layer that knows about Dagster, storage locations and environment variables.
"""

import warnings

from dagster import PreviewWarning

# Asset checks on task partitions are a Dagster preview feature, used on purpose: its warning,
# printed at every import, would bury the CLI's own one-line messages.
warnings.filterwarnings("ignore", category=PreviewWarning)
