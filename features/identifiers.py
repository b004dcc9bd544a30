"""Patient identifiers: the source system's ``patient_id`` and the MEDS ``subject_id``.

Stage: shared. In: FHIR ``Patient.id`` strings. Out: ``int64`` subject ids. MEDS asks for an integer
subject id; deriving it from a hash of the source id (rather than numbering patients in the order
they were read) keeps it stable across export batches, re-runs and machines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa


def subject_id_for(patient_id: str) -> int:
    """Return the MEDS subject id of one source patient id.

    The first 8 bytes of the BLAKE2b digest, shifted to a non-negative ``int64``. With 63 bits the
    chance of any collision among ten million patients is below 1e-5.

    Examples
    --------
    >>> subject_id_for("129c6ac7-8d06-89de-ad63-0204a93e76c3")
    3857833796827309321
    """
    digest = hashlib.blake2b(patient_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def subject_ids(patient_ids: Iterable[str]) -> pa.Array:
    """Return the subject ids of many patient ids, in order, as an ``int64`` array."""
    return pa.array([subject_id_for(patient_id) for patient_id in patient_ids], type=pa.int64())
