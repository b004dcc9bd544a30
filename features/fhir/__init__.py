"""FHIR R4 ingest: read Bulk-FHIR NDJSON and Bundles, validate, flatten to normalized tables.

Stage: ingest. In: the ``fhir/`` folder of a landing zone. Out: rows of the normalized FHIR tables
of :mod:`features.schemas` and quarantine rows. :mod:`features.ingest` drives it.
"""
