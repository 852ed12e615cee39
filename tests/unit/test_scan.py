"""The selective scan: chunked PyTorch and numba paths equal the sequential reference."""

from __future__ import annotations

from pathlib import Path

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

pytestmark = pytest.mark.unit  # fast: the unit layer (python -m pytest -m unit)

SHAPES = [  # (batch, channels, length, state, groups or None)
    (2, 8, 37, 4, None),
    (1, 6, 1, 3, 2),
    (3, 4, 129, 16, 2),
    (2, 12, 255, 8, 4),
    (1, 3, 64, 1, None),
    (1, 70, 33, 5, None),  # two full 32-channel blocks of the numba kernel and a partial one
    (2, 96, 40, 4, 2),  # groups of 48 channels: each a full block and a partial one
]


def _inputs(b, d, l, n, g, seed=0, decay=8.0):
    gen = torch.Generator().manual_seed(seed)
    shp = (b, g, n, l) if g else (b, n, l)
    t = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    return dict(
        u=t(b, d, l),
        delta=t(b, d, l, scale=0.5),
        A=-torch.rand(d, n, generator=gen) * decay - 0.05,
        B=t(*shp),
        C=t(*shp),
        D=t(d),
        z=t(b, d, l),
        delta_bias=t(d, scale=0.1),
    )


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


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_stays_finite_with_huge_decays(impl):
    """Large |A| * delta would overflow a naive exp(-cumsum) (the chunk guard prevents it) and
    leaves the range of the numba kernel's exponent bits (it clamps)."""
    inp = _inputs(2, 4, 300, 8, None, decay=400.0)
    inp["delta"] = inp["delta"].abs() + 1.0
    y_ref = selective_scan_ref(**inp)
    y = impl(**inp)
    assert torch.isfinite(y).all()
    assert _close(y, y_ref)


@pytest.mark.skipif(not numba_available(), reason="numba is not importable here")
def test_numba_exp_accurate_over_the_whole_range():
    """Two steps with B = C = 1: y[0] = 1 and y[1] = exp(A) for decays from 1e-38 to 1 and
    growth up to 1e30; the relative error stays within that of rounding A to float32 itself
    (|A| * 2^-24) plus a couple of ulps."""
    z = torch.linspace(-87.0, 69.0, 4001)  # exp's float32 range, both signs
    d = z.numel()
    u = torch.zeros(1, d, 2)
    u[0, :, 0] = 1.0
    delta = torch.ones(1, d, 2)
    A = torch.zeros(d, 1)
    A[:, 0] = z
    B = torch.ones(1, 1, 2)
    C = torch.ones(1, 1, 2)
    y = selective_scan_numba(u, delta, A, B, C)
    want = torch.exp(z.double())
    rel = (y[0, :, 1].double() - want).abs() / want
    bound = 2.5e-7 + z.double().abs() * 1.2e-7
    assert bool((rel <= bound).all()), float((rel / bound).max())
    assert torch.equal(y[0, :, 0], torch.ones(d))


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


@pytest.mark.skipif(
    not (mamba_available() and torch.cuda.is_available()),
    reason="mamba-ssm and a CUDA GPU are only on the GPU machines",
)
def test_mamba_kernel_matches_pytorch_scan():  # pragma: no cover - GPU only
    inp = {k: v.cuda() for k, v in _inputs(2, 64, 1024, 16, 1).items()}
    y_m = selective_scan(**inp, delta_softplus=True, backend="mamba")
    y_c = selective_scan(**inp, delta_softplus=True, backend="chunked")
    assert float((y_m - y_c).abs().max()) <= 1e-3


@pytest.mark.skipif(not numba_available(), reason="numba is not importable here")
def test_numba_scan_from_several_threads_at_once():
    """numba's workqueue layer (where OpenMP/TBB are missing) kills the process on concurrent
    kernel launches; the scan serialises them. Run under that layer in a child process."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import threading, torch
        from inference.scan import selective_scan_numba
        torch.manual_seed(0)
        b, d, l, n = 2, 32, 512, 8
        args = (torch.randn(b, d, l), torch.rand(b, d, l) * 0.1, -torch.rand(d, n),
                torch.randn(b, n, l), torch.randn(b, n, l))
        want = selective_scan_numba(*args)  # alone; the kernel is deterministic
        bad = []
        def work():
            for _ in range(20):
                if not torch.equal(selective_scan_numba(*args), want):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("ok" if not bad else "wrong values")
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-2000:]


def test_without_numba_the_chunked_scan_is_used_and_said():
    """Where numba cannot be imported the CPU falls back to the chunked scan, with a warning
    that says why (an administrator sees it in the log)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)
        sys.modules["numba"] = None  # import numba -> ImportError
        import torch
        from inference.scan import backend_name, selective_scan, selective_scan_ref
        args = (torch.randn(1, 4, 50), torch.rand(1, 4, 50), -torch.rand(4, 3),
                torch.randn(1, 3, 50), torch.randn(1, 3, 50))
        assert float((selective_scan(*args) - selective_scan_ref(*args)).abs().max()) < 1e-4
        print(backend_name("cpu"))
    """)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "chunked PyTorch (CPU)"
    assert "compiled CPU scan is unavailable" in r.stderr
