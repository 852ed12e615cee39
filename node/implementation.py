"""Who the node says it is in DICOM: its own Implementation Class UID and Implementation
Version Name, in one place.

They go into every association the node accepts or requests (A-ASSOCIATE-AC / -RQ user
information, PS3.7 D.3.3.2: the listener, C-MOVE / C-GET sub-operations, export, the status
check, the dashboard's C-ECHO test) and into the File Meta Information of every file the node
writes (PS3.10 7.1: the results it builds, a received dataset whose file meta it writes), in
place of pynetdicom's, pydicom's or highdicom's. A peer's log or a file's meta then names
mammo-node and its release.

The UID is in the 2.25 form of a name-based UUID, from the same namespace as the node's result
UIDs (:func:`node.results.identity.result_uid`); it stays the same across releases, the
version name says which one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from node import __version__

if TYPE_CHECKING:
    from pynetdicom import AE

#: uuid5(node.results.identity._UID_NAMESPACE, "mammo-node|implementation-class") in 2.25 form.
IMPLEMENTATION_CLASS_UID = "2.25.147535493943084717698931743661213921952"
#: SH, at most 16 characters: "MAMMO_NODE_020" for 0.2.0.
IMPLEMENTATION_VERSION_NAME = "MAMMO_NODE_" + "".join(c for c in __version__ if c.isdigit())

if len(IMPLEMENTATION_VERSION_NAME) > 16:  # pragma: no cover - a version like 10.20.30
    raise RuntimeError(
        f"Implementation Version Name {IMPLEMENTATION_VERSION_NAME!r} is longer than 16 characters"
    )


def application_entity(ae_title: str) -> AE:
    """A pynetdicom ``AE`` that negotiates as mammo-node (every AE the node builds)."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


def stamp_file_meta(ds: Dataset | FileMetaDataset) -> None:
    """Name the node as the implementation that writes ``ds`` (a Dataset with its
    ``file_meta``, or a FileMetaDataset)."""
    meta = ds if isinstance(ds, FileMetaDataset) else ds.file_meta
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
