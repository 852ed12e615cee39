"""Whole-dataset validation before a C-STORE / STOW-RS success is answered.

A success promises that the file can be read back. pydicom reads lazily, so a dataset cut
short, an element whose length runs past the end, or pixel data shorter than its image would
all parse "fine" as a header and fail later, in the model or in a viewer. This module walks
the whole encoded dataset instead, element by element, without loading any value bigger than
a few bytes (values are skipped with ``seek``; nothing like the pixel data is read):

* every element header is well formed (a known VR in explicit syntaxes) and every defined
  length lies inside its parent (dataset, item, sequence, file);
* sequences and items close properly (delimiters where lengths are undefined), nested at most
  ``max_depth`` deep;
* native Pixel Data holds at least Rows x Columns x Samples x Bits Allocated x Frames bits;
  encapsulated Pixel Data is a sequence of fragment items that ends with its delimiter and
  holds at least one fragment after the offset table;
* an enhanced multi-frame object (its IOD has the Multi-frame Functional Groups module: breast
  tomosynthesis, enhanced CT / MR / PET / XA, segmentations...) carries the Shared and the
  Per-frame Functional Groups Sequences, at most one shared item and exactly Number of Frames
  per-frame items (the walk counts the items; a 2 GB volume's groups are never parsed);
* the dataset ends exactly at the end of the file;
* a Deflated dataset is inflated in a stream to a temporary file (never in memory) and
  refused as soon as it grows past ``max_bytes`` (a 64 KiB "zip bomb" would otherwise become
  hundreds of MB in the daemon).

Refusals are :class:`DatasetInvalid` with the DICOM status to answer (0xC210 for a dataset
that cannot be understood, 0xA700 for one that is too large).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO

from pydicom.datadict import dictionary_VR

from node.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: VRs with a 2-byte reserved field and a 4-byte length in explicit syntaxes (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
              b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float
#: Image attributes the pixel-length check needs: (0028,0002/0008/0010/0011/0100).
_IMAGE_TAGS = {0x00280002: "spp", 0x00280008: "frames", 0x00280010: "rows",
               0x00280011: "cols", 0x00280100: "bits"}

MAX_DEPTH = 32
SOP_CLASS_TAG = 0x00080016
SHARED_GROUPS, PER_FRAME_GROUPS = 0x52009229, 0x52009230
#: SOP classes whose IOD includes the Multi-frame Functional Groups module (PS3.3 A.*, module
#: C.7.6.16, Mandatory): the Shared (Type 2) and Per-frame (Type 1, one item per frame)
#: Functional Groups Sequences must be there.
FUNCTIONAL_GROUP_IODS = {
    "1.2.840.10008.5.1.4.1.1.13.1.3",   # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.13.1.4",   # Breast Projection X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",   # Breast Projection X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.1",   # X-Ray 3D Angiographic Image
    "1.2.840.10008.5.1.4.1.1.13.1.2",   # X-Ray 3D Craniofacial Image
    "1.2.840.10008.5.1.4.1.1.2.1",      # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",      # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.1",      # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",      # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",      # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.130",      # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.128.1",    # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.6.2",      # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.12.1.1",   # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2.1",   # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.66.4",     # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",       # Parametric Map
    "1.2.840.10008.5.1.4.1.1.77.1.6",   # VL Whole Slide Microscopy Image
    "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image
    "1.2.840.10008.5.1.4.1.1.14.1",     # Intravascular OCT Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.14.2",     # Intravascular OCT Image - For Processing
}


class DatasetInvalid(Exception):
    """A dataset refused, with the status to answer and the reason in words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _bad(message: str) -> DatasetInvalid:
    return DatasetInvalid(CANNOT_UNDERSTAND, message)


class _Walker:
    def __init__(self, f: BinaryIO, end: int, implicit: bool, little: bool,
                 max_depth: int) -> None:
        self.f, self.end = f, end
        self.implicit, self.little = implicit, little
        self.max_depth = max_depth
        self.e = "<" if little else ">"
        self.image: dict[str, int] = {}
        self.pixel: tuple[int, int] | None = None  # (tag, length or UNDEFINED)
        self.fragments = 0
        self.sop_class = ""
        self.groups: dict[int, int] = {}  # functional groups sequence -> items

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise _bad(f"dataset ends inside an element (offset {self.f.tell()})")
        return b

    def tag_at(self) -> int:
        g, e = struct.unpack(self.e + "HH", self.read(4))
        return (g << 16) | e

    def header(self, tag: int) -> tuple[bytes | None, int]:
        """VR (None in implicit syntaxes) and length of the element whose tag was read."""
        if self.implicit or (tag >> 16) == 0xFFFE:
            return None, struct.unpack(self.e + "L", self.read(4))[0]
        vr = self.read(2)
        if vr in _LONG_VRS:
            self.read(2)
            return vr, struct.unpack(self.e + "L", self.read(4))[0]
        if vr in _SHORT_VRS:
            return vr, struct.unpack(self.e + "H", self.read(2))[0]
        raise _bad(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR "
                   f"({vr!r}) at offset {self.f.tell() - 2}")

    def skip(self, length: int, limit: int, tag: int) -> None:
        pos = self.f.tell()
        if pos + length > limit:
            raise _bad(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                       f"{max(limit - pos, 0)} present")
        self.f.seek(length, os.SEEK_CUR)

    def dataset(self, limit: int, depth: int, until_item_end: bool = False) -> None:
        """Walk elements until ``limit`` (or an item delimiter for undefined-length items)."""
        while self.f.tell() < limit:
            tag = self.tag_at()
            if tag == ITEM_END:
                if not until_item_end:
                    raise _bad("item delimiter outside an item of undefined length")
                self.read(4)
                return
            if (tag >> 16) == 0xFFFE:
                raise _bad(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at "
                           f"offset {self.f.tell() - 4}")
            if (tag >> 16) == 0x0000:  # PS3.7: the command group never is in a dataset
                raise _bad(f"command group element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in "
                           f"the dataset at offset {self.f.tell() - 4}")
            vr, length = self.header(tag)
            if depth == 0 and tag in _IMAGE_TAGS and 2 <= length <= 16 and vr != b"SQ":
                pos = self.f.tell()
                if pos + length > limit:
                    raise _bad("an image attribute runs past the end of the dataset")
                raw = self.read(length)
                self.f.seek(pos)
                if tag == 0x00280008:  # Number of Frames is IS (text)
                    try:
                        self.image["frames"] = int(raw.decode("ascii").strip("\x00 ") or 1)
                    except ValueError:
                        raise _bad("Number of Frames is not a number") from None
                else:
                    self.image[_IMAGE_TAGS[tag]] = struct.unpack(self.e + "H", raw[:2])[0]
            if depth == 0 and tag == SOP_CLASS_TAG and 0 < length <= 64 and vr != b"SQ":
                pos = self.f.tell()
                if pos + length > limit:
                    raise _bad("SOP Class UID runs past the end of the dataset")
                self.sop_class = self.read(length).decode("ascii", "replace").strip("\x00 ")
                self.f.seek(pos)
            if tag in PIXEL_TAGS and depth == 0:
                self.pixel = (tag, length)
                if length == UNDEFINED:
                    self.encapsulated(limit)
                    continue
            is_sq = vr == b"SQ" or (vr is None and _dict_vr(tag) == "SQ") or (
                length == UNDEFINED and vr in (b"UN", None) and tag not in PIXEL_TAGS)
            if is_sq:
                if depth + 1 > self.max_depth:
                    raise _bad(f"sequences nested deeper than {self.max_depth} levels")
                if vr == b"UN":  # CP-246: undefined-length UN is an implicit VR sequence
                    saved = self.implicit
                    self.implicit = True
                    try:
                        items = self.sequence(length, limit, depth + 1, tag)
                    finally:
                        self.implicit = saved
                else:
                    items = self.sequence(length, limit, depth + 1, tag)
                if depth == 0 and tag in (SHARED_GROUPS, PER_FRAME_GROUPS):
                    self.groups[tag] = items
                continue
            if length == UNDEFINED:
                raise _bad(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined "
                           "length but is not a sequence")
            self.skip(length, limit, tag)
        if until_item_end:
            raise _bad("item of undefined length without its delimiter")
        if self.f.tell() != limit:
            raise _bad("an element runs past the end of its container")

    def sequence(self, length: int, limit: int, depth: int, tag: int) -> int:
        """Walk a sequence's items; returns how many it holds."""
        end = limit if length == UNDEFINED else self.f.tell() + length
        items = 0
        if end > limit:
            raise _bad(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                       f"{limit - self.f.tell()} present")
        while self.f.tell() < end:
            t = self.tag_at()
            if t == SEQ_END:
                if length != UNDEFINED:
                    raise _bad("sequence delimiter in a sequence of defined length")
                self.read(4)
                return items
            if t != ITEM:
                raise _bad(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds "
                           f"({t >> 16:04X},{t & 0xFFFF:04X}) where an item should be")
            ilen = struct.unpack(self.e + "L", self.read(4))[0]
            if ilen == UNDEFINED:
                self.dataset(end, depth, until_item_end=True)
            else:
                iend = self.f.tell() + ilen
                if iend > end:
                    raise _bad("a sequence item runs past the end of its sequence")
                self.dataset(iend, depth)
            items += 1
        if length == UNDEFINED:
            raise _bad(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length "
                       "without its delimiter")
        if self.f.tell() != end:
            raise _bad("a sequence item runs past the end of its sequence")
        return items

    def encapsulated(self, limit: int) -> None:
        items = 0
        while True:
            if self.f.tell() >= limit:
                raise _bad("encapsulated pixel data without its sequence delimiter")
            t = self.tag_at()
            ilen = struct.unpack(self.e + "L", self.read(4))[0]
            if t == SEQ_END:
                break
            if t != ITEM or ilen == UNDEFINED:
                raise _bad("encapsulated pixel data holds something other than fragments")
            self.skip(ilen, limit, 0x7FE00010)
            items += 1
        self.fragments = max(items - 1, 0)  # the first item is the basic offset table
        if self.fragments == 0:
            raise _bad("encapsulated pixel data without any fragment")


def _dict_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _read_meta(f: BinaryIO, size: int) -> tuple[str, int]:
    """Transfer syntax and the offset where the dataset starts, from the file meta group."""
    if size < 132:
        raise _bad("file too short for a DICOM file")
    f.seek(128)
    if f.read(4) != b"DICM":
        raise _bad("no DICM prefix: not a DICOM Part 10 file")
    syntax = None
    while True:
        pos = f.tell()
        head = f.read(8)
        if len(head) < 8:
            raise _bad("file ends inside the file meta information")
        g, e = struct.unpack("<HH", head[:4])
        if g != 0x0002:
            f.seek(pos)
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            ext = f.read(4)
            if len(ext) < 4:
                raise _bad("file ends inside the file meta information")
            length = struct.unpack("<L", ext)[0]
        elif vr in _SHORT_VRS:
            length = struct.unpack("<H", head[6:8])[0]
        else:
            raise _bad("file meta information is not explicit VR little endian")
        if f.tell() + length > size or length == UNDEFINED:
            raise _bad("a file meta element runs past the end of the file")
        value = f.read(length)
        if e == 0x0010:
            syntax = value.decode("ascii", "replace").strip("\x00 ")
    if not syntax:
        raise _bad("file meta information without a Transfer Syntax UID")
    return syntax, f.tell()


def inflate(src: BinaryIO, dst: IO[bytes], max_bytes: int) -> int:
    """Inflate a raw deflate stream to ``dst`` in blocks; refuse past ``max_bytes``."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while True:
        block = src.read(1 << 20)
        if not block:
            break
        while block:
            try:
                out = d.decompress(block, 1 << 22)
            except zlib.error as exc:
                raise _bad(f"deflated data is corrupt: {exc}") from None
            total += len(out)
            if total > max_bytes:
                raise DatasetInvalid(OUT_OF_RESOURCES, "deflated dataset inflates beyond "
                                     f"[node] max_dataset_mb ({max_bytes >> 20} MB)")
            dst.write(out)
            block = d.unconsumed_tail
        if d.eof:
            break
    if not d.eof:
        raise _bad("deflated data ends before its end marker (truncated)")
    return total


def check_dataset(path: Path, max_bytes: int, max_depth: int = MAX_DEPTH,
                  scratch: Path | None = None) -> Path | None:
    """Validate the whole Part 10 file at ``path``; raise :class:`DatasetInvalid`.

    For a Deflated dataset returns the path of its inflated body (explicit VR little
    endian, in ``scratch``), which the caller reads the header from and then removes;
    None otherwise.
    """
    size = path.stat().st_size
    if max_bytes and size > max_bytes:
        raise DatasetInvalid(OUT_OF_RESOURCES, "dataset larger than [node] max_dataset_mb")
    with open(path, "rb", buffering=65536) as f:
        syntax, start = _read_meta(f, size)
        if syntax == DEFLATED:
            f.seek(start)
            tmp = tempfile.NamedTemporaryFile(dir=scratch or path.parent, prefix="inflated-",
                                              delete=False)
            try:
                with tmp:
                    inflate(f, tmp, max_bytes or (1 << 62))
                inflated = Path(tmp.name)
                with open(inflated, "rb", buffering=65536) as g:
                    _walk(g, 0, inflated.stat().st_size, False, True, max_depth)
                return inflated
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
        _walk(f, start, size, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE, max_depth)
    return None


def raw_dataset_encoding(f: BinaryIO, size: int) -> tuple[bool, bool, bool]:
    """For a dataset sent without the Part 10 preamble: (starts with file meta information,
    implicit VR, little endian), from its first element header."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise _bad("too short for a DICOM dataset")
    if head[:2] == b"\x02\x00":
        return True, False, True
    little = struct.unpack("<H", head[:2])[0] <= struct.unpack(">H", head[:2])[0]
    explicit = head[4:6] in _LONG_VRS or head[4:6] in _SHORT_VRS
    return False, not explicit, little


def walk_raw_dataset(f: BinaryIO, size: int, implicit: bool, little: bool,
                     max_depth: int = MAX_DEPTH) -> None:
    """Validate a dataset without preamble nor file meta (as :func:`check_dataset` does the
    dataset of a Part 10 file), in a stream."""
    _walk(f, 0, size, implicit, little, max_depth)


def _walk(f: BinaryIO, start: int, end: int, implicit: bool, little: bool,
          max_depth: int) -> None:
    f.seek(start)
    w = _Walker(f, end, implicit, little, max_depth)
    w.dataset(end, 0)
    _check_functional_groups(w)
    if w.pixel is None:
        return
    tag, length = w.pixel
    if length == UNDEFINED:
        return  # fragments checked by the walk
    img = w.image
    missing = [k for k in ("rows", "cols") if not img.get(k)]
    if missing:
        raise _bad(f"pixel data without {' and '.join(missing)}")
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(tag, img.get("bits", 0))
    if bits not in (1, 8, 16, 32, 64):
        raise _bad(f"Bits Allocated {bits} is not 1, 8, 16, 32 or 64")
    spp = img.get("spp", 1)
    if spp not in (1, 3, 4):
        raise _bad(f"Samples per Pixel {spp} is not 1, 3 or 4")
    frames = max(img.get("frames", 1), 1)
    need = (img["rows"] * img["cols"] * spp * frames * bits + 7) // 8
    if length < need:
        raise _bad(f"pixel data holds {length} bytes, the image needs {need} "
                   f"({img['rows']} x {img['cols']} x {spp} x {bits} bits x {frames})")


def _check_functional_groups(w: _Walker) -> None:
    """Multi-frame Functional Groups module (PS3.3 C.7.6.16) of what the walk saw: both
    sequences where the IOD requires them, one shared item at most, one per-frame item for
    each frame (a viewer takes frame N's position, orientation and window from item N)."""
    shared, per_frame = w.groups.get(SHARED_GROUPS), w.groups.get(PER_FRAME_GROUPS)
    if w.sop_class in FUNCTIONAL_GROUP_IODS:
        missing = [name for name, n in (("Shared Functional Groups Sequence (5200,9229)",
                                         shared),
                                        ("Per-frame Functional Groups Sequence (5200,9230)",
                                         per_frame)) if n is None]
        if missing:
            raise _bad(f"multi-frame object of SOP Class {w.sop_class} without its "
                       f"{' and '.join(missing)}")
        if "frames" not in w.image:
            raise _bad(f"multi-frame object of SOP Class {w.sop_class} without Number of "
                       "Frames (0028,0008)")
    if shared is not None and shared > 1:
        raise _bad(f"Shared Functional Groups Sequence holds {shared} items (at most one)")
    if per_frame is not None:
        frames = w.image.get("frames", 1)
        if per_frame != frames:
            raise _bad(f"Per-frame Functional Groups Sequence holds {per_frame} items, "
                       f"Number of Frames is {frames}: one item per frame")


#: Photometric interpretations a decoder knows (PS3.3 C.7.6.3.1.2, retired ones included).
PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL",
               "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
               "HSV", "ARGB", "CMYK", "XYB"}
_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")


def check_image_pixel_module(ds) -> None:
    """The Type 1 attributes of the Image Pixel module that decoding needs, present and sane,
    for a dataset with pixel data (what a viewer or the model needs to read it back)."""
    if "PixelData" not in ds:
        return
    missing = [k for k in _PIXEL_MODULE if ds.get(k, None) in (None, "")]
    if missing:
        raise _bad(f"pixel data without {', '.join(missing)}")
    try:
        photometric = str(ds.PhotometricInterpretation).strip()
        stored, allocated, high = int(ds.BitsStored), int(ds.BitsAllocated), int(ds.HighBit)
        representation = int(ds.PixelRepresentation)
    except (TypeError, ValueError) as exc:
        raise _bad(f"unreadable Image Pixel attribute: {exc}") from None
    if photometric not in PHOTOMETRIC:
        raise _bad(f"Photometric Interpretation {photometric!r} is not a known value")
    if not 1 <= stored <= allocated or high >= allocated or representation not in (0, 1):
        raise _bad(f"inconsistent bit depths: allocated {allocated}, stored {stored}, "
                   f"high bit {high}, pixel representation {representation}")
