"""Data sets: one reader per layout, each returning :class:`ExamRecord` lists.

==============  ==============================================  ===========================
format          layout                                          module
==============  ==============================================  ===========================
``vindr``       VinDr-Mammo (``breast-level_annotations.csv``)  :mod:`.vindr`
``csv``         a generic CSV, one row per image                :mod:`.csv`
``cbis-ddsm``   CBIS-DDSM case descriptions + TCIA tree         :mod:`.cbis_ddsm`
``rsna``        RSNA Screening Mammography (Kaggle 2022)        :mod:`.rsna`
``cmmd``        The Chinese Mammography Database (TCIA)         :mod:`.cmmd`
``inbreast``    INbreast                                        :mod:`.inbreast`
==============  ==============================================  ===========================

:mod:`.records` holds the record and the parsing every reader shares (no reader imports
another, nothing here imports this package back); :mod:`.tables` reads the tables as the
public sets publish them; :mod:`.cache` is the torch Dataset over the preprocessing cache
(the only module here that imports torch; import it from there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from inference.datasets.cbis_ddsm import read_cbis_ddsm
from inference.datasets.cmmd import read_cmmd
from inference.datasets.csv import read_csv
from inference.datasets.inbreast import read_inbreast
from inference.datasets.records import (
    TEST_SPLITS,
    TRAIN_SPLITS,
    ExamRecord,
    parse_birads,
    parse_density,
    parse_diagnosis,
    parse_laterality,
    parse_view,
    select_split,
)
from inference.datasets.rsna import read_rsna
from inference.datasets.vindr import read_vindr

#: ``--format`` name -> reader (``mammo-node train / evaluate / calibrate / prepare``).
READERS: dict[str, Callable[[str | Path], list[ExamRecord]]] = {
    "vindr": read_vindr,
    "csv": read_csv,
    "cbis-ddsm": read_cbis_ddsm,
    "rsna": read_rsna,
    "cmmd": read_cmmd,
    "inbreast": read_inbreast,
}
FORMATS: list[str] = list(READERS)


def read_dataset(data: str | Path, fmt: str = "vindr") -> list[ExamRecord]:
    """Exams of a data set in one of the layouts of :data:`READERS`."""
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r} ({', '.join(READERS)})")
    return READERS[fmt](data)


__all__ = [
    "FORMATS",
    "READERS",
    "TEST_SPLITS",
    "TRAIN_SPLITS",
    "ExamRecord",
    "parse_birads",
    "parse_density",
    "parse_diagnosis",
    "parse_laterality",
    "parse_view",
    "read_cbis_ddsm",
    "read_cmmd",
    "read_csv",
    "read_dataset",
    "read_inbreast",
    "read_rsna",
    "read_vindr",
    "select_split",
]
