"""Landing-zone assets: where the hospital's files arrive.

Stage: source data. In: run configuration. Out: ``simulated_landing_zone``, a simulated hospital
written into the workspace's ``landing/`` folder in the landing-zone contracts (the embedded default
data of ``cohortcast demo``). A real deployment points the ingest at its own export instead.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
import dagster as dg

from features.simulate import check_replaceable_simulation, simulate_hospital
from pipelines.config import SimulationRunConfig
from pipelines.resources import Workspace


@dg.asset(group_name="landing", kinds={"fhir", "parquet"})
def simulated_landing_zone(config: SimulationRunConfig, workspace: Workspace) -> dg.MaterializeResult:
    """A simulated hospital's export: FHIR NDJSON and Bundles, notes, genomics, imaging, truth. It
    replaces only an earlier simulation, never an export put in ``landing/``."""
    check_replaceable_simulation(workspace.landing_dir)
    summary = simulate_hospital(
        workspace.landing_dir, config.to_simulation_config(), overwrite=True, workers=config.workers
    )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(summary.out_dir)),
            "patients": summary.n_patients,
            "fhir_resources": sum(summary.resources_by_type.values()),
            "transaction_bundles": summary.n_bundles,
            "table_notes": summary.n_table_notes,
            "imaging_studies": summary.n_imaging_studies,
            "genotyped_patients": summary.n_genotyped,
            "event_rate_within_horizon": summary.event_rate_within_horizon,
        }
    )
