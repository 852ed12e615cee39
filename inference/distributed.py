"""Data-parallel training with torch.distributed (torchrun): the process group, BatchNorm
synchronised across ranks, the gathering of every rank's predictions, the ``--nproc`` launcher.

One process per device. ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` / ``MASTER_PORT``; without them training runs in one process as before.
Backend: NCCL when the device is CUDA, gloo on CPU.

BatchNorm: the encoders' BatchNorm layers see only their rank's views, so their statistics
are synchronised: :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`SyncBatchNormGloo` on
CPU (PyTorch's SyncBatchNorm runs only on accelerators), which all-reduces the per-channel
sums with the autograd-aware :func:`torch.distributed.nn.functional.all_reduce`. A run of N
ranks x batch b then normalises, and steps, as one process with batch N x b.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device) -> DistContext:
    """The process group of a torchrun launch (or a one-process context without one).

    On CUDA each rank takes ``cuda:LOCAL_RANK``; ``--device cuda:N`` is for one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA "
                f"device(s): --nproc_per_node must not exceed the GPUs"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


class SyncBatchNormGloo(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are those of every rank's batch together (CPU).

    The per-channel count, sum and sum of squares are all-reduced (differentiably, so the
    gradient flows through the shared statistics as in :class:`torch.nn.SyncBatchNorm`);
    running statistics are updated with the global unbiased variance, as one process with the
    whole batch would. Outside training or without a process group: plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        n_local = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n_local])
        stats = all_reduce(stats)
        s, ss, n = stats[:c], stats[c : 2 * c], stats[2 * c]
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
            and self.num_batches_tracked is not None
        ):
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Every BatchNorm2d of ``model`` synchronised across the ranks (no change in one
    process). The state dict keys and values are those of BatchNorm2d: checkpoints load in
    a model built without it."""
    if not ctx.distributed:
        return model
    if ctx.device.type != "cpu":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model  # the top module is no BatchNorm: converted in place
        return model

    def convert(m: nn.Module) -> nn.Module:
        out = m
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, SyncBatchNormGloo):
            out = SyncBatchNormGloo(
                m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
            )
            out.load_state_dict(m.state_dict())
            out.train(m.training)
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(model)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise sum over the ranks (a copy on the caller's device)."""
    if not ctx.distributed:
        return values
    t = values.detach().clone().to(ctx.device)
    dist.all_reduce(t)
    return t.to(values.device)


def gather_predictions(
    preds: dict[str, np.ndarray], order: list[int], total: int, ctx: DistContext
) -> dict[str, np.ndarray]:
    """Every rank's share of per-breast predictions, back in the records' order.

    ``order``: the record indices this rank predicted (two rows each: L, R)."""
    if not ctx.distributed:
        return preds
    shares: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(shares, (order, preds))
    out: dict[str, np.ndarray] = {}
    for key in preds:
        first = next(p[key] for _, p in shares if len(p[key]))
        rows = np.zeros((total * 2, *first.shape[1:]), dtype=first.dtype)
        for idx, p in shares:
            for j, i in enumerate(idx):
                rows[2 * i : 2 * i + 2] = p[key][2 * j : 2 * j + 2]
        out[key] = rows
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """``mammo-node train --nproc N ...``: the same command under torchrun on this machine
    (``--standalone``: a rendezvous on a free local port)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "node",
        *argv,
    ]
    return subprocess.call(cmd)
