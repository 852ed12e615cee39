"""Result objects for one exam reading: SR documents, the presentation state, attention-map
Secondary Captures and Parametric Maps.

One module per template, highdicom's manner: ``vocabulary`` (every code, once), ``identity``
(UIDs, manufacturer, series), ``reading`` (what the builders take, checked), ``mammo_cad``
(TID 4000 + 4006), ``tid1500``, ``sc``, ``parametric_map``, ``presentation_state`` (GSPS).
This module re-exports what callers import.
"""

from __future__ import annotations

from node.results.identity import (
    MANUFACTURER,
    PM_SERIES_NUMBER,
    PR_SERIES_NUMBER,
    SC_SERIES_NUMBER,
    SOFTWARE_VERSION,
    SR_SERIES_NUMBER,
    result_uid,
)
from node.results.mammo_cad import MAMMO_CAD_SR, MammographyCADSR, build_mammo_cad
from node.results.parametric_map import PM_MAX_SIDE, build_parametric_map
from node.results.presentation_state import GSPS, build_presentation_state
from node.results.reading import (
    BreastSummary,
    Mark,
    ReadingSummary,
    check_reading,
    kind_label,
    overall_impression,
    score_line,
    views_read,
)
from node.results.sc import SC_MAX_ROWS, build_sc, render_overlay
from node.results.tid1500 import build_tid1500
from node.results.vocabulary import BIRADS_SCT, PRIVATE_SCHEME, SCORE_UNIT, birads_code

__all__ = [
    "BIRADS_SCT",
    "GSPS",
    "MAMMO_CAD_SR",
    "MANUFACTURER",
    "PM_MAX_SIDE",
    "PM_SERIES_NUMBER",
    "PRIVATE_SCHEME",
    "PR_SERIES_NUMBER",
    "SCORE_UNIT",
    "SC_MAX_ROWS",
    "SC_SERIES_NUMBER",
    "SOFTWARE_VERSION",
    "SR_SERIES_NUMBER",
    "BreastSummary",
    "Mark",
    "MammographyCADSR",
    "ReadingSummary",
    "birads_code",
    "build_mammo_cad",
    "build_parametric_map",
    "build_presentation_state",
    "build_sc",
    "build_tid1500",
    "check_reading",
    "kind_label",
    "overall_impression",
    "render_overlay",
    "result_uid",
    "score_line",
    "views_read",
]
