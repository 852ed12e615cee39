"""WADO-RS for viewers (PS3.18 chapter 8 and 9) and WADO-URI (chapter 9 of older editions).

* Instances, series and studies stream as ``multipart/related; type="application/dicom"``:
  files are read in blocks in a worker thread, never whole (a 400 MB study at ~the memory of
  one block).
* Frames (``.../frames/1,2``) with transfer syntax negotiation (PS3.18 8.7.3): the stored
  compressed syntax passes through untouched when the client accepts it
  (``transfer-syntax=*`` or that syntax, or its image media type such as ``image/jls``),
  otherwise frames are decoded and sent as Explicit VR Little Endian
  (``application/octet-stream``); multipart and single-part forms.
* Bulk data: ``/metadata`` gives ``BulkDataURI`` for Pixel Data and other large binary
  values; ``.../bulkdata/{tag}`` returns them.
* Rendered images (``/rendered``) with ``viewport``, ``quality`` and ``window``; thumbnails
  at study, series and instance level.
"""

from __future__ import annotations

import io
import math
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

#: Image media types of compressed transfer syntaxes (PS3.18 Table 8.7.3-5).
MEDIA_OF_SYNTAX = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}
_NATIVE = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
}
BLOCK = 1 << 20


class NotAcceptable(Exception):
    """No representation the client accepts (HTTP 406)."""


@dataclass(frozen=True)
class AcceptItem:
    media: str  # e.g. multipart/related, application/octet-stream, image/jls
    part: str | None  # the "type" parameter of multipart/related
    syntax: str | None  # the "transfer-syntax" parameter
    q: float


def parse_accept(header: str) -> list[AcceptItem]:
    """An Accept header as items, best first (quoted parameters allowed)."""
    items = []
    for raw in _split(header or "*/*", ","):
        fields = [f.strip() for f in _split(raw, ";")]
        if not fields or not fields[0] or "/" not in fields[0]:
            continue  # not a media range (";;;", "q=abc"): ignored, as HTTP allows
        media = fields[0].lower()
        params = {}
        for f in fields[1:]:
            k, _, v = f.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        part = params.get("type")
        items.append(
            AcceptItem(media, part.lower() if part else None, params.get("transfer-syntax"), q)
        )
    if not items:  # nothing but garbage: as if there were no Accept header
        return [AcceptItem("*/*", None, None, 1.0)]
    return sorted(items, key=lambda i: -i.q)


def _split(text: str, sep: str) -> list[str]:
    out, cur, quoted = [], "", False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += c
    if cur.strip():
        out.append(cur)
    return out


@dataclass(frozen=True)
class FrameChoice:
    multipart: bool
    passthrough: bool  # send the stored compressed bytes
    content_type: str  # of each part (or of the single body)


def choose_frames(accept: str, stored: str, n_frames: int) -> FrameChoice:
    """The representation of frames to send for an Accept header (PS3.18 8.7.3)."""
    compressed = stored not in _NATIVE
    for item in parse_accept(accept):
        multipart = item.media == "multipart/related"
        media = (item.part or "application/octet-stream") if multipart else item.media
        if media in ("*/*", "multipart/*"):
            media = "application/octet-stream"
        if not multipart and n_frames != 1 and media != "*/*":
            continue  # a single part holds one frame
        ts = item.syntax
        if media == "application/octet-stream":
            if compressed and ts in ("*", stored):
                return FrameChoice(
                    multipart, True, f"application/octet-stream; transfer-syntax={stored}"
                )
            if ts in (None, "*", ExplicitVRLittleEndian):
                return FrameChoice(
                    multipart,
                    False,
                    f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}",
                )
            continue
        if compressed and MEDIA_OF_SYNTAX.get(stored) == media and ts in (None, "*", stored):
            return FrameChoice(multipart, True, f"{media}; transfer-syntax={stored}")
    raise NotAcceptable(
        f"frames of this instance are available as application/octet-stream "
        f"(uncompressed) or as stored ({stored}"
        f"{', ' + MEDIA_OF_SYNTAX[stored] if stored in MEDIA_OF_SYNTAX else ''})"
    )


#: The most frame numbers one WADO-RS frames request may name.
MAX_FRAME_LIST = 1024


def parse_frame_list(text: str, n_frames: int) -> list[int]:
    """ "1,3,2" -> [1, 3, 2]; ValueError for anything else, a frame out of range, a frame
    named twice (``1,1,1,...`` would answer one frame thousands of times) or a list longer
    than :data:`MAX_FRAME_LIST`."""
    items = text.split(",")
    if len(items) > MAX_FRAME_LIST:
        raise ValueError(f"at most {MAX_FRAME_LIST} frame numbers per request, got {len(items)}")
    out: list[int] = []
    seen: set[int] = set()
    for part in items:
        try:
            n = int(part.strip())
        except ValueError:
            raise ValueError(f"frame numbers must be integers, got {part.strip()[:20]!r}") from None
        if not 1 <= n <= n_frames:
            raise ValueError(f"frame {n} does not exist (the instance has {n_frames})")
        if n in seen:
            raise ValueError(f"frame {n} is named more than once")
        seen.add(n)
        out.append(n)
    if not out:
        raise ValueError("no frame number")
    return out


def frames(path: Path, numbers: list[int], passthrough: bool) -> list[bytes]:
    """The requested frames' bytes, all of them (see :func:`iter_frames`)."""
    return list(iter_frames(path, numbers, passthrough))


def iter_frames(path: Path, numbers: list[int], passthrough: bool) -> Iterator[bytes]:
    """The requested frames' bytes one by one: as stored (compressed pass-through) or
    decoded to little endian native pixels. Runs in a worker thread.

    Only the header and the requested frames are read from the file: a frame of a 2 GB
    tomosynthesis volume costs one frame of memory. Native frames are read at their offset
    (Pixel Data's value position + (n - 1) x frame size); compressed frames are found from
    the offset tables (Basic or Extended) or by walking the fragments with ``seek``
    (:func:`pydicom.encaps.get_frame`); decoding reads one frame at a time
    (:func:`pydicom.pixels.iter_pixels` on the path). A Deflated file has no byte offsets:
    pydicom inflates it whole (rare for volumes; stored as received).
    """
    with open(path, "rb") as f:
        ds = dcmread(f, stop_before_pixels=True)
        pixel_pos = f.tell()
        head = f.read(12)
    stored = str(ds.file_meta.TransferSyntaxUID)
    # A Deflated file is inflated by the header read (nothing follows it in the file): its
    # Pixel Data is found by the decoding path below.
    if stored != DeflatedExplicitVRLittleEndian and head[:4] not in (
        b"\xe0\x7f\x10\x00",
        b"\x7f\xe0\x00\x10",
    ):
        raise ValueError("this instance has no pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if stored not in _NATIVE:
        if passthrough:
            from pydicom.encaps import get_frame

            ext = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            with open(path, "rb") as f:
                for n in numbers:
                    f.seek(pixel_pos + 12)  # explicit VR little endian: tag, OB, 00 00, length
                    yield get_frame(f, n - 1, extended_offsets=ext, number_of_frames=n_frames)
            return
        from pydicom.pixels import iter_pixels

        for arr in iter_pixels(path, indices=[n - 1 for n in numbers], raw=True):
            yield _native(arr)
        return
    if stored == DeflatedExplicitVRLittleEndian:
        # No byte offsets in a Deflated file (pydicom's iter_pixels cannot read it from the
        # path): the whole dataset is inflated, as the header read already did.
        full = dcmread(path)
        if "PixelData" not in full:
            raise ValueError("this instance has no pixel data")
        arr = full.pixel_array
        arr = arr[None] if n_frames == 1 else arr
        for n in numbers:
            yield (
                _native(arr[n - 1])
                if bits != 1
                else np.packbits(arr[n - 1], bitorder="little").tobytes()
            )
        return
    if bits == 1 or not bits:
        from pydicom.pixels import iter_pixels

        for arr in iter_pixels(path, indices=[n - 1 for n in numbers], raw=True):
            yield _native(arr) if bits != 1 else np.packbits(arr, bitorder="little").tobytes()
        return
    implicit = stored == "1.2.840.10008.1.2"
    start = pixel_pos + (8 if implicit else 12)
    size = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits + 7) // 8
    with open(path, "rb") as f:
        for n in numbers:
            f.seek(start + (n - 1) * size)
            chunk = f.read(size)
            if len(chunk) != size:
                raise ValueError(f"frame {n} lies past the end of the stored pixel data")
            if stored == "1.2.840.10008.1.2.2" and bits > 8:
                chunk = np.frombuffer(chunk, f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
            yield chunk


def _native(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def multipart_bytes(parts: list[bytes], content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for p in parts:
        out.write(f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        out.write(p)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    inner = content_type.split(";")[0]
    params = content_type[len(inner) :]
    return out.getvalue(), f'multipart/related; type="{inner}"{params}; boundary={boundary}'


def multipart_content_type(content_type: str, boundary: str) -> str:
    inner = content_type.split(";")[0]
    params = content_type[len(inner) :]
    return f'multipart/related; type="{inner}"{params}; boundary={boundary}'


def stream_parts(parts: Iterator[bytes], content_type: str, boundary: str) -> Iterator[bytes]:
    """``multipart/related`` of the parts as they come (one part in memory at a time; sync:
    Starlette iterates it in a worker thread)."""
    for p in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + p + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stream_files(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """``multipart/related`` of DICOM files, read in blocks (sync: Starlette iterates it in
    a worker thread)."""
    for p in paths:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(p, "rb") as f:
            while block := f.read(BLOCK):
                yield block
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stream_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            yield block


# -- metadata and bulk data ---------------------------------------------------------------------
def metadata_json(path: Path, instance_url: str) -> dict:
    """DICOM JSON of an instance, large binary values as BulkDataURI (Pixel Data included,
    without reading it)."""
    ds = dcmread(path, stop_before_pixels=True)

    def uri(elem: DataElement) -> str:
        return f"{instance_url}/bulkdata/{elem.tag:08X}"

    js = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=uri)
    # VOI LUT Function LINEAR is what its absence means (PS3.3 C.11.2.1.3); OHIF 3.13's image
    # loader indexes the value as if it were a list and takes "L" for an unknown function,
    # which stops the viewport. Leaving the default out changes nothing for anyone else.
    if js.get("00281056", {}).get("Value") == ["LINEAR"]:
        del js["00281056"]
    if "Rows" in ds and "BitsAllocated" in ds:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
        vr = "OB" if ts not in _NATIVE or int(ds.BitsAllocated) <= 8 else "OW"
        js["7FE00010"] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/7FE00010"}
    return js


def pixel_data_range(path: Path) -> tuple[int, int] | None:
    """(offset, length) in the file of native Pixel Data's value (defined length, not
    Deflated), so that it is streamed from the file; None otherwise."""
    with open(path, "rb") as f:
        ds = dcmread(f, stop_before_pixels=True)
        pos = f.tell()
        head = f.read(12)
    stored = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if stored not in _NATIVE or stored == "1.2.840.10008.1.2.1.99" or len(head) < 8:
        return None
    if stored == "1.2.840.10008.1.2":
        tag, length, start = head[:4], int.from_bytes(head[4:8], "little"), pos + 8
    else:
        order: Literal["big", "little"] = "big" if stored == "1.2.840.10008.1.2.2" else "little"
        tag, length, start = head[:4], int.from_bytes(head[8:12], order), pos + 12
    if tag not in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10") or length == 0xFFFFFFFF:
        return None
    return start, length


def stream_range(
    path: Path, offset: int, length: int, content_type: str, boundary: str | None
) -> Iterator[bytes]:
    """A byte range of a file in blocks, as one part of a ``multipart/related`` body when
    ``boundary`` is given."""
    if boundary:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0 and (block := f.read(min(BLOCK, left))):
            left -= len(block)
            yield block
    if boundary:
        yield f"\r\n--{boundary}--\r\n".encode()


def bulkdata(path: Path, tag: int) -> bytes:
    """The value of one top-level binary element (Pixel Data: all of it, as stored)."""
    ds = dcmread(path) if tag == 0x7FE00010 else dcmread(path, stop_before_pixels=True)
    if tag not in ds:
        raise KeyError(f"{tag:08X}")
    value = ds[tag].value
    if not isinstance(value, bytes | bytearray):
        raise KeyError(f"{tag:08X} is not a binary value")
    return bytes(value)


# -- rendering ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredFrame:
    """One frame's stored values, as decoded (integers: a quarter of their float64 memory),
    with what a window given in the request is applied through."""

    pixels: np.ndarray
    slope: float
    intercept: float
    monochrome1: bool

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


class DecodedImages:
    """Images that rendering decoded, kept for the next request (a viewer asks for the same
    instance's thumbnail, rendered image and windowed images one after another): a least
    recently used cache bounded in bytes, keyed by file (path, inode, modification time,
    size), frame and kind, so that a file replaced or changed is decoded again. It holds the
    8-bit display image (``display``) or the stored integer values (``stored``, for a window
    the request gives), never floating point. Thread-safe; two requests for an image being
    decoded wait for the one decode. ``max_bytes`` 0: nothing is kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple, np.ndarray | StoredFrame] = OrderedDict()
        self._pending: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()
        #: Bytes held; decodes done (misses); answers from the cache.
        self.bytes = 0
        self.decodes = 0
        self.hits = 0

    @staticmethod
    def _size(value: np.ndarray | StoredFrame) -> int:
        return int(value.nbytes)

    def get(
        self, path: Path, frame: int, kind: str, make: Callable[[], np.ndarray | StoredFrame]
    ) -> Any:
        """The cached value for (file, frame, kind), or ``make()``'s, kept when it fits."""
        st = os.stat(path)
        name = (str(path), frame, kind)
        key = (*name, st.st_ino, st.st_mtime_ns, st.st_size)
        if self.max_bytes == 0:
            with self._lock:
                self.decodes += 1
            return make()
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return self._items[key]
                wait = self._pending.get(key)
                if wait is None:
                    done = self._pending[key] = threading.Event()
                    break
            wait.wait(120)  # another request decodes it; then a hit (or our own decode)
        try:
            value = make()
            with self._lock:
                self.decodes += 1
                size = self._size(value)
                # An older version of the same file and frame is of no more use.
                for old in [k for k in self._items if k[:3] == name]:
                    self.bytes -= self._size(self._items.pop(old))
                if size <= self.max_bytes:
                    self._items[key] = value
                    self.bytes += size
                    while self.bytes > self.max_bytes:
                        _, dropped = self._items.popitem(last=False)
                        self.bytes -= self._size(dropped)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            done.set()


_NO_CACHE = DecodedImages(0)


def _header_and_frame(path: Path, frame: int) -> tuple[Dataset, np.ndarray, int]:
    """(the header, one frame's stored values, the number of frames): a multi-frame file
    gives one frame read from the file, never the whole volume."""
    from pydicom.pixels import pixel_array

    from inference.display import PreprocessError, decode

    header = dcmread(path, stop_before_pixels=True)
    n = int(header.get("NumberOfFrames", 1) or 1)
    if n > 1:
        try:
            return header, pixel_array(str(path), index=min(max(frame, 1), n) - 1), n
        except (AttributeError, KeyError) as exc:
            raise ValueError("this instance has no image to render") from exc
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("this instance has no image to render")
    try:
        return ds, decode(ds), 1  # the fastest installed decoder (inference.display)
    except PreprocessError as exc:
        raise ValueError(str(exc)) from exc


def _display_image(path: Path, frame: int) -> np.ndarray:
    """The 8-bit image a request without a window renders: the file's own VOI LUT or
    window (:func:`inference.display.to_display8`) for a single frame, an automatic window
    for a frame of a multi-frame object; colour as stored."""
    ds, arr, n = _header_and_frame(path, frame)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return np.asarray(arr, dtype=np.uint8)
    if n == 1:
        from inference.display import to_display8

        return to_display8(ds, arr)
    center, width = _auto(arr)
    return _lut8(arr, lambda v: _linear(v, center, width))


def _stored_frame(path: Path, frame: int) -> np.ndarray | StoredFrame:
    """What a request with a window renders from: the stored values and their Modality
    LUT (colour: the display image, which a window does not change)."""
    ds, arr, _ = _header_and_frame(path, frame)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return np.asarray(arr, dtype=np.uint8)
    return StoredFrame(
        arr,
        float(ds.get("RescaleSlope", 1) or 1),
        float(ds.get("RescaleIntercept", 0) or 0),
        str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1",
    )


def render(
    path: Path,
    accept: str,
    viewport: str | None = None,
    quality: str | None = None,
    window: str | None = None,
    frame: int = 1,
    thumbnail: bool = False,
    cache: DecodedImages | None = None,
) -> tuple[bytes, str]:
    """A rendered image (JPEG, PNG or GIF by Accept) of one frame: ``viewport`` "w,h" (aspect
    kept), ``quality`` 1-100 (JPEG), ``window`` "center,width[,function]" (PS3.18 8.3.5).
    ``cache``: where decoded images are kept between requests (:class:`DecodedImages`)."""
    from PIL import Image

    cache = cache or _NO_CACHE
    size = None
    if thumbnail and not viewport:
        viewport = "200,200"
    if viewport:
        try:
            w, h = (int(x) for x in viewport.split(",")[:2])
        except ValueError:
            raise ValueError(f"viewport must be 'width,height', got {viewport!r}") from None
        if w <= 0 or h <= 0 or w > 8192 or h > 8192:
            raise ValueError("viewport width and height must be 1-8192")
        size = (w, h)
    if window:
        center, width = _window_params(window)
        stored = cache.get(path, frame, "stored", lambda: _stored_frame(path, frame))
        img = stored if isinstance(stored, np.ndarray) else _window(stored, center, width)
    else:
        img = cache.get(path, frame, "display", lambda: _display_image(path, frame))
    pil = Image.fromarray(img)
    if size:
        pil.thumbnail(size, Image.Resampling.LANCZOS)
    fmt, media = "PNG", "image/png"
    for item in parse_accept(accept):
        if item.media in ("image/jpeg", "image/*", "*/*"):
            fmt, media = "JPEG", "image/jpeg"
            break
        if item.media == "image/png":
            break
        if item.media == "image/gif":
            fmt, media = "GIF", "image/gif"
            break
    buf = io.BytesIO()
    kwargs = {}
    if fmt == "JPEG":
        q = int(quality) if quality and quality.isdigit() else 90
        kwargs["quality"] = max(1, min(100, q))
        if pil.mode not in ("L", "RGB"):
            pil = pil.convert("RGB")
    pil.save(buf, format=fmt, **kwargs)
    return buf.getvalue(), media


def _window_params(window: str) -> tuple[float, float]:
    parts = window.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise ValueError(f"window must be 'center,width[,function]', got {window[:40]!r}") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ValueError(
            f"window center and width must be finite numbers, the width above "
            f"0, got {window[:40]!r}"
        )
    return center, width


def _window(stored: StoredFrame, center: float, width: float) -> np.ndarray:
    """The window of a request over the Modality LUT's output, as 8 bits (MONOCHROME1
    inverted)."""

    def lut(values: np.ndarray) -> np.ndarray:
        out = _linear(values * stored.slope + stored.intercept, center, width)
        return 255 - out if stored.monochrome1 else out

    return _lut8(stored.pixels, lut)


def _lut8(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (float64 values -> uint8) over an image: for 8- and 16-bit integers computed
    once per possible value and looked up (no float64 image); otherwise on float32."""
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        values = np.arange(1 << (8 * arr.dtype.itemsize), dtype=np.int64).astype(unsigned)
        table = fn(values.view(arr.dtype).astype(np.float64))
        return np.take(table, arr.view(unsigned))
    return fn(arr.astype(np.float32))


def _auto(arr: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR to 0-255; a width of 1 or less is a threshold (the
    formula would divide by zero)."""
    if width <= 1:
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    return out.astype(np.uint8)


def check_uid(value: str) -> str:
    """A UID from a URL (WADO-URI parameters), checked: never a path component otherwise."""
    from storage.files import is_valid_uid

    if not is_valid_uid(value):
        raise ValueError(f"not a valid UID: {value!r}")
    return str(UID(value))
