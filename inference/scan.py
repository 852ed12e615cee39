"""The selective scan (Mamba's S6 recurrence), with two implementations behind one function.

For every batch b, channel d and state n::

    h[t] = exp(delta[t] * A[d, n]) * h[t-1] + delta[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * h[t, n] + D[d] * u[t]          (then * silu(z) if z is given)

:func:`selective_scan` dispatches to ``mamba_ssm``'s CUDA kernel when it imports and the
tensors are on a GPU; on the CPU to the numba-compiled loop (:mod:`inference.scan_numba`,
forward and backward kernels) when numba imports, and to :func:`selective_scan_chunked`
(pure PyTorch, parallel within chunks) everywhere else.
:func:`selective_scan_ref` is the plain sequential loop the tests compare against.

The chunked scan: within a chunk of T steps the decay from step s to step t is
``exp(A * (Delta[t] - Delta[s]))`` with ``Delta`` the running sum of ``delta``, so

    h[t] = E[t] * (h_in + cumsum_s(x[s] / E[s])),   E[t] = exp(A * (Delta[t] - Delta[0]))

which is a few vectorised passes (one exp, one cumsum) instead of T dependent steps; only the
chunk-to-chunk carry is sequential (L / T small steps on (batch, channel, state)); ``h_in`` is
the carried state decayed by the chunk's first step. The chunk
length is chosen per call so that ``|A| * Delta`` stays below ``_MAX_LOG_RANGE`` inside every
chunk: ``1 / E`` cannot overflow in float32 however large the learned decays become (in the
limit, chunks of one step are the sequential scan).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_numba",
    "selective_scan_ref",
    "mamba_available",
    "numba_available",
    "backend_name",
]

_MAX_LOG_RANGE = 60.0  # exp(60) ~ 1e26, far from float32's 3e38
_CHUNKS = (64, 32, 16, 8, 4, 2, 1)

try:  # pragma: no cover - only where mamba-ssm was built (CUDA machines)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan
except Exception:  # ImportError, or a CUDA extension that fails to load
    _mamba_scan = None


try:
    from inference.scan_numba import scan_numba as _numba_scan
except Exception as _exc:  # numba missing or unusable on this platform (e.g. no cache dir)
    _numba_scan = None  # type: ignore[assignment]
    logging.getLogger("mammo_node.scan").warning(
        "the compiled CPU scan is unavailable (%s: %s); using the PyTorch chunked scan, which "
        "is several times slower (if numba cannot write its cache, set NUMBA_CACHE_DIR)",
        type(_exc).__name__,
        _exc,
    )


def backend_name(device: torch.device | str = "cpu") -> str:
    """The scan implementation :func:`selective_scan` uses for tensors on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "mamba-ssm (CUDA)" if _mamba_scan is not None else "chunked PyTorch (CUDA)"
    if _numba_scan is not None:
        import numba

        return f"numba (CPU, {numba.get_num_threads()} threads)"
    return "chunked PyTorch (CPU)"


def numba_available() -> bool:
    """True when the numba-compiled CPU scan is usable."""
    return _numba_scan is not None


def selective_scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The numba-compiled CPU scan (differentiable). Shapes as :func:`selective_scan`."""
    if _numba_scan is None:
        raise RuntimeError("numba is not importable here; use backend='chunked'")
    dtype_in = u.dtype
    uf, deltaf = u.float(), delta.float()
    # Bias and softplus in torch: its vectorised softplus is ~10x faster than libm's
    # scalar log1p/exp inside the kernel (measured at the model's shapes).
    if delta_bias is not None:
        deltaf = deltaf + delta_bias[..., None].float()
    if delta_softplus:
        deltaf = F.softplus(deltaf)
    y = _numba_scan(uf, deltaf, A.float(), B.float(), C.float())
    return _finish(y, uf, D, z, dtype_in)


def mamba_available() -> bool:
    """True when mamba-ssm's CUDA selective scan could be imported."""
    return _mamba_scan is not None


def _prepare(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.dtype, Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Common argument handling; returns float32 tensors with B, C as (b, d, n, l)."""
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    A = A.float()
    n = A.shape[1]

    def expand(M: torch.Tensor) -> torch.Tensor:
        M = M.float()
        if M.dim() == 3:  # (b, n, l): shared by all channels
            return M[:, None]  # (b, 1, n, l)
        g = M.shape[1]  # (b, g, n, l): groups of d // g channels
        return M.repeat_interleave(d // g, dim=1)

    return dtype_in, u, delta, A, expand(B), expand(C), n


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Plain sequential selective scan (the reference). Shapes as :func:`selective_scan`."""
    dtype_in, u, delta, A, B, C, n = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l = u.shape
    h = u.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        dBu = (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]  # (b, d, n)
        h = dA * h + dBu
        ys.append((h * C[:, :, :, t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z, dtype_in)


def _finish(
    y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype
) -> Tensor:
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def _chunk_length(delta: torch.Tensor, A: torch.Tensor, l: int) -> int:
    """Longest chunk in ``_CHUNKS`` whose total decay stays in float32's safe range."""
    with torch.no_grad():
        a_max = float(A.detach().abs().max()) if A.numel() else 0.0
        if a_max == 0.0:
            return _CHUNKS[0]
        cs = torch.cumsum(delta.detach(), dim=-1)
        cs = F.pad(cs, (1, 0))
        for T in _CHUNKS:
            if T >= l:
                window = cs[..., -1] - cs[..., 0]
            else:
                window = cs[..., T:] - cs[..., :-T]
            if T == 1 or float(window.max()) * a_max < _MAX_LOG_RANGE:
                return T
    return 1


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> Tensor:
    """Chunked selective scan in pure PyTorch (differentiable). Shapes as :func:`selective_scan`."""
    dtype_in, u, delta, A, B, C, n = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l = u.shape
    T = chunk or _chunk_length(delta, A, l)
    T = max(1, min(T, l))
    nc = math.ceil(l / T)
    pad = nc * T - l
    if pad:  # zero delta = no decay and no input: padded steps change nothing
        u_, delta_ = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B_, C_ = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    else:
        u_, delta_, B_, C_ = u, delta, B, C
    # (b, d, nc, T) and (b, d|1, n, nc, T) -> put the state axis last: (..., nc, T, n)
    dl = delta_.view(b, d, nc, T)
    Bc = B_.view(B_.shape[0], B_.shape[1], n, nc, T).permute(0, 1, 3, 4, 2)
    Cc = C_.view(C_.shape[0], C_.shape[1], n, nc, T).permute(0, 1, 3, 4, 2)
    # Decays relative to each chunk's first step (<= 0, and 0 at the first step), so that
    # a chunk of one step never divides by anything: chunk length 1 is exactly sequential.
    cum = torch.cumsum(dl, dim=-1)
    rel = cum - dl[..., :1]  # (b, d, nc, T)
    logE = rel[..., None] * A[None, :, None, None, :]  # (b, d, nc, T, n) <= 0
    E = torch.exp(logE)
    x = (dl * u_.view(b, d, nc, T))[..., None] * Bc  # (b, d, nc, T, n)
    S = torch.cumsum(x * torch.exp(-logE), dim=3)  # (b, d, nc, T, n)
    # Carry between chunks: entering chunk c the state decays by its first step, then
    # h_end = E_last * (h_in + S_last).
    first = torch.exp(dl[..., 0, None] * A[None, :, None, :])  # (b, d, nc, n)
    E_last, S_last = E[:, :, :, -1], S[:, :, :, -1]  # (b, d, nc, n)
    h = u.new_zeros(b, d, n)
    starts = []
    for c in range(nc):
        h_in = h * first[:, :, c]
        starts.append(h_in)
        h = E_last[:, :, c] * (h_in + S_last[:, :, c])
    H0 = torch.stack(starts, dim=2)[:, :, :, None]  # (b, d, nc, 1, n)
    y = ((S + H0) * E * Cc).sum(-1).reshape(b, d, nc * T)[..., :l]  # (b, d, l)
    return _finish(y, u, D, z, dtype_in)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with mamba-ssm's argument convention.

    Args:
        u: input, (batch, channels, length).
        delta: step sizes, (batch, channels, length).
        A: state matrix (diagonal), (channels, state); negative for a stable scan.
        B, C: input/output projections, (batch, state, length) or
            (batch, groups, state, length) with ``channels % groups == 0``.
        D: skip connection, (channels,), optional.
        z: gate, (batch, channels, length), optional: ``y * silu(z)``.
        delta_bias: (channels,), added to delta before the softplus.
        delta_softplus: apply softplus to delta.
        backend: "auto" (mamba-ssm on CUDA when importable; numba on the CPU when
            importable; else chunked), "mamba", "numba", "chunked" or "ref".

    Returns:
        y, (batch, channels, length), in u's dtype.
    """
    if backend == "auto":
        if u.is_cuda:
            backend = "mamba" if _mamba_scan is not None else "chunked"
        else:
            backend = "numba" if _numba_scan is not None else "chunked"
    if backend == "mamba":
        if _mamba_scan is None:
            raise RuntimeError(
                "mamba-ssm is not importable here; install the 'mamba' extra "
                "on a CUDA machine or use backend='chunked'"
            )
        return _mamba_scan(
            u.contiguous(),
            delta.contiguous(),
            A.contiguous(),
            B.contiguous(),
            C.contiguous(),
            D,
            z,
            delta_bias,
            delta_softplus,
        )
    if backend == "numba":
        return selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend != "chunked":
        raise ValueError(f"unknown selective-scan backend {backend!r}")
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
