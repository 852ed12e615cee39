"""How a mammogram's header says which view it is: laterality, view, view modifiers, For
Processing. The one classifier of the project: the node's exam assembly
(:mod:`node.assembly`), the Python API (:meth:`inference.api.MammoModel.predict_exam`) and the
data readers (:mod:`inference.datasets`) all use it.

* laterality: ImageLaterality (0020,0062), else Laterality (0020,0060), else a laterality
  prefix inside ViewPosition ("RCC", "L MLO", as some older systems write it);
* view: ViewCodeSequence (0054,0220) code (SNOMED CT or the legacy SNOMED-RT "SRT" codes),
  else ViewPosition (0018,5101);
* view modifiers (spot compression, magnification, implant displaced, ...) in
  ViewModifierCodeSequence (inside the view code item or at top level) or as ViewPosition
  suffixes make the image an *extra* view;
* image kind (:func:`image_kind`): conventional 2D, synthesized 2D (Image Type value
  ``GENERATED_2D``, PS3.3 C.8.11.7.1.4; on systems older than that only the vendor's name in
  SeriesDescription / ProtocolName / the vendor's private attributes: Hologic C-View and
  Intelligent 2D, GE V-Preview, Siemens Insight 2D, Fujifilm S-View), tomosynthesis volume,
  tomosynthesis projection, For Processing;
* implant: BreastImplantPresent (0028,1300) YES, or an implant-displaced (ID) view.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MAMMO_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
BREAST_PROJECTION_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
BREAST_PROJECTION_PROCESSING = "1.2.840.10008.5.1.4.1.1.13.1.5"
MAMMO_SOP_CLASSES = (MAMMO_FOR_PRESENTATION, MAMMO_FOR_PROCESSING)
#: Breast image SOP classes the node classifies (a volume or a projection fills no slot
#: itself; a volume may give a computed 2D image, [grouping] volume_2d).
BREAST_SOP_CLASSES = (
    *MAMMO_SOP_CLASSES,
    BREAST_TOMOSYNTHESIS,
    BREAST_PROJECTION_PRESENTATION,
    BREAST_PROJECTION_PROCESSING,
)

#: Image kinds, in the default reading preference ([grouping] prefer): a slot is filled by
#: the first kind present; "computed" is a 2D image the node makes from a volume.
IMAGE_KINDS = ("conventional", "synthesized", "for_processing", "volume", "projection", "computed")
#: Kinds that may fill a slot directly (a site may reorder them).
SLOT_KINDS = ("conventional", "synthesized", "for_processing")
KIND_LABELS = {
    "conventional": "conventional 2D",
    "synthesized": "synthesized 2D",
    "for_processing": "For Processing 2D",
    "volume": "tomosynthesis volume",
    "projection": "tomosynthesis projection",
    "computed": "computed 2D from the tomosynthesis volume",
}

#: Vendor names of a synthesized 2D image (series names, protocol names, private
#: attributes of systems older than GENERATED_2D): Hologic C-View / Intelligent 2D (I2D),
#: GE V-Preview, Siemens Insight 2D, Fujifilm S-View; generic "synthesized / synthetic 2D".
_SYNTH_NAME = re.compile(
    r"(?<![A-Z0-9])(C[\s_-]?VIEW|INTELLIGENT[\s_-]?2D|I2D|V[\s_-]?PREVIEW|INSIGHT[\s_-]?2D"
    r"|S[\s_-]?VIEW|SYNTHE(?:SI[SZ]ED|TIC)[\s_-]?2D|GENERATED[\s_-]?2D|2D[\s_-]?SYNTHE\w*)"
    r"(?![A-Z0-9])"
)
#: Header texts where a synthesized image's vendor name is found.
_SYNTH_TEXTS = (
    "SeriesDescription",
    "ProtocolName",
    "AcquisitionDeviceProcessingDescription",
    "DerivationDescription",
    "ImageComments",
    "PerformedProcedureStepDescription",
)
#: The vendors' own attributes where systems older than GENERATED_2D name a synthesized
#: image: (vendor, private creator, group) of each private block read. A block is found by
#: its creator (PS3.5 7.8.1: the creator element (gggg,00xx) reserves the elements
#: (gggg,xx00-xxFF); the same attribute has another element number in another file), with
#: ``Dataset.private_block``; only its text values are read. Creators and groups as
#: pydicom's private dictionary lists them for these systems (Hologic Selenia Dimensions /
#: 3Dimensions, GE Senographe / Pristina, Siemens Mammomat, Fujifilm FDR / Amulet); a site
#: with another convention adds a row.
VENDOR_PRIVATE_BLOCKS: tuple[tuple[str, str, int], ...] = (
    ("Hologic", "HOLOGIC, Inc.", 0x0019),
    ("GE", "GEMS_SENO_02", 0x0045),  # (0045,xx1B) Clinical View
    ("GE", "GEMS_IDEN_01", 0x0009),  # (0009,xx17) Series Description
    ("Siemens", "SIEMENS MED MG", 0x0029),
    ("Fujifilm", "FDMS 1.0", 0x0019),  # (0019,xx30) Menu Character String
    ("Fujifilm", "FDMS 1.0", 0x0009),
)
_PRIVATE_TEXT_VRS = ("LO", "SH", "ST", "LT", "CS", "UT")

# CID 4014 "View for Mammography": SNOMED CT and legacy SNOMED-RT codes -> abbreviation.
VIEW_CODES: dict[str, str] = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399260004": "ML",
    "R-10224": "ML",
    "399352003": "LM",
    "R-10228": "LM",
    "399099002": "LMO",
    "R-10230": "LMO",
    "399192008": "XCCL",
    "R-1024A": "XCCL",
    "399101009": "XCCM",
    "R-1024B": "XCCM",
    "399188001": "SIO",
    "R-102D0": "SIO",
    "441555000": "ISO",
    "R-40AAA": "ISO",
    "399196006": "FB",
    "R-10244": "FB",
    "127457009": "SPECIMEN",
    "G-8310": "SPECIMEN",
}
# CID 4015 "View Modifier for Mammography".
MODIFIER_CODES: dict[str, str] = {
    "399055006": "S",
    "R-102D7": "S",  # spot compression
    "399163009": "M",
    "R-102D6": "M",  # magnification
    "399209000": "ID",
    "R-102D5": "ID",  # implant displaced
    "399226006": "RM",
    "R-102D4": "RM",
    "415670009": "RS",
    "R-102C9": "RS",
    "399197002": "RL",
    "R-102D3": "RL",
    "414493004": "RI",
    "R-102CA": "RI",
    "399110001": "TAN",
    "R-102C2": "TAN",
    "399011000": "AT",
    "R-102D1": "AT",
    "399161006": "CV",
    "R-102D2": "CV",
    "442581004": "NP",
    "R-40AB3": "NP",
    "442580003": "AX",
    "R-40AB2": "AX",
    "441752004": "AC",
    "P2-00161": "AC",
    "442593008": "IMF",
    "R-40ABE": "IMF",
}
KNOWN_VIEWS = set(VIEW_CODES.values()) | {"AT", "CV"}


@dataclass
class ViewInfo:
    """Classification of one instance."""

    role: str  # candidate | extra | other | unclassified
    laterality: str | None = None
    view: str | None = None
    modifiers: list[str] = field(default_factory=list)
    for_processing: bool = False
    note: str | None = None
    #: One of :data:`IMAGE_KINDS` (None: not a breast image).
    kind: str | None = None
    #: BreastImplantPresent YES or an implant-displaced view.
    implant: bool = False

    @property
    def slot(self) -> str | None:
        if self.role == "candidate":
            return f"{self.laterality}-{self.view}"
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    return str(value).strip().upper()


def _codes(seq: Any) -> list[str]:
    out = []
    for item in seq or []:
        code = str(getattr(item, "CodeValue", "") or getattr(item, "LongCodeValue", "")).strip()
        if code:
            out.append(code)
    return out


def _split_view(token: str) -> tuple[str | None, str | None, list[str]]:
    """ "RMLO" -> (R, MLO, []), "CCID" -> (None, CC, [ID]), "XCCL" -> (None, XCCL, [])."""
    if token in KNOWN_VIEWS:
        return None, token, []
    if token[:1] in ("L", "R") and token[1:] in KNOWN_VIEWS:
        return token[0], token[1:], []
    if token.endswith("ID"):
        lat, view, mods = _split_view(token[:-2])
        if view:
            return lat, view, [*mods, "ID"]
    return None, None, []


def parse_view_position(text: str) -> tuple[str | None, str | None, list[str]]:
    """Split a ViewPosition such as "CC", "RMLO", "L CC", "CC ID" into its parts."""
    tokens = [t for t in re.split(r"[\s\-_/]+", text.strip().upper()) if t]
    if not tokens:
        return None, None, []
    lat = None
    if tokens[0] in ("L", "R") and len(tokens) > 1:
        lat, tokens = tokens[0], tokens[1:]
    lat2, view, mods = _split_view(tokens[0])
    if view is None:
        return None, None, []
    return lat or lat2, view, [*mods, *tokens[1:]]


def classify(ds: Dataset, any_sop_class: bool = False) -> ViewInfo:
    """Classify a dataset's header into a :class:`ViewInfo`. Never raises on bad values.

    ``any_sop_class``: classify the header whatever its SOP class (the Python API reads
    whatever it is given); the node only takes 2-D mammography SOP classes."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in BREAST_SOP_CLASSES and not any_sop_class:
        return ViewInfo(role="other")
    kind = image_kind(ds)
    for_processing = kind == "for_processing"

    # View: the code first, then ViewPosition.
    view = None
    modifiers: list[str] = []
    vcs = ds.get("ViewCodeSequence", None)
    for code in _codes(vcs):
        view = VIEW_CODES.get(code)
        if view:
            break
    for item in vcs or []:
        modifiers += [
            MODIFIER_CODES.get(c, c) for c in _codes(item.get("ViewModifierCodeSequence"))
        ]
    modifiers += [MODIFIER_CODES.get(c, c) for c in _codes(ds.get("ViewModifierCodeSequence"))]
    vp_lat, vp_view, vp_mods = parse_view_position(_text(ds, "ViewPosition"))
    if view is None:
        view = vp_view
    modifiers += [m for m in vp_mods if m not in modifiers]

    laterality = None
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword)
        if value:
            laterality = value
            break
    if laterality is None:
        laterality = vp_lat or frame_laterality(ds)

    info = ViewInfo(
        role="candidate",
        laterality=laterality,
        view=view,
        modifiers=modifiers,
        for_processing=for_processing,
        kind=kind,
        implant=_text(ds, "BreastImplantPresent") == "YES" or "ID" in modifiers,
    )
    problems = []
    if laterality not in ("L", "R"):
        problems.append(
            "laterality missing" if not laterality else f"laterality {laterality!r} is not L or R"
        )
    if view is None:
        raw = _text(ds, "ViewPosition")
        problems.append(f"unknown view (ViewPosition {raw!r})" if raw else "view missing")
    if kind in ("volume", "projection"):
        # Not a 2-D input itself; a volume of a screening view may give a computed one.
        info.role = "extra"
        info.note = f"{KIND_LABELS[kind]}: not a 2-D input" + (
            f" ({', '.join(problems)})" if problems else ""
        )
        return info
    if problems:
        info.role = "unclassified"
        info.note = ", ".join(problems)
        return info
    if view not in ("CC", "MLO"):
        info.role = "extra"
        info.note = f"{view} view: not one of the four screening views"
    elif modifiers:
        info.role = "extra"
        info.note = f"{view} with modifier {'/'.join(modifiers)}: not a screening view"
    return info


def frame_laterality(ds: Dataset) -> str | None:
    """FrameLaterality of the shared (else the first per-frame) functional groups, where an
    enhanced multi-frame image (a tomosynthesis volume) keeps its laterality."""
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in (ds.get(seq, None) or [])[:1]:
            for anat in item.get("FrameAnatomySequence", None) or []:
                value = str(anat.get("FrameLaterality", "") or "").strip().upper()
                if value in ("L", "R"):
                    return value
    return None


def vendor_private_texts(ds: Dataset) -> list[tuple[str, str]]:
    """(vendor, upper-case text) of the text values in the vendors' private blocks
    (:data:`VENDOR_PRIVATE_BLOCKS`), each block looked up by its private creator. Other
    private data is not read."""
    out: list[tuple[str, str]] = []
    for vendor, creator, group in VENDOR_PRIVATE_BLOCKS:
        try:
            block = ds.private_block(group, creator)
        except (KeyError, ValueError):
            continue  # no block of that creator in this header
        first = block.block_start
        # Tags first: only the block's own elements are converted (a header read with
        # deferred values cannot be walked element by element without reading them).
        for tag in [
            t for t in ds.keys() if t.group == group and first <= t.element <= first + 0xFF
        ]:
            try:
                elem = ds[tag]
                if elem.VR not in _PRIVATE_TEXT_VRS:
                    continue
                value = elem.value
            except Exception:  # a malformed private value is not worth a refusal
                continue
            values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
            out += [(vendor, v.upper()) for v in values if isinstance(v, str) and v][:4]
    return out


def synthesized_reason(ds: Dataset) -> str | None:
    """Why this 2D mammogram is a synthesized one (None: it is not): Image Type
    GENERATED_2D, or a vendor's name in its series / protocol names or private data."""
    raw = ds.get("ImageType", None) or []
    image_type = [str(v).strip().upper() for v in ([raw] if isinstance(raw, str) else raw)]
    if "GENERATED_2D" in image_type:
        return "Image Type GENERATED_2D"
    for keyword in _SYNTH_TEXTS:
        m = _SYNTH_NAME.search(_text(ds, keyword))
        if m:
            return f"{keyword} {m.group(0)!r}"
    for vendor, text in vendor_private_texts(ds):
        m = _SYNTH_NAME.search(text)
        if m:
            return f"{vendor} private attribute {m.group(0)!r}"
    return None


def image_kind(ds: Dataset) -> str:
    """The image kind of a breast image's header (one of :data:`IMAGE_KINDS`)."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class == BREAST_TOMOSYNTHESIS:
        return "volume"
    if sop_class in (BREAST_PROJECTION_PRESENTATION, BREAST_PROJECTION_PROCESSING):
        return "projection"
    if synthesized_reason(ds):
        return "synthesized"
    if sop_class == MAMMO_FOR_PROCESSING or _text(ds, "PresentationIntentType") == "FOR PROCESSING":
        return "for_processing"
    return "conventional"
