"""Rendered images, thumbnails and WADO-URI images from a bounded decode cache
(node.wado.DecodedImages): decoded once, kept as 8-bit or stored integers, bounded in bytes,
decoded again when the file changes; the same pixels as the float reference."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image
from pydicom.filewriter import dcmwrite

from inference.display import to_display, to_display8
from inference.synthetic import make_mammogram
from node import wado

pytestmark = pytest.mark.unit


def _file(tmp_path, name: str, seed: int, **kw):
    ds = make_mammogram("L", "CC", rows=320, cols=256, seed=seed, **kw)
    path = tmp_path / name
    dcmwrite(path, ds, enforce_file_format=True)
    return path, ds


def _pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_two_renders_decode_once_and_a_changed_file_is_decoded_again(tmp_path):
    path, ds = _file(tmp_path, "a.dcm", 1)
    cache = wado.DecodedImages(16 << 20)
    first, media = wado.render(path, "image/png", cache=cache)
    again, _ = wado.render(path, "image/png", cache=cache)
    thumb, tmedia = wado.render(path, "image/jpeg", thumbnail=True, cache=cache)
    assert media == "image/png" and tmedia == "image/jpeg"
    assert first == again and cache.decodes == 1 and cache.hits == 2
    assert max(Image.open(io.BytesIO(thumb)).size) == 200
    # The 8-bit display image is what is kept: 1 byte a pixel, not float.
    assert cache.bytes == 320 * 256
    # A window of the request: the stored values are decoded (once) and kept beside it.
    w1, _ = wado.render(path, "image/png", window="2000,3000", cache=cache)
    w2, _ = wado.render(path, "image/png", window="1500,1000", cache=cache)
    assert cache.decodes == 2 and w1 != w2
    assert cache.bytes == 320 * 256 * (1 + ds.pixel_array.dtype.itemsize)
    # The file is replaced by another image (same path): decoded again, the old one dropped.
    other = make_mammogram("L", "CC", rows=320, cols=256, seed=2)
    dcmwrite(path, other, enforce_file_format=True)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed, _ = wado.render(path, "image/png", cache=cache)
    assert cache.decodes == 3 and changed != first
    assert np.array_equal(_pixels(changed), to_display8(other))
    assert cache.bytes == 320 * 256 * (1 + ds.pixel_array.dtype.itemsize)


def test_the_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    paths = [_file(tmp_path, f"{i}.dcm", 10 + i)[0] for i in range(3)]
    one = 320 * 256
    cache = wado.DecodedImages(2 * one + 100)  # room for two display images
    for p in paths:
        wado.render(p, "image/png", cache=cache)
        assert cache.bytes <= cache.max_bytes
    assert cache.decodes == 3 and cache.bytes == 2 * one
    wado.render(paths[2], "image/png", cache=cache)  # kept
    assert cache.decodes == 3
    wado.render(paths[0], "image/png", cache=cache)  # evicted first: decoded again
    assert cache.decodes == 4 and cache.bytes == 2 * one
    # An image larger than the whole cache is rendered, not kept; 0 keeps nothing.
    small = wado.DecodedImages(one - 1)
    wado.render(paths[0], "image/png", cache=small)
    wado.render(paths[0], "image/png", cache=small)
    assert small.decodes == 2 and small.bytes == 0
    none = wado.DecodedImages(0)
    wado.render(paths[0], "image/png", cache=none)
    assert none.decodes == 1 and none.bytes == 0


def test_concurrent_requests_for_one_image_wait_for_one_decode(tmp_path):
    path, _ = _file(tmp_path, "a.dcm", 3)
    cache = wado.DecodedImages(16 << 20)
    out: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: out.append(wado.render(path, "image/png", cache=cache)[0]))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 6 and len(set(out)) == 1
    assert cache.decodes == 1 and cache.hits == 5


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rendered_pixels_match_the_float_reference(tmp_path, photometric):
    """What the lookup tables give equals the float computation they replace: the file's
    own window (inference.display.to_display, as 8 bits), a request's window over the
    Modality LUT, MONOCHROME1 inverted; signed pixels too."""
    path, ds = _file(tmp_path, "a.dcm", 4, photometric=photometric)
    png, _ = wado.render(path, "image/png")
    assert np.array_equal(_pixels(png), (to_display(ds) * 255).astype(np.uint8))
    assert np.array_equal(to_display8(ds), (to_display(ds) * 255).astype(np.uint8))
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    dcmwrite(path, ds, enforce_file_format=True)
    png, _ = wado.render(path, "image/png", window="3000,2500")
    values = ds.pixel_array.astype(np.float64) * 2 - 100
    ref = np.clip((values - 2999.5) / 2499 + 0.5, 0, 1) * 255
    ref = ref.astype(np.uint8)
    assert np.array_equal(_pixels(png), 255 - ref if photometric == "MONOCHROME1" else ref)
    # Signed stored values (PixelRepresentation 1), negative ones included.
    signed = ds.pixel_array.astype(np.int16) - 1000
    stored = wado.StoredFrame(signed, 1.0, 0.0, False)
    got = wado._window(stored, 500.0, 2000.0)
    ref = np.clip((signed.astype(np.float64) - 499.5) / 1999 + 0.5, 0, 1) * 255
    assert np.array_equal(got, ref.astype(np.uint8))


def test_bad_render_parameters_are_refused_before_any_decode(tmp_path):
    path, _ = _file(tmp_path, "a.dcm", 5)
    cache = wado.DecodedImages(16 << 20)
    for kw in ({"viewport": "0,10"}, {"viewport": "a,b"}, {"window": "x"}):
        with pytest.raises(ValueError):
            wado.render(path, "image/png", cache=cache, **kw)
    assert cache.decodes == 0


def test_a_frame_of_a_multi_frame_object_is_decoded_alone_and_cached_per_frame(tmp_path):
    from pydicom.uid import generate_uid

    ds = make_mammogram("R", "CC", rows=64, cols=48, seed=6)
    frames = [np.full((64, 48), 100 * (i + 1), np.uint16) for i in range(3)]
    frames[1][:32] = 3000
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(f.tobytes() for f in frames)
    ds.SOPInstanceUID = generate_uid()
    path = tmp_path / "mf.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    cache = wado.DecodedImages(1 << 20)
    png, _ = wado.render(path, "image/png", frame=2, cache=cache)
    center, width = wado._auto(frames[1])
    ref = wado._linear(frames[1].astype(np.float64), center, width)
    assert np.array_equal(_pixels(png), ref)
    wado.render(path, "image/png", frame=2, cache=cache)
    wado.render(path, "image/png", frame=3, cache=cache)
    assert cache.decodes == 2 and cache.bytes == 2 * 64 * 48
