"""The selective scan: chunked PyTorch and numba paths equal the sequential reference."""

from __future__ import annotations

import pytest
import torch

from inference.scan import (
    mamba_available,
    numba_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_numba,
    selective_scan_ref,
)

SHAPES = [  # (batch, channels, length, state, groups or None)
    (2, 8, 37, 4, None),
    (1, 6, 1, 3, 2),
    (3, 4, 129, 16, 2),
    (2, 12, 255, 8, 4),
    (1, 3, 64, 1, None),
]


def _inputs(b, d, l, n, g, seed=0, decay=8.0):
    gen = torch.Generator().manual_seed(seed)
    shp = (b, g, n, l) if g else (b, n, l)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale)  # noqa: E731
    return dict(u=t(b, d, l), delta=t(b, d, l, scale=0.5), A=-torch.rand(d, n, generator=gen)
                * decay - 0.05, B=t(*shp), C=t(*shp), D=t(d), z=t(b, d, l),
                delta_bias=t(d, scale=0.1))


def _run(fn, inp):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = fn(**leaves, delta_softplus=True)
    (y * torch.cos(y)).sum().backward()  # a loss whose gradient depends on y
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _close(a, b, tol=1e-4):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


IMPLS = [selective_scan_chunked] + ([selective_scan_numba] if numba_available() else [])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_equals_sequential_reference_values_and_gradients(impl, shape):
    inp = _inputs(*shape)
    y_ref, g_ref = _run(selective_scan_ref, inp)
    y, g = _run(impl, inp)
    assert y.shape == (shape[0], shape[1], shape[2])
    assert _close(y, y_ref), float((y - y_ref).abs().max())
    for k in g_ref:
        assert g[k] is not None and g[k].shape == g_ref[k].shape, k
        assert _close(g[k], g_ref[k]), (k, float((g[k] - g_ref[k]).abs().max()))


def test_chunked_stays_finite_with_huge_decays():
    """Large |A| * delta would overflow a naive exp(-cumsum); the chunk guard prevents it."""
    inp = _inputs(2, 4, 300, 8, None, decay=400.0)
    inp["delta"] = inp["delta"].abs() + 1.0
    y_ref = selective_scan_ref(**inp)
    y = selective_scan_chunked(**inp)
    assert torch.isfinite(y).all()
    assert _close(y, y_ref)


def test_explicit_chunk_lengths_agree():
    inp = _inputs(1, 4, 100, 4, None, decay=2.0)
    ref = selective_scan_ref(**inp)
    for chunk in (1, 7, 16, 100, 128):
        assert _close(selective_scan_chunked(**inp, chunk=chunk), ref)


def test_dispatch_on_cpu_is_compiled_or_chunked():
    inp = _inputs(1, 4, 20, 4, None)
    ref = selective_scan_ref(**inp)
    assert _close(selective_scan(**inp), ref)
    assert _close(selective_scan(**inp, backend="chunked"), ref)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(**inp, backend="nope")
    if not mamba_available():
        with pytest.raises(RuntimeError, match="mamba-ssm is not importable"):
            selective_scan(**inp, backend="mamba")


@pytest.mark.skipif(not (mamba_available() and torch.cuda.is_available()),
                    reason="mamba-ssm and a CUDA GPU are only on the GPU machines")
def test_mamba_kernel_matches_pytorch_scan():  # pragma: no cover - GPU only
    inp = {k: v.cuda() for k, v in _inputs(2, 64, 1024, 16, 1).items()}
    y_m = selective_scan(**inp, delta_softplus=True, backend="mamba")
    y_c = selective_scan(**inp, delta_softplus=True, backend="chunked")
    assert float((y_m - y_c).abs().max()) <= 1e-3
