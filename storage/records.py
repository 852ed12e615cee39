"""Typed records that travel between the node's stages (mercure's ``Task`` style): what a
listener stores, what a worker produced, what an exporter must deliver."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class InstanceRecord:
    """One received instance as the listener validated it: the values of its row."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str  # relative to data_dir
    size_bytes: int
    role: str  # candidate | extra | other | unclassified
    calling_aet: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    modality: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_description: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = None
    series_description: str | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    laterality: str | None = None
    view: str | None = None
    view_modifiers: str | None = None
    for_processing: bool = False
    acquisition_key: str | None = None
    image_kind: str | None = None
    implant: bool = False
    slot: str | None = None
    note: str | None = None

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProducedObject:
    """A result object a worker wrote (SR, SC), to be recorded and delivered."""

    kind: str  # sr-mammo-cad | sr-tid1500 | sc
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str  # relative to data_dir
    modality: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    size_bytes: int = 0
    series_description: str | None = None
    rows: int | None = None
    columns: int | None = None


@dataclass(frozen=True)
class Delivery:
    """One result object due at one destination."""

    id: int
    destination: str
    attempts: int
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    #: A previous attempt was cut off (crash): the destination may already hold it.
    interrupted: bool = False
