"""Who made a result object and under which UIDs.

Every UID is derived from the exam (StudyInstanceUID), its version and the object's role, so a
retry or a restart rebuilds byte-for-byte the same identities and the PACS never receives a
second copy; a new version of a reading gets new UIDs and references the one it replaces.
"""

from __future__ import annotations

import datetime as dt
import uuid

from pydicom.dataset import Dataset

from node import __version__

MANUFACTURER = "mammo-node"
SOFTWARE_VERSION = f"mammo-node {__version__}"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902  # Mammography CAD SR; TID 1500 is SR_SERIES_NUMBER + 1
PR_SERIES_NUMBER = 9905
PM_SERIES_NUMBER = 9904

_UID_NAMESPACE = uuid.UUID("6f1c7c0e-3d4b-5a8e-9b61-6d616d6d6f00")


def result_uid(study_uid: str, version: int, role: str) -> str:
    """A deterministic UID for ``role`` of version ``version`` of an exam: the 2.25 form of a
    name-based (SHA-1, version 5) UUID, as PS3.5 B.2 allows. The same inputs give the same
    UID in any process, so a retry or a restart never mints a second identity."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{study_uid}|{version}|{role}').int}"


def stamp(ds: Dataset) -> None:
    """Content date / time of now and the node's software version."""
    now = dt.datetime.now()
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.SoftwareVersions = SOFTWARE_VERSION
