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
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from node.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

#: VRs with a 2-byte reserved field and a 4-byte length in explicit syntaxes (PS3.5 7.1.2).
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_SHORT_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float
#: Image attributes the pixel-length check needs: (0028,0002/0008/0010/0011/0100).
_IMAGE_TAGS = {
    0x00280002: "spp",
    0x00280008: "frames",
    0x00280010: "rows",
    0x00280011: "cols",
    0x00280100: "bits",
}

MAX_DEPTH = 32
SOP_CLASS_TAG = 0x00080016
SHARED_GROUPS, PER_FRAME_GROUPS = 0x52009229, 0x52009230
#: SOP classes whose IOD includes the Multi-frame Functional Groups module (PS3.3 A.*, module
#: C.7.6.16, Mandatory): the Shared (Type 2) and Per-frame (Type 1, one item per frame)
#: Functional Groups Sequences must be there.
FUNCTIONAL_GROUP_IODS = {
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image
    "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image
    "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image
    "1.2.840.10008.5.1.4.1.1.14.1",  # Intravascular OCT Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.14.2",  # Intravascular OCT Image - For Processing
}


class DatasetInvalid(Exception):
    """A dataset refused, with the status to answer and the reason in words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _bad(message: str) -> DatasetInvalid:
    return DatasetInvalid(CANNOT_UNDERSTAND, message)


#: What a walk asks of the bytes it walks (it is a generator driven either by a file,
#: :func:`_drive_file`, or by the data of a transfer as it arrives, :class:`StreamCheck`):
#: READ n bytes (fewer at the end), SKIP n bytes (answered with how many there were), PEEK n
#: bytes without consuming them, MORE: is there anything left (only where the end is not
#: known yet), INFLATE: what follows is a raw deflate stream (Deflated transfer syntax).
READ, SKIP, PEEK, MORE, INFLATE = range(5)
#: The most bytes a file meta element may hold (the walk holds it in memory).
MAX_META_VALUE = 1 << 20


class _Walker:
    """The walk, as generators: ``yield (READ, n)`` and the like (see READ); ``limit`` None
    is "until the data ends" (a transfer whose size is not known yet)."""

    def __init__(self, start: int, implicit: bool, little: bool, max_depth: int) -> None:
        self.pos = start
        self.implicit, self.little = implicit, little
        self.max_depth = max_depth
        self.e = "<" if little else ">"
        self.image: dict[str, int] = {}
        self.pixel: tuple[int, int] | None = None  # (tag, length or UNDEFINED)
        self.fragments = 0
        self.sop_class = ""
        self.groups: dict[int, int] = {}  # functional groups sequence -> items

    def read(self, n: int, short: str | None = None) -> Generator[tuple[int, int], Any, bytes]:
        b = yield (READ, n)
        if len(b) != n:
            raise _bad(short or f"dataset ends inside an element (offset {self.pos + len(b)})")
        self.pos += n
        return b

    def more(self, limit: int | None) -> Generator[tuple[int, int], Any, bool]:
        if limit is not None:
            return self.pos < limit
        return (yield (MORE, 0))

    def tag_at(self) -> Generator[tuple[int, int], Any, int]:
        g, e = struct.unpack(self.e + "HH", (yield from self.read(4)))
        return (g << 16) | e

    def header(self, tag: int) -> Generator[tuple[int, int], Any, tuple[bytes | None, int]]:
        """VR (None in implicit syntaxes) and length of the element whose tag was read."""
        if self.implicit or (tag >> 16) == 0xFFFE:
            return None, struct.unpack(self.e + "L", (yield from self.read(4)))[0]
        vr = yield from self.read(2)
        if vr in _LONG_VRS:
            yield from self.read(2)
            return vr, struct.unpack(self.e + "L", (yield from self.read(4)))[0]
        if vr in _SHORT_VRS:
            return vr, struct.unpack(self.e + "H", (yield from self.read(2)))[0]
        raise _bad(
            f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has no valid VR "
            f"({vr!r}) at offset {self.pos - 2}"
        )

    def skip(
        self, length: int, limit: int | None, tag: int
    ) -> Generator[tuple[int, int], Any, None]:
        if limit is not None and self.pos + length > limit:
            raise _bad(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                f"{max(limit - self.pos, 0)} present"
            )
        got = yield (SKIP, length)
        if got != length:
            raise _bad(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, {got} present"
            )
        self.pos += length

    def dataset(
        self, limit: int | None, depth: int, until_item_end: bool = False
    ) -> Generator[tuple[int, int], Any, None]:
        """Walk elements until ``limit`` (or an item delimiter for undefined-length items)."""
        while (yield from self.more(limit)):
            tag = yield from self.tag_at()
            if tag == ITEM_END:
                if not until_item_end:
                    raise _bad("item delimiter outside an item of undefined length")
                yield from self.read(4)
                return
            if (tag >> 16) == 0xFFFE:
                raise _bad(
                    f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at "
                    f"offset {self.pos - 4}"
                )
            if (tag >> 16) == 0x0000:  # PS3.7: the command group never is in a dataset
                raise _bad(
                    f"command group element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in "
                    f"the dataset at offset {self.pos - 4}"
                )
            vr, length = yield from self.header(tag)
            if (
                depth == 0
                and vr != b"SQ"
                and (
                    (tag in _IMAGE_TAGS and 2 <= length <= 16)
                    or (tag == SOP_CLASS_TAG and 0 < length <= 64)
                )
            ):
                if limit is not None and self.pos + length > limit:
                    raise _bad(
                        "an image attribute runs past the end of the dataset"
                        if tag in _IMAGE_TAGS
                        else "SOP Class UID runs past the end of the dataset"
                    )
                raw = yield from self.read(length)
                if tag == SOP_CLASS_TAG:
                    self.sop_class = raw.decode("ascii", "replace").strip("\x00 ")
                elif tag == 0x00280008:  # Number of Frames is IS (text)
                    try:
                        self.image["frames"] = int(raw.decode("ascii").strip("\x00 ") or 1)
                    except ValueError:
                        raise _bad("Number of Frames is not a number") from None
                else:
                    self.image[_IMAGE_TAGS[tag]] = struct.unpack(self.e + "H", raw[:2])[0]
                continue
            if tag in PIXEL_TAGS and depth == 0:
                self.pixel = (tag, length)
                # Everything checked below comes before Pixel Data (tags ascend): a volume
                # whose functional groups or pixel length are wrong is refused here, before
                # its frames arrive.
                _check_functional_groups(self)
                if length == UNDEFINED:
                    yield from self.encapsulated(limit)
                    continue
                _check_pixel_length(self)
            is_sq = (
                vr == b"SQ"
                or (vr is None and _dict_vr(tag) == "SQ")
                or (length == UNDEFINED and vr in (b"UN", None) and tag not in PIXEL_TAGS)
            )
            if is_sq:
                if depth + 1 > self.max_depth:
                    raise _bad(f"sequences nested deeper than {self.max_depth} levels")
                if vr == b"UN":  # CP-246: undefined-length UN is an implicit VR sequence
                    saved = self.implicit
                    self.implicit = True
                    try:
                        items = yield from self.sequence(length, limit, depth + 1, tag)
                    finally:
                        self.implicit = saved
                else:
                    items = yield from self.sequence(length, limit, depth + 1, tag)
                if depth == 0 and tag in (SHARED_GROUPS, PER_FRAME_GROUPS):
                    self.groups[tag] = items
                    _check_group_items(self, tag, items)
                continue
            if length == UNDEFINED:
                raise _bad(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined "
                    "length but is not a sequence"
                )
            yield from self.skip(length, limit, tag)
        if until_item_end:
            raise _bad("item of undefined length without its delimiter")
        if limit is not None and self.pos != limit:
            raise _bad("an element runs past the end of its container")

    def sequence(
        self, length: int, limit: int | None, depth: int, tag: int
    ) -> Generator[tuple[int, int], Any, int]:
        """Walk a sequence's items; returns how many it holds."""
        end = limit if length == UNDEFINED else self.pos + length
        items = 0
        if end is not None and limit is not None and end > limit:
            raise _bad(
                f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                f"{limit - self.pos} present"
            )
        while (yield from self.more(end)):
            t = yield from self.tag_at()
            if t == SEQ_END:
                if length != UNDEFINED:
                    raise _bad("sequence delimiter in a sequence of defined length")
                yield from self.read(4)
                return items
            if t != ITEM:
                raise _bad(
                    f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds "
                    f"({t >> 16:04X},{t & 0xFFFF:04X}) where an item should be"
                )
            ilen = struct.unpack(self.e + "L", (yield from self.read(4)))[0]
            if ilen == UNDEFINED:
                yield from self.dataset(end, depth, until_item_end=True)
            else:
                iend = self.pos + ilen
                if end is not None and iend > end:
                    raise _bad("a sequence item runs past the end of its sequence")
                yield from self.dataset(iend, depth)
            items += 1
        if length == UNDEFINED:
            raise _bad(
                f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length "
                "without its delimiter"
            )
        if self.pos != end:
            raise _bad("a sequence item runs past the end of its sequence")
        return items

    def encapsulated(self, limit: int | None) -> Generator[tuple[int, int], Any, None]:
        items = 0
        while True:
            if limit is not None and self.pos >= limit:
                raise _bad("encapsulated pixel data without its sequence delimiter")
            t = yield from self.tag_at()
            ilen = struct.unpack(self.e + "L", (yield from self.read(4)))[0]
            if t == SEQ_END:
                break
            if t != ITEM or ilen == UNDEFINED:
                raise _bad("encapsulated pixel data holds something other than fragments")
            yield from self.skip(ilen, limit, 0x7FE00010)
            items += 1
        self.fragments = max(items - 1, 0)  # the first item is the basic offset table
        if self.fragments == 0:
            raise _bad("encapsulated pixel data without any fragment")

    def walk(self, limit: int | None) -> Generator[tuple[int, int], Any, None]:
        """The whole dataset, then what can only be said at its end."""
        yield from self.dataset(limit, 0)
        _check_functional_groups(self)
        if self.pixel is not None and self.pixel[1] != UNDEFINED:
            _check_pixel_length(self)


def _dict_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _meta(w: _Walker, size: int | None) -> Generator[tuple[int, int], Any, tuple[str, int]]:
    """Transfer syntax and the offset where the dataset starts, from the preamble and the
    file meta group (``size`` None: not known yet)."""
    pre = yield from w.read(132, "file too short for a DICOM file")
    if pre[128:132] != b"DICM":
        raise _bad("no DICM prefix: not a DICOM Part 10 file")
    syntax = None
    short = "file ends inside the file meta information"
    while True:
        head = yield (PEEK, 8)
        if len(head) < 8:
            raise _bad(short)
        g, e = struct.unpack("<HH", head[:4])
        if g != 0x0002:
            break
        yield from w.read(8, short)
        vr = head[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<L", (yield from w.read(4, short)))[0]
        elif vr in _SHORT_VRS:
            length = struct.unpack("<H", head[6:8])[0]
        else:
            raise _bad("file meta information is not explicit VR little endian")
        if length == UNDEFINED or (size is not None and w.pos + length > size):
            raise _bad("a file meta element runs past the end of the file")
        if length > MAX_META_VALUE:
            raise _bad(f"file meta element (0002,{e:04X}) of {length} bytes")
        value = yield from w.read(length, "a file meta element runs past the end of the file")
        if e == 0x0010:
            syntax = value.decode("ascii", "replace").strip("\x00 ")
    if not syntax:
        raise _bad("file meta information without a Transfer Syntax UID")
    return syntax, w.pos


def _drive_file(gen: Generator[tuple[int, int], Any, Any], f: BinaryIO, end: int) -> Any:
    """Run a walk over a file (reads, seeks); returns what the walk returns."""
    value: object = None
    try:
        while True:
            kind, n = gen.send(value)
            if kind == READ:
                value = f.read(n)
            elif kind == SKIP:
                take = max(0, min(n, end - f.tell()))
                f.seek(take, os.SEEK_CUR)
                value = take
            elif kind == PEEK:
                pos = f.tell()
                value = f.read(n)
                f.seek(pos)
            elif kind == MORE:
                value = f.tell() < end
            else:
                raise AssertionError(f"a file walk asked for {kind}")
    except StopIteration as stop:
        return stop.value


def _read_meta(f: BinaryIO, size: int) -> tuple[str, int]:
    """Transfer syntax and the offset where the dataset starts, from the file meta group."""
    f.seek(0)
    return _drive_file(_meta(_Walker(0, False, True, MAX_DEPTH), size), f, size)


class StreamCheck:
    """The validation of :func:`check_dataset`, done on a Part 10 file's bytes as they
    arrive (a C-STORE dataset streamed to disk): :meth:`feed` each block before it is
    written, :meth:`finish` at the end. A malformed dataset raises :class:`DatasetInvalid`
    from the block where it shows: an enhanced multi-frame volume whose functional groups do
    not match its frames, or whose pixel data is too short for its frames, is refused at
    the header of its Pixel Data, before the frames arrive. Memory stays bounded: element
    values are skipped as they pass (only a few bytes of some are kept), a Deflated
    dataset is inflated block by block and refused past ``max_bytes``."""

    def __init__(self, max_bytes: int = 0, max_depth: int = MAX_DEPTH) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._off = 0
        self._skipping = False  # a SKIP request under way: _skip_left bytes still to pass
        self._skip_left = 0
        self._skipped = 0
        self._inflate: Any = None
        self._inflated = 0
        self.syntax: str | None = None
        self.error: DatasetInvalid | None = None
        self.done = False
        self._gen = self._run(max_depth)
        self._req = next(self._gen)

    def _run(self, max_depth: int) -> Generator[tuple[int, int], Any, None]:
        syntax, _ = yield from _meta(_Walker(0, False, True, max_depth), None)
        self.syntax = syntax
        if syntax == DEFLATED:
            yield (INFLATE, 0)
        yield from _Walker(0, syntax == IMPLICIT_LE, syntax != EXPLICIT_BE, max_depth).walk(None)

    def feed(self, data: bytes) -> None:
        """The next block of the file; raises :class:`DatasetInvalid` (kept as ``error``,
        raised again for any later block)."""
        if self.error is not None:
            raise self.error
        if self.done:
            raise self._fail(_bad("data after the end of the dataset"))
        if self._off > (1 << 16):  # compact: what the walk consumed is dropped
            del self._buf[: self._off]
            self._off = 0
        view = memoryview(data)
        if self._inflate is not None:
            self._push_inflated(view)
        else:
            self._push(view)

    def finish(self) -> None:
        """The file is complete: what is still open is an error."""
        if self.error is not None:
            raise self.error
        if self._inflate is not None and not self._inflate.eof:
            raise self._fail(_bad("deflated data ends before its end marker (truncated)"))
        self._pump(final=True)
        if not self.done:
            raise self._fail(_bad("dataset ends inside an element"))

    def _fail(self, exc: DatasetInvalid) -> DatasetInvalid:
        self.error = exc
        self._buf = bytearray()
        return exc

    def _push(self, view: memoryview) -> None:
        if self._skipping and self._skip_left and self._off == len(self._buf):
            take = min(self._skip_left, len(view))  # skipped without being copied
            self._skip_left -= take
            self._skipped += take
            view = view[take:]
        self._buf += view
        self._pump(final=False)

    def _push_inflated(self, view: memoryview) -> None:
        d = self._inflate
        data: bytes | memoryview = view
        while data:
            try:
                out = d.decompress(data, 1 << 22)
            except zlib.error as exc:
                raise self._fail(_bad(f"deflated data is corrupt: {exc}")) from None
            self._inflated += len(out)
            if self.max_bytes and self._inflated > self.max_bytes:
                raise self._fail(
                    DatasetInvalid(
                        OUT_OF_RESOURCES,
                        "deflated dataset inflates beyond [node] max_dataset_mb "
                        f"({self.max_bytes >> 20} MB)",
                    )
                )
            self._push(memoryview(out))
            data = d.unconsumed_tail
            if d.eof:
                break

    def _pump(self, final: bool) -> None:
        while not self.done:
            kind, n = self._req
            avail = len(self._buf) - self._off
            if kind == READ or kind == PEEK:
                if avail < n and not final:
                    return
                value: object = bytes(self._buf[self._off : self._off + n])
                if kind == READ:
                    self._off += len(value)  # type: ignore[arg-type]
            elif kind == SKIP:
                if not self._skipping:
                    self._skipping, self._skip_left, self._skipped = True, n, 0
                take = min(self._skip_left, avail)
                self._off += take
                self._skip_left -= take
                self._skipped += take
                if self._skip_left and not final:
                    return
                value, self._skipping, self._skip_left = self._skipped, False, 0
            elif kind == MORE:
                if not avail and not final:
                    return
                value = avail > 0
            else:  # INFLATE: the rest of the data is a raw deflate stream
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                rest = bytes(self._buf[self._off :])
                self._buf, self._off = bytearray(), 0
                try:
                    self._req = self._gen.send(None)
                except DatasetInvalid as exc:
                    raise self._fail(exc) from None
                if rest:
                    self._push_inflated(memoryview(rest))
                continue
            try:
                self._req = self._gen.send(value)
            except StopIteration:
                self.done = True
            except DatasetInvalid as exc:
                raise self._fail(exc) from None


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
                raise DatasetInvalid(
                    OUT_OF_RESOURCES,
                    "deflated dataset inflates beyond "
                    f"[node] max_dataset_mb ({max_bytes >> 20} MB)",
                )
            dst.write(out)
            block = d.unconsumed_tail
        if d.eof:
            break
    if not d.eof:
        raise _bad("deflated data ends before its end marker (truncated)")
    return total


def check_dataset(
    path: Path, max_bytes: int, max_depth: int = MAX_DEPTH, scratch: Path | None = None
) -> Path | None:
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
            tmp = tempfile.NamedTemporaryFile(
                dir=scratch or path.parent, prefix="inflated-", delete=False
            )
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


def walk_raw_dataset(
    f: BinaryIO, size: int, implicit: bool, little: bool, max_depth: int = MAX_DEPTH
) -> None:
    """Validate a dataset without preamble nor file meta (as :func:`check_dataset` does the
    dataset of a Part 10 file), in a stream."""
    _walk(f, 0, size, implicit, little, max_depth)


def _walk(f: BinaryIO, start: int, end: int, implicit: bool, little: bool, max_depth: int) -> None:
    f.seek(start)
    _drive_file(_Walker(start, implicit, little, max_depth).walk(end), f, end)


def _check_pixel_length(w: _Walker) -> None:
    """Native Pixel Data holds at least what Rows, Columns, Samples, Bits and Frames need
    (known at its header: every attribute it needs comes before it)."""
    assert w.pixel is not None
    tag, length = w.pixel
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
        raise _bad(
            f"pixel data holds {length} bytes, the image needs {need} "
            f"({img['rows']} x {img['cols']} x {spp} x {bits} bits x {frames})"
        )


def _check_group_items(w: _Walker, tag: int, items: int) -> None:
    """A functional groups sequence as soon as it ends: one shared item at most, one
    per-frame item for each frame (Number of Frames (0028,0008) comes before it)."""
    if tag == SHARED_GROUPS and items > 1:
        raise _bad(f"Shared Functional Groups Sequence holds {items} items (at most one)")
    if tag == PER_FRAME_GROUPS:
        frames = w.image.get("frames", 1)
        if items != frames:
            raise _bad(
                f"Per-frame Functional Groups Sequence holds {items} items, "
                f"Number of Frames is {frames}: one item per frame"
            )


def _check_functional_groups(w: _Walker) -> None:
    """Multi-frame Functional Groups module (PS3.3 C.7.6.16) of what the walk saw: both
    sequences where the IOD requires them, one shared item at most, one per-frame item for
    each frame (a viewer takes frame N's position, orientation and window from item N)."""
    shared, per_frame = w.groups.get(SHARED_GROUPS), w.groups.get(PER_FRAME_GROUPS)
    if w.sop_class in FUNCTIONAL_GROUP_IODS:
        missing = [
            name
            for name, n in (
                ("Shared Functional Groups Sequence (5200,9229)", shared),
                ("Per-frame Functional Groups Sequence (5200,9230)", per_frame),
            )
            if n is None
        ]
        if missing:
            raise _bad(
                f"multi-frame object of SOP Class {w.sop_class} without its {' and '.join(missing)}"
            )
        if "frames" not in w.image:
            raise _bad(
                f"multi-frame object of SOP Class {w.sop_class} without Number of "
                "Frames (0028,0008)"
            )
    for tag, items in ((SHARED_GROUPS, shared), (PER_FRAME_GROUPS, per_frame)):
        if items is not None:
            _check_group_items(w, tag, items)


#: Photometric interpretations a decoder knows (PS3.3 C.7.6.3.1.2, retired ones included).
PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "HSV",
    "ARGB",
    "CMYK",
    "XYB",
}
_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def check_image_pixel_module(ds: Dataset) -> None:
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
        raise _bad(
            f"inconsistent bit depths: allocated {allocated}, stored {stored}, "
            f"high bit {high}, pixel representation {representation}"
        )
