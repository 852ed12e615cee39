"""The selective scan compiled for the CPU with numba (forward and backward kernels).

One task per (batch, channel) in the forward pass and per (batch, group) in the backward
pass, each a loop over time with the state vector in registers: no (batch, channel, length,
state) tensor is ever materialised, which is what makes it fast on a 2-core machine.
Kernels are compiled on first use and cached on disk by numba; they release the GIL, so the
node's network threads keep running during a scan.
"""

from __future__ import annotations

import math

import numpy as np
import numba as nb
import torch


@nb.njit(fastmath=True, cache=True, inline="always")
def _softplus(x):  # pragma: no cover - compiled
    # float32 in, float32 out: a float64 here would make every exp in the kernel float64
    return x if x > np.float32(20.0) else np.float32(math.log1p(math.exp(x)))


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")
def _forward(u, delta, A, B, C, bias, softplus, gsize, y):  # pragma: no cover - compiled
    b, d, l = u.shape
    n = A.shape[1]
    for idx in nb.prange(b * d):
        bi = idx // d
        di = idx % d
        g = di // gsize
        h = np.zeros(n, np.float32)
        e = np.empty(n, np.float32)
        a = A[di]
        Bg, Cg = B[bi, g], C[bi, g]
        ub, db, yb = u[bi, di], delta[bi, di], y[bi, di]
        for t in range(l):
            dt = np.float32(db[t] + bias[di])
            if softplus:
                dt = _softplus(dt)
            du = dt * ub[t]
            for k in range(n):  # the decays first: a loop of exps alone
                e[k] = np.exp(np.float32(dt * a[k]))
            bt, ct = Bg[t], Cg[t]
            acc = np.float32(0.0)
            for k in range(n):
                h[k] = e[k] * h[k] + du * bt[k]
                acc += h[k] * ct[k]
            yb[t] = acc


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _backward(u, delta, A, B, C, bias, softplus, gsize, gy, gu, gdelta, gA_part, gbias_part,
              gB, gC):  # pragma: no cover - compiled
    b, d, l = u.shape
    n = A.shape[1]
    G = B.shape[1]
    for idx in nb.prange(b * G):
        bi = idx // G
        g = idx % G
        hs = np.empty((l, n), np.float32)
        gh = np.empty(n, np.float32)
        for di in range(g * gsize, (g + 1) * gsize):
            a = A[di]
            h = np.zeros(n, np.float32)
            for t in range(l):  # recompute the states
                dt = delta[bi, di, t] + bias[di]
                if softplus:
                    dt = _softplus(dt)
                du = dt * u[bi, di, t]
                for k in range(n):
                    h[k] = math.exp(dt * a[k]) * h[k] + du * B[bi, g, t, k]
                    hs[t, k] = h[k]
            for k in range(n):
                gh[k] = 0.0
            for t in range(l - 1, -1, -1):
                raw = delta[bi, di, t] + bias[di]
                dt = _softplus(raw) if softplus else raw
                ut = u[bi, di, t]
                gyt = gy[bi, di, t]
                gdt = np.float32(0.0)
                gut = np.float32(0.0)
                for k in range(n):
                    gh[k] += gyt * C[bi, g, t, k]
                    gC[bi, g, t, k] += gyt * hs[t, k]
                    ea = math.exp(dt * a[k])
                    hprev = hs[t - 1, k] if t > 0 else np.float32(0.0)
                    ga = gh[k] * hprev * ea
                    bk = B[bi, g, t, k]
                    gdt += ga * a[k] + gh[k] * ut * bk
                    gA_part[bi, di, k] += ga * dt
                    gut += gh[k] * dt * bk
                    gB[bi, g, t, k] += gh[k] * dt * ut
                    gh[k] *= ea
                if softplus:  # d softplus(x) / dx = sigmoid(x)
                    gdt = gdt / (1.0 + math.exp(-raw))
                gdelta[bi, di, t] = gdt
                gbias_part[bi, di] += gdt
                gu[bi, di, t] = gut


def _layout(u, delta, A, B, C):
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
    """y = scan(u, softplus?(delta + bias), A, B, C); D and z are applied around it in torch."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, bias, softplus):
        un, dn, An, Bn, Cn, gsize = _layout(u, delta, A, B, C)
        bn = bias.detach().float().contiguous().numpy()
        y = np.empty_like(un)
        _forward(un, dn, An, Bn, Cn, bn, bool(softplus), gsize, y)
        ctx.save_for_backward(u, delta, A, B, C, bias)
        ctx.softplus = bool(softplus)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C, bias = ctx.saved_tensors
        un, dn, An, Bn, Cn, gsize = _layout(u, delta, A, B, C)
        bn = bias.detach().float().contiguous().numpy()
        gyn = gy.detach().float().contiguous().numpy()
        gu = np.empty_like(un)
        gdelta = np.empty_like(dn)
        gA_part = np.zeros((un.shape[0], *An.shape), np.float32)
        gbias_part = np.zeros((un.shape[0], un.shape[1]), np.float32)
        gB = np.zeros_like(Bn)
        gC = np.zeros_like(Cn)
        _backward(un, dn, An, Bn, Cn, bn, ctx.softplus, gsize, gyn, gu, gdelta, gA_part,
                  gbias_part, gB, gC)
        gB_t = torch.from_numpy(gB).transpose(2, 3)
        gC_t = torch.from_numpy(gC).transpose(2, 3)
        if B.dim() == 3:
            gB_t, gC_t = gB_t[:, 0], gC_t[:, 0]
        return (torch.from_numpy(gu), torch.from_numpy(gdelta),
                torch.from_numpy(gA_part.sum(0)), gB_t.contiguous(), gC_t.contiguous(),
                torch.from_numpy(gbias_part.sum(0)), None)


def scan_numba(u, delta, A, B, C, bias=None, softplus=False):
    """Core scan on CPU tensors; differentiable through :class:`NumbaScan`."""
    if bias is None:
        bias = torch.zeros(u.shape[1], dtype=torch.float32)
    return NumbaScan.apply(u, delta, A, B, C, bias, softplus)
