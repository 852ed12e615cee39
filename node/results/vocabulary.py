"""Every code the result objects use, defined once (highdicom's ``sr/coding.py`` manner).

Standard codes first (DCM, SCT, UCUM), then DICOM's context groups the node reports from
(CID 6026 BI-RADS assessment, CID 6000 breast composition), then the node's private coding
scheme, for concepts DICOM has no code for. A builder never types a code value or a meaning:
it imports it from here, so the two SRs, the presentation state and the captions cannot drift.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from inference.tasks import DENSITY_CLASSES


def _c(value: str, scheme: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, scheme, meaning)


#: The node's private coding scheme designator (PS3.16 8.2: "99" prefix = private).
PRIVATE_SCHEME = "99MAMMONODE"

# --------------------------------------------------------------------------- units
NO_UNITS = _c("1", "UCUM", "no units")
PERCENT = _c("%", "UCUM", "percent")
#: 0-100 scores (exam, breast, region): UCUM's arbitrary "{score}" annotation.
SCORE_UNIT = _c("{score}", "UCUM", "score")
PIXELS = _c("{pixels}", "UCUM", "pixels")

# --------------------------------------------------------------------------- SNOMED CT
YES = _c("373066001", "SCT", "Yes")
NO = _c("373067005", "SCT", "No")
LEFT = _c("7771000", "SCT", "Left")
RIGHT = _c("24028007", "SCT", "Right")
LATERALITY = {"L": LEFT, "R": RIGHT}
BREAST = hd.sr.CodedConcept.from_code(codes.SCT.Breast)
MAMMOGRAPHY = _c("71651007", "SCT", "Mammography")
CRANIO_CAUDAL = _c("399162004", "SCT", "cranio-caudal")
MEDIO_LATERAL_OBLIQUE = _c("399368009", "SCT", "medio-lateral oblique")
VIEW = {"CC": CRANIO_CAUDAL, "MLO": MEDIO_LATERAL_OBLIQUE}
#: A mark's finding type: a region the AI finds suspicious (SNOMED "Mass" is a diagnosis the
#: model does not make; "Abnormal" says what a region score is).
ABNORMAL = _c("263654008", "SCT", "Abnormal")

# --------------------------------------------------------------------------- DCM
IMAGE_LIBRARY = _c("111028", "DCM", "Image Library")
ORIGINAL_SOURCE = _c("111040", "DCM", "Original Source")
IMAGE_LATERALITY = _c("111027", "DCM", "Image Laterality")
IMAGE_VIEW = _c("111031", "DCM", "Image View")
INDIVIDUAL_IMPRESSION = _c("111034", "DCM", "Individual Impression/Recommendation")
RENDERING_INTENT = _c("111056", "DCM", "Rendering Intent")
PRESENTATION_REQUIRED = _c(
    "111150", "DCM", "Presentation Required: Rendering device is expected to present"
)
PRESENTATION_OPTIONAL = _c("111151", "DCM", "Presentation Optional: Rendering device may present")
PROBABILITY_OF_CANCER = _c("111047", "DCM", "Probability of cancer")
CAD_SUMMARY = _c("111017", "DCM", "CAD Processing and Findings Summary")
WITH_FINDINGS = _c("111242", "DCM", "All algorithms succeeded; with findings")
WITHOUT_FINDINGS = _c("111241", "DCM", "All algorithms succeeded; without findings")
IMPRESSION = _c("121073", "DCM", "Impression")
SUMMARY_OF_DETECTIONS = _c("111064", "DCM", "Summary of Detections")
SUMMARY_OF_ANALYSES = _c("111065", "DCM", "Summary of Analyses")
SUCCEEDED = _c("111222", "DCM", "Succeeded")
NOT_ATTEMPTED = _c("111225", "DCM", "Not Attempted")
SUCCESSFUL_DETECTIONS = _c("111063", "DCM", "Successful Detections")
SUCCESSFUL_ANALYSES = _c("111062", "DCM", "Successful Analyses")
DETECTION_PERFORMED = _c("111022", "DCM", "Detection Performed")
ANALYSIS_PERFORMED = _c("111004", "DCM", "Analysis Performed")
ALGORITHM_NAME = _c("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = _c("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = _c("111002", "DCM", "Algorithm Parameters")
MAMMOGRAPHY_CAD_REPORT = _c("111036", "DCM", "Mammography CAD Report")
SINGLE_IMAGE_FINDING = _c("111059", "DCM", "Single Image Finding")
CERTAINTY_OF_FINDING = _c("111012", "DCM", "Certainty of Finding")
CENTER = _c("111010", "DCM", "Center")
OUTLINE = _c("111041", "DCM", "Outline")
#: A mark's Single Image Finding (CID 6014): the model marks regions, it does not name a
#: lesion type.
SELECTED_REGION = _c("111099", "DCM", "Selected region")
OVERALL_ASSESSMENT = _c("111413", "DCM", "Overall Assessment")
DEVICE = hd.sr.CodedConcept.from_code(codes.DCM.Device)
IMAGING_MEASUREMENT_REPORT = hd.sr.CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
ENGLISH_US = _c("en-US", "RFC5646", "English (United States)")

#: BI-RADS categories as DICOM's Mammography Assessment context group (CID 6026) codes them:
#: SNOMED CT "Mammography assessment (Category N)". Code meanings are shortened to the 64
#: characters a Code Meaning (LO) holds.
BIRADS_SCT = {
    "1": ("397140005", "Mammography assessment (Category 1) - Negative"),
    "2": ("397141009", "Mammography assessment (Category 2) - Benign finding"),
    "3": ("397143007", "Mammography assessment (Category 3) - Probably benign finding"),
    "4": ("397144001", "Mammography assessment (Category 4) - Suspicious abnormality"),
    "5": ("397145000", "Mammography assessment (Category 5) - Suggestive of malignancy"),
}

#: BI-RADS breast density (composition) A-D as DICOM's Breast Composition context group
#: (CID 6000) codes it.
DENSITY_CID6000 = {
    "A": hd.sr.CodedConcept.from_code(codes.CID6000.AlmostEntirelyFat),
    "B": hd.sr.CodedConcept.from_code(codes.CID6000.ScatteredFibroglandularDensities),
    "C": hd.sr.CodedConcept.from_code(codes.CID6000.HeterogeneouslyDense),
    "D": hd.sr.CodedConcept.from_code(codes.CID6000.ExtremelyDense),
}
#: The concept name a density is reported under (DCM 111031-like: "Breast composition").
BREAST_COMPOSITION = _c("129715009", "SCT", "Breast composition")


def birads_code(category: str) -> hd.sr.CodedConcept:
    """A model's BI-RADS class ("BI-RADS 4") as its standard SNOMED CT code. A grouped class
    ("BI-RADS 4-5", of the 3-class tasks) has no single standard code: it keeps a private
    code whose meaning says so."""
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"birads category: expected a class name, got {category!r}")
    n = category.replace("BI-RADS", "").strip()
    if n in BIRADS_SCT:
        value, meaning = BIRADS_SCT[n]
        return _c(value, "SCT", meaning)
    return _c(
        category.replace(" ", "-"),
        PRIVATE_SCHEME,
        f"AI {category} (grouped; no single SNOMED code)"[:64],
    )


def density_code(density: str) -> hd.sr.CodedConcept:
    """A BI-RADS density letter ("A".."D") as its CID 6000 code."""
    try:
        return DENSITY_CID6000[density]
    except KeyError:
        raise ValueError(f"density: expected one of {DENSITY_CLASSES}, got {density!r}") from None


# --------------------------------------------------------------------------- private
def private(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the node's private scheme (meaning cut to the 64 characters of LO)."""
    return _c(value, PRIVATE_SCHEME, meaning[:64])


BREAST_SIDE = private("BREAST", "Breast")
AI_BIRADS = private("AI-BIRADS", "AI BI-RADS category")
AI_DIAGNOSIS = private("AI-DIAGNOSIS", "AI diagnosis")
AI_DENSITY = private("AI-DENSITY", "AI breast density (BI-RADS)")
BREAST_SCORE = private("BREAST-SCORE", "AI breast malignancy score")
EXAM_SCORE = private("EXAM-SCORE", "AI exam malignancy score")
OPERATING_POINT = private("OPERATING-POINT", "Operating point")
ABOVE_OPERATING_POINT = private("ABOVE-OP", "Exam score above the operating point")
REGION_SCORE = private("REGION-SCORE", "AI region score")
IMPLANT = private("IMPLANT", "Implant present")
IMAGE_KIND = private("IMAGE-KIND", "Image kind")
VIEWS_READ = private("VIEWS-READ", "Views read")
MISSING_VIEWS = private("MISSING-VIEWS", "Missing views")
DISCLAIMER = private("DISCLAIMER", "Disclaimer")
FOUR_VIEW_BIRADS = private("FOUR-VIEW-BIRADS", "Four-view BI-RADS analysis")
AI_MARKS = private("AI-MARKS", "AI marks of suspicious regions")


def diagnosis_code(diagnosis: str) -> hd.sr.CodedConcept:
    """A diagnosis class ("malignant") as a private code."""
    return private(diagnosis.upper(), diagnosis)


def probability_of(cls: str) -> hd.sr.CodedConcept:
    """The concept "Probability of <class>" of a BI-RADS or diagnosis class."""
    value = f"P-{cls.replace(' ', '')}" if cls.startswith("BI-RADS") else f"P-{cls.upper()}"
    return private(value, f"Probability of {cls}")


def image_kind_of(slot: str) -> hd.sr.CodedConcept:
    """The concept "Image kind of <view>" (conventional 2D, synthesized 2D, computed)."""
    return private(f"KIND-{slot}", f"Image kind of {slot}")


def image_kind_code(kind: str, label: str) -> hd.sr.CodedConcept:
    """An image kind ("synthesized") as a private code whose meaning is its label."""
    return private(kind.upper(), label)


def fusion_weight_of(slot: str) -> hd.sr.CodedConcept:
    """The concept "Fusion weight of <view>" (the gated attention's weight of a view)."""
    return private(f"W-{slot}", f"Fusion weight of {slot}")
