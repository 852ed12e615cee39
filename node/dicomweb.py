"""DICOMweb in the daemon (Starlette on uvicorn): STOW-RS, QIDO-RS, WADO-RS.

STOW-RS goes through the same :meth:`node.scp.StorageSCP.ingest` as C-STORE (validation, file
store, exam assembly); QIDO-RS uses the C-FIND matching of :mod:`node.qr`; WADO-RS serves the
stored files (received images and produced results alike), their metadata, and rendered PNG
or JPEG images of single-frame objects (the attention maps) for browsers.
"""

from __future__ import annotations

import io
import logging
import mmap
import re
import tempfile
import threading
import uuid
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.config import Config
from node.qr import ATTRS, LEVELS, QueryRetrieveSCP
from node.scp import SUCCESS, StorageSCP
from storage.files import FileStore
from storage.models import Instance
from storage.state import ExamStore

log = logging.getLogger("mammo_node.dicomweb")

DICOM_JSON = "application/dicom+json"
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_STOW_MAX_BYTES = 2 * 1024 ** 3


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _keyword(name: str) -> str | None:
    """A QIDO query key (keyword or 8-hex tag) -> the keyword node.qr knows, or None."""
    if _TAG_RE.match(name):
        from pydicom.datadict import keyword_for_tag

        name = keyword_for_tag(int(name, 16)) or name
    return name if name in ATTRS or name == "ModalitiesInStudy" else None


def split_multipart(path: Path, content_type: str) -> list[tuple[str, int, int]]:
    """Parts of a multipart/related body spooled to ``path``: (content type, offset, length).

    Works on the file through mmap, so a 400 MB STOW request is never held in memory.
    """
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("multipart/related without a boundary parameter")
    boundary = b"--" + m.group(1).encode()
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty body")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = mm.find(boundary)
        if pos < 0:
            raise ValueError("the boundary of the Content-Type never appears in the body")
        parts = []
        while True:
            start = pos + len(boundary)
            if mm[start:start + 2] == b"--":
                break  # closing delimiter
            if mm[start:start + 2] == b"\r\n":
                start += 2
            head_end = mm.find(b"\r\n\r\n", start)
            if head_end < 0:
                raise ValueError("a part without the blank line that ends its headers")
            ctype = "application/octet-stream"
            for line in mm[start:head_end].decode("latin-1").split("\r\n"):
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-type":
                    ctype = v.strip().lower()
            data = head_end + 4
            nxt = mm.find(b"\r\n" + boundary, data)
            if nxt < 0:
                raise ValueError("a part without a closing boundary (truncated body?)")
            parts.append((ctype, data, nxt - data))
            pos = nxt + 2
        return parts


def _copy_range(src: Path, offset: int, length: int, dst) -> bytes:
    """Copy a byte range of ``src`` to the open file ``dst``; returns its first 132 bytes."""
    head = b""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, 4 << 20))
            if not block:
                break
            if len(head) < 132:
                head += block[:132 - len(head)]
            dst.write(block)
            left -= len(block)
    return head


def _to_part10(path: Path) -> None:
    """Rewrite a part sent without preamble (as pydicom's dcmwrite does by default) as a
    DICOM Part 10 file with complete file meta information."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = dcmread(path, force=True)
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise ValueError("no SOP Class / SOP Instance UID: not a DICOM dataset")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _multipart(files: list[Path]) -> Response:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for f in files:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(f.read_bytes())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return Response(out.getvalue(), media_type=f'multipart/related; type="application/dicom"; '
                                               f"boundary={boundary}")


class DicomWeb:
    """The DICOMweb application bound to the node's store."""

    def __init__(self, cfg: Config, files: FileStore, exams: ExamStore, scp: StorageSCP):
        self.cfg, self.files, self.exams, self.scp = cfg, files, exams, scp
        self.qr = QueryRetrieveSCP(cfg, files, exams)
        self.root = cfg.dicomweb.root.rstrip("/")
        r = self.root
        self.app = Starlette(middleware=[Middleware(BaseHTTPMiddleware, dispatch=self._auth)],
                             routes=[
            Route(f"{r}/studies", self.stow, methods=["POST"]),
            Route(f"{r}/studies/{{study}}", self.stow, methods=["POST"]),
            Route(f"{r}/studies", self.qido, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series", self.qido, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/instances", self.qido, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/instances", self.qido,
                  methods=["GET"]),
            Route(f"{r}/studies/{{study}}", self.wado, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/metadata", self.metadata, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}", self.wado, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/metadata", self.metadata,
                  methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}", self.wado,
                  methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/metadata",
                  self.metadata, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/rendered",
                  self.rendered, methods=["GET"]),
        ])

    async def _auth(self, request: Request, call_next):
        token = self.cfg.dicomweb.token
        if token and request.headers.get("authorization", "") != f"Bearer {token}":
            return _error(401, "missing or wrong bearer token")
        return await call_next(request)

    # -- STOW-RS ---------------------------------------------------------------------------
    async def stow(self, request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/related") or (
                "application/dicom" not in ctype.lower()):
            return _error(415, 'STOW-RS takes multipart/related; type="application/dicom", '
                               f"got {ctype or 'no Content-Type'}")
        spool = tempfile.NamedTemporaryFile(dir=self.files.incoming, prefix="stow-",
                                            suffix=".body", delete=False)
        try:
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > _STOW_MAX_BYTES:
                    return _error(413, "request larger than 2 GiB")
                spool.write(chunk)
            spool.close()
            try:
                parts = split_multipart(Path(spool.name), ctype)
            except ValueError as exc:
                return _error(400, f"malformed multipart body: {exc}")
            if not parts:
                return _error(400, "multipart body without any part")
            # Storing fsyncs and writes the database: off the event loop.
            return await run_in_threadpool(self._store_parts, request, Path(spool.name), parts)
        finally:
            spool.close()
            Path(spool.name).unlink(missing_ok=True)

    def _store_parts(self, request: Request, body: Path,
                     parts: list[tuple[str, int, int]]) -> Response:
        study_in_url = request.path_params.get("study")
        calling = f"STOW:{request.client.host if request.client else '?'}"[:16]
        ok, failed = [], []
        for ptype, offset, length in parts:
            item = Dataset()
            if not ptype.startswith("application/dicom"):
                item.FailureReason = 0xA900
                failed.append((item, f"part of type {ptype} is not application/dicom"))
                continue
            with tempfile.NamedTemporaryFile(dir=self.files.incoming, suffix=".dcm",
                                             delete=False) as tmp:
                head = _copy_range(body, offset, length, tmp)
            path = Path(tmp.name)
            try:
                if head[128:132] != b"DICM":
                    _to_part10(path)
                head = dcmread(path, stop_before_pixels=True)
                sop_class = str(head.get("SOPClassUID", ""))
                sop_uid = str(head.get("SOPInstanceUID", ""))
                study = str(head.get("StudyInstanceUID", ""))
            except Exception as exc:
                path.unlink(missing_ok=True)
                item.FailureReason = 0xC210
                failed.append((item, f"not a DICOM file: {exc}"))
                continue
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            if study_in_url and study != study_in_url:
                path.unlink(missing_ok=True)
                item.FailureReason = 0xA900
                failed.append((item, f"StudyInstanceUID {study} is not the study of the URL"))
                continue
            status, message = self.scp.ingest(path, calling)
            if status == SUCCESS:
                item.RetrieveURL = (f"{request.base_url}{self.root.lstrip('/')}/studies/"
                                    f"{study}/series/{head.get('SeriesInstanceUID', '')}"
                                    f"/instances/{sop_uid}")
                ok.append(item)
            else:
                item.FailureReason = status
                failed.append((item, message))
        resp = Dataset()
        if ok:
            resp.ReferencedSOPSequence = ok
        if failed:
            resp.FailedSOPSequence = [i for i, _ in failed]
        js = resp.to_json_dict()
        headers = {}
        if failed:
            for _, m in failed:
                log.warning("STOW-RS part refused: %s", m)
            # Why, in words: the Warning header DICOMweb uses (the body stays standard).
            headers["Warning"] = ", ".join(
                f'299 mammo-node: "{m.replace(chr(34), chr(39))[:200]}"' for _, m in failed)
        code = 200 if not failed else (202 if ok else 409)
        return JSONResponse(js, status_code=code, media_type=DICOM_JSON, headers=headers)

    # -- QIDO-RS ---------------------------------------------------------------------------
    async def qido(self, request: Request) -> Response:
        p = request.path_params
        path = request.url.path
        level = ("IMAGE" if path.endswith("/instances") else
                 "SERIES" if path.endswith("/series") else "STUDY")
        keys: dict[str, str] = {}
        limit, offset = None, 0
        for name, value in request.query_params.multi_items():
            if name == "limit":
                limit = int(value)
            elif name == "offset":
                offset = int(value)
            elif name in ("includefield", "fuzzymatching"):
                continue
            else:
                kw = _keyword(name)
                if kw is None:
                    return _error(400, f"unsupported query key {name!r}; supported: "
                                       f"{', '.join(sorted(ATTRS))}")
                keys[kw] = value
        if "study" in p:
            keys["StudyInstanceUID"] = p["study"]
        if "series" in p:
            keys["SeriesInstanceUID"] = p["series"]
        ident = Dataset()
        ident.QueryRetrieveLevel = level
        for kw in ATTRS:
            if LEVELS.index(ATTRS[kw][0]) <= LEVELS.index(level):
                setattr(ident, kw, keys.get(kw, ""))
        if level in ("STUDY",):
            ident.ModalitiesInStudy = keys.get("ModalitiesInStudy", "")
            ident.NumberOfStudyRelatedSeries = None
            ident.NumberOfStudyRelatedInstances = None
        if level == "SERIES":
            ident.NumberOfSeriesRelatedInstances = None
        rows = self.qr.match(level, keys)
        answers = list(self.qr._answers(level, keys, ident, rows))
        answers = answers[offset:offset + limit if limit else None]
        body = []
        for a in answers:
            del a.QueryRetrieveLevel
            body.append(a.to_json_dict())
        return JSONResponse(body, media_type=DICOM_JSON)

    # -- WADO-RS ---------------------------------------------------------------------------
    def _rows(self, p: dict[str, str]) -> list[Instance]:
        return self.exams.find_instances(
            study_uids=[p["study"]], series_uids=[p["series"]] if "series" in p else None,
            sop_uids=[p["instance"]] if "instance" in p else None)

    async def wado(self, request: Request) -> Response:
        rows = self._rows(request.path_params)
        if not rows:
            return _error(404, "no such study, series or instance")
        return _multipart([self.files.abspath(r.path) for r in rows])

    async def metadata(self, request: Request) -> Response:
        rows = self._rows(request.path_params)
        if not rows:
            return _error(404, "no such study, series or instance")
        out = []
        for r in rows:
            ds = dcmread(self.files.abspath(r.path), stop_before_pixels=True)
            out.append(ds.to_json_dict(bulk_data_threshold=1 << 16,
                                       bulk_data_element_handler=lambda e: ""))
        return JSONResponse(out, media_type=DICOM_JSON)

    async def rendered(self, request: Request) -> Response:
        rows = self._rows(request.path_params)
        if not rows:
            return _error(404, "no such instance")
        from PIL import Image

        ds = dcmread(self.files.abspath(rows[0].path))
        if "PixelData" not in ds:
            return _error(400, "this instance has no image to render")
        arr = ds.pixel_array
        if ds.get("SamplesPerPixel", 1) == 1:
            from inference.preprocess import to_display

            arr = (to_display(ds) * 255).astype("uint8")
        accept = request.headers.get("accept", "image/png")
        fmt, media = ("JPEG", "image/jpeg") if "image/jpeg" in accept else ("PNG", "image/png")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return Response(buf.getvalue(), media_type=media)


class DicomWebServer(threading.Thread):
    """uvicorn serving :class:`DicomWeb` in a thread of the daemon."""

    def __init__(self, web: DicomWeb, host: str, port: int) -> None:
        super().__init__(name="dicomweb", daemon=True)
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(web.app, host=host, port=port,
                                                    log_level="warning", lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # the daemon owns the signals

    def run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)
