"""The selective scan compiled for the CPU with numba (forward and backward kernels).

Forward: one task per (batch, block of 32 channels), the channels being the vector lanes and
the states held in a small (state, 32) array; backward: one task per (batch, B/C group), a
loop over time per channel. No (batch, channel, length, state) tensor is ever materialised,
which is what makes it fast on a 2-core machine. ``exp`` is computed in the kernels with a
vectorisable approximation (see ``_LOG2E``) instead of libm's scalar call.
Kernels are compiled on first use and cached on disk by numba; they release the GIL, so the
node's network threads keep running during a scan.
"""

from __future__ import annotations

import threading
from typing import Any

import numba as nb
import numpy as np
import torch
from torch.autograd.function import FunctionCtx

# numba's "workqueue" threading layer (used where OpenMP and TBB are missing) terminates the
# process when two threads launch parallel kernels at once; each kernel already uses every
# core, so serialising the launches costs nothing and makes the scan safe to call from
# several threads (a web service around MammoModel, say).
_LAUNCH = threading.Lock()


# exp(x) = 2^z with z = x * log2(e), split as 2^floor(z) * 2^frac(z): the power of two is
# built in the float32 exponent bits (an int32 scratch viewed as float32) and 2^frac by a
# degree-5 minimax polynomial on [0, 1) (max relative error 9e-8, about one float32 ulp).
# Unlike libm's scalar exp, the loops that use these two helpers vectorise (AVX2 / AVX-512).
_LOG2E = np.float32(1.4426950408889634)
_P5 = np.float32(1.8775767e-3)
_P4 = np.float32(8.9893397e-3)
_P3 = np.float32(5.5826318e-2)
_P2 = np.float32(2.4015361e-1)
_P1 = np.float32(6.9315308e-1)
_P0 = np.float32(9.9999994e-1)
_ZMIN = np.float32(-126.0)  # 2^-126: the smallest normal float32 (exp underflows to ~1e-38)
_ZMAX = np.float32(127.0)


@nb.njit(fastmath=True, cache=True, inline="always")
def _exp2_split(z: np.float32) -> tuple[np.float32, np.int32]:  # pragma: no cover - compiled
    """z -> (frac(z), the int32 bits of the float32 2^floor(z)), z clamped to float32's range."""
    z = min(max(z, _ZMIN), _ZMAX)
    zi = np.floor(z)
    return z - zi, (np.int32(zi) + np.int32(127)) << 23


@nb.njit(fastmath=True, cache=True, inline="always")
def _pow2_frac(f: np.float32) -> np.float32:  # pragma: no cover - compiled
    """2^f for f in [0, 1)."""
    return ((((_P5 * f + _P4) * f + _P3) * f + _P2) * f + _P1) * f + _P0


_LANES = 32  # channels per task in the forward kernel (see _forward)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
def _forward(
    u: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    gsize: int,
    y: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """One task per block of up to 32 channels of one B/C group: the channels are the vector
    lanes (a loop of fixed length 32, which LLVM vectorises whole, whatever the state size;
    a loop over a state of 16 or 4 fell to the scalar remainder of the vectorised loop and
    was 4x slower per element). Unused lanes of a last, partial block carry delta = u = 0:
    their state stays 0 and their output is not written."""
    b, d, l = u.shape
    n = A.shape[1]
    G = B.shape[1]
    nblk = (gsize + _LANES - 1) // _LANES
    for idx in nb.prange(b * G * nblk):
        bi = idx // (G * nblk)
        g = (idx // nblk) % G
        c0 = g * gsize + (idx % nblk) * _LANES
        nc = min(_LANES, (g + 1) * gsize - c0)
        h = np.zeros((n, _LANES), np.float32)
        a = np.zeros((n, _LANES), np.float32)
        for c in range(nc):
            for k in range(n):
                a[k, c] = A[c0 + c, k] * _LOG2E
        dtv = np.zeros(_LANES, np.float32)
        duv = np.zeros(_LANES, np.float32)
        acc = np.zeros(_LANES, np.float32)
        frac = np.empty((n, _LANES), np.float32)
        pow_bits = np.empty((n, _LANES), np.int32)
        pow2 = pow_bits.view(np.float32)
        Bg, Cg = B[bi, g], C[bi, g]  # (l, n)
        ub, db, yb = u[bi], delta[bi], y[bi]
        for t in range(l):
            for c in range(nc):
                dt = db[c0 + c, t]
                dtv[c] = dt
                duv[c] = dt * ub[c0 + c, t]
            for k in range(n):  # exp(dt * A) split into 2^int (as bits) and 2^frac
                for c in range(_LANES):
                    frac[k, c], pow_bits[k, c] = _exp2_split(dtv[c] * a[k, c])
            for c in range(_LANES):
                acc[c] = 0.0
            bt, ct = Bg[t], Cg[t]
            for k in range(n):
                bk, ck = bt[k], ct[k]
                for c in range(_LANES):
                    hv = _pow2_frac(frac[k, c]) * pow2[k, c] * h[k, c] + duv[c] * bk
                    h[k, c] = hv
                    acc[c] += hv * ck
            for c in range(nc):
                yb[c0 + c, t] = acc[c]


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
def _backward(
    u: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    gsize: int,
    gy: np.ndarray,
    gu: np.ndarray,
    gdelta: np.ndarray,
    gA_part: np.ndarray,
    gB: np.ndarray,
    gC: np.ndarray,
) -> None:  # pragma: no cover - compiled
    b, d, l = u.shape
    n = A.shape[1]
    G = B.shape[1]
    for idx in nb.prange(b * G):
        bi = idx // G
        g = idx % G
        hs = np.empty((l, n), np.float32)  # states h[t]
        es = np.empty((l, n), np.float32)  # decays exp(delta[t] * A)
        frac = np.empty(n, np.float32)
        pow_bits = np.empty(n, np.int32)
        pow2 = pow_bits.view(np.float32)
        gh = np.empty(n, np.float32)
        Bg, Cg = B[bi, g], C[bi, g]
        gBg, gCg = gB[bi, g], gC[bi, g]
        for di in range(g * gsize, (g + 1) * gsize):
            a = A[di]
            a2 = a * _LOG2E
            ub, db = u[bi, di], delta[bi, di]
            gyb, gub, gdb, gAb = gy[bi, di], gu[bi, di], gdelta[bi, di], gA_part[bi, di]
            h = np.zeros(n, np.float32)
            for t in range(l):  # recompute the states, keep the decays
                dt = db[t]
                du = dt * ub[t]
                for k in range(n):
                    frac[k], pow_bits[k] = _exp2_split(dt * a2[k])
                bt, et, ht = Bg[t], es[t], hs[t]
                for k in range(n):
                    e = _pow2_frac(frac[k]) * pow2[k]
                    et[k] = e
                    h[k] = e * h[k] + du * bt[k]
                    ht[k] = h[k]
            for k in range(n):
                gh[k] = 0.0
            for t in range(l - 1, -1, -1):
                dt = db[t]
                ut = ub[t]
                gyt = gyb[t]
                bt, ct, et, ht = Bg[t], Cg[t], es[t], hs[t]
                gbt, gct = gBg[t], gCg[t]
                gdt = np.float32(0.0)
                gut = np.float32(0.0)
                for k in range(n):
                    gh[k] += gyt * ct[k]
                    gct[k] += gyt * ht[k]
                    hprev = hs[t - 1, k] if t > 0 else np.float32(0.0)
                    ga = gh[k] * hprev * et[k]
                    bk = bt[k]
                    gdt += ga * a[k] + gh[k] * ut * bk
                    gAb[k] += ga * dt
                    gut += gh[k] * dt * bk
                    gbt[k] += gh[k] * dt * ut
                    gh[k] *= et[k]
                gdb[t] = gdt
                gub[t] = gut


def _layout(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    d = u.shape[1]
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    G = B.shape[1]
    if d % G:
        raise ValueError(f"channels ({d}) must be a multiple of the B/C groups ({G})")
    as_np = lambda t: t.detach().float().contiguous().numpy()  # noqa: E731
    Bt = B.detach().float().transpose(2, 3).contiguous().numpy()  # (b, G, l, n)
    Ct = C.detach().float().transpose(2, 3).contiguous().numpy()
    return as_np(u), as_np(delta), as_np(A), Bt, Ct, d // G


class NumbaScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C); bias, softplus, D and z are applied around it in torch."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
    ) -> torch.Tensor:
        un, dn, An, Bn, Cn, gsize = _layout(u, delta, A, B, C)
        y = np.empty_like(un)
        with _LAUNCH:
            _forward(un, dn, An, Bn, Cn, gsize, y)
        ctx.save_for_backward(u, delta, A, B, C)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, delta, A, B, C = ctx.saved_tensors
        un, dn, An, Bn, Cn, gsize = _layout(u, delta, A, B, C)
        gyn = gy.detach().float().contiguous().numpy()
        gu = np.empty_like(un)
        gdelta = np.empty_like(dn)
        gA_part = np.zeros((un.shape[0], *An.shape), np.float32)
        gB = np.zeros_like(Bn)
        gC = np.zeros_like(Cn)
        with _LAUNCH:
            _backward(un, dn, An, Bn, Cn, gsize, gyn, gu, gdelta, gA_part, gB, gC)
        gB_t = torch.from_numpy(gB).transpose(2, 3)
        gC_t = torch.from_numpy(gC).transpose(2, 3)
        if B.dim() == 3:
            gB_t, gC_t = gB_t[:, 0], gC_t[:, 0]
        return (
            torch.from_numpy(gu),
            torch.from_numpy(gdelta),
            torch.from_numpy(gA_part.sum(0)),
            gB_t.contiguous(),
            gC_t.contiguous(),
        )


def scan_numba(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Core scan on float32 CPU tensors (delta already biased / softplus'd); differentiable
    through :class:`NumbaScan`."""
    return NumbaScan.apply(u, delta, A, B, C)
