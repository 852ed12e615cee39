"""HybridCnnVssm: the four-view, multi-task mammography model (arXiv 2507.16955), timm style.

One file: a config dataclass, the building blocks, the model and a factory.

Per view, an encoder turns a (1, H, W) mammogram into a feature map:

* ``hybrid`` (default): convolutional stem and residual stages for local texture, then
  Visual State Space (VSS) stages whose SS2D layer scans the feature map in four directions
  (row-major, column-major, both reversed) with a selective scan, patch merging in between
  (VMamba's design);
* ``cnn``: every stage convolutional (the CNN-only baseline, same widths);
* ``vssm``: patch embedding, then VSS stages only (the VSSM-only baseline).

A learned spatial attention pooling turns each feature map into a view embedding and gives
the per-view attention map. A gated attention fusion (``tanh(V h) * sigmoid(U h)``, one
scoring head per breast, softmax over the views present) weighs the four views, with learned
view and laterality embeddings; missing views are masked out before the softmax. Heads per
breast: BI-RADS for the chosen task and, optionally, diagnosis (normal / benign / malignant).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.scan import selective_scan
from inference.tasks import (  # noqa: E402,F401  (re-exported)
    ARCHS,
    BIRADS_TASKS,
    BREASTS,
    DENSITY_CLASSES,
    DIAGNOSIS_CLASSES,
    VIEWS,
    birads_to_class,
)

#: The algorithm a checkpoint's architecture is, as results name it (SR Algorithm Name,
#: Secondary Capture captions, the API's ``model["name"]``).
ALGORITHM_NAMES = {"hybrid": "HybridCnnVssm", "cnn": "CnnBaseline", "vssm": "VssmOnly"}


def algorithm_name(arch: str) -> str:
    return ALGORITHM_NAMES.get(arch, arch)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (stored in every checkpoint)."""

    arch: str = "hybrid"
    dims: tuple[int, ...] = (24, 48, 96, 192)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    conv_stages: int = 2  # hybrid: how many leading stages are convolutional
    d_state: int = 4  # VMamba v2 runs with 1; 4 keeps hybrid <= 2x cnn on CPU
    ssm_ratio: float = 1.0
    mlp_ratio: float = 2.0
    weights: str = "shared"  # "shared" encoder for all views, or "separate" per view type
    image_size: tuple[int, int] = (512, 256)  # (H, W) of each view after preprocessing
    task: str = "birads-5class"
    diagnosis: bool = True  # multi-task: also a diagnosis head
    #: also a BI-RADS density (A-D) head per breast; checkpoints without the key have none
    density: bool = False
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"birads": 1.0, "diagnosis": 1.0, "density": 1.0}
    )
    attn_dim: int = 96
    dropout: float = 0.1
    scan_backend: str = "auto"

    def validate(self) -> ModelConfig:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.weights not in ("shared", "separate"):
            raise ValueError(f"weights must be 'shared' or 'separate', got {self.weights!r}")
        if self.task not in BIRADS_TASKS:
            raise ValueError(f"task must be one of {list(BIRADS_TASKS)}, got {self.task!r}")
        if len(self.dims) != len(self.depths):
            raise ValueError("dims and depths must have the same length")
        h, w = self.image_size
        if h % 32 or w % 32:
            raise ValueError(f"image_size must be multiples of 32, got {h}x{w}")
        return self

    @property
    def birads_classes(self) -> list[str]:
        return BIRADS_TASKS[self.task]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dims"], d["depths"] = list(self.dims), list(self.depths)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        for k in ("dims", "depths", "image_size"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d).validate()


# --------------------------------------------------------------------------- blocks
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """ResNet basic block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


class SS2D(nn.Module):
    """VMamba's 2-D selective scan: four directional scans of the feature map, merged.

    Works on channels-last tensors (B, H, W, C).
    """

    K = 4

    def __init__(
        self, dim: int, d_state: int = 4, ssm_ratio: float = 1.0, scan_backend: str = "auto"
    ) -> None:
        super().__init__()
        di = int(ssm_ratio * dim)
        self.di, self.n, self.r = di, d_state, math.ceil(dim / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(dim, 2 * di, bias=False)
        self.conv = nn.Conv2d(di, di, 3, padding=1, groups=di)
        self.x_proj_weight = nn.Parameter(torch.randn(self.K, self.r + 2 * d_state, di) * di**-0.5)
        self.dt_projs_weight = nn.Parameter(
            torch.empty(self.K, di, self.r).uniform_(-(self.r**-0.5), self.r**-0.5)
        )
        # dt initialised log-uniformly in [1e-3, 1e-1], as Mamba does (inverse softplus).
        dt = torch.exp(
            torch.rand(self.K, di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
        ).clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.K * di, 1)
        self.A_logs = nn.Parameter(torch.log(A))  # (K*di, N)
        self.Ds = nn.Parameter(torch.ones(self.K * di))
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, di) each
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))  # (B, di, H, W)
        L = h * w
        x_hw = x.flatten(2)  # row-major (B, di, L)
        x_wh = x.transpose(2, 3).flatten(2)  # column-major
        xs = torch.stack([x_hw, x_wh, x_hw.flip(-1), x_wh.flip(-1)], dim=1)  # (B, K, di, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.r, self.n, self.n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, di, L)
        y = selective_scan(
            xs.reshape(b, -1, L),
            dts.reshape(b, -1, L),
            -torch.exp(self.A_logs.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            self.Ds.float(),
            z=None,
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        ).view(b, self.K, self.di, L)
        y_hw = y[:, 0] + y[:, 2].flip(-1)
        y_wh = (y[:, 1] + y[:, 3].flip(-1)).view(b, self.di, w, h).transpose(2, 3)
        y = (y_hw.view(b, self.di, h, w) + y_wh).permute(0, 2, 3, 1)  # (B, H, W, di)
        y = self.out_norm(y.to(z.dtype)) * F.silu(z)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    """x + SS2D(LN(x)), then x + MLP(LN(x)); channels-first in and out."""

    def __init__(
        self, dim: int, d_state: int, ssm_ratio: float, mlp_ratio: float, scan_backend: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ssm = SS2D(dim, d_state, ssm_ratio, scan_backend)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + self.ssm(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


def _downsample(cin: int, cout: int, conv: bool) -> nn.Module:
    if conv:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
    # VMamba-style patch merging: 2x2 patches -> linear projection, then LayerNorm.
    return nn.Sequential(nn.Conv2d(cin, cout, 2, stride=2), LayerNorm2d(cout))


class ViewEncoder(nn.Module):
    """(B, 1, H, W) -> (B, C, H/32, W/32) feature map."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dims
        n_conv = {"hybrid": cfg.conv_stages, "cnn": len(d), "vssm": 0}[cfg.arch]
        if n_conv > 0:
            self.stem = nn.Sequential(
                nn.Conv2d(1, d[0] // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(d[0] // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(d[0] // 2, d[0], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(d[0]),
                nn.ReLU(inplace=True),
            )  # /4
        else:
            self.stem = nn.Sequential(nn.Conv2d(1, d[0], 4, stride=4), LayerNorm2d(d[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(d, cfg.depths)):
            conv = i < n_conv
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(_downsample(d[i - 1], dim, conv))  # /2 per stage
            for _ in range(depth):
                layers.append(
                    ResBlock(dim)
                    if conv
                    else VSSBlock(dim, cfg.d_state, cfg.ssm_ratio, cfg.mlp_ratio, cfg.scan_backend)
                )
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(d[-1])
        # Learned spatial attention pooling: where the evidence for this view lies.
        self.attn = nn.Conv2d(d[-1], 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, a, _ = self.forward_features(x)
        return pooled, a

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled (B, C), attention (B, h, w), feature map (B, C, h, w))."""
        f = self.norm(self.stages(self.stem(x)))  # (B, C, h, w)
        logits = self.attn(f).flatten(1)  # (B, h*w)
        a = torch.softmax(logits.float(), dim=1).to(f.dtype)
        pooled = torch.einsum("bcl,bl->bc", f.flatten(2), a)  # (B, C)
        return pooled, a.view(f.shape[0], *f.shape[2:]), f


class GatedViewFusion(nn.Module):
    """Gated attention over the four views, one scoring head per breast."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.view_emb = nn.Parameter(torch.zeros(2, dim))  # CC, MLO
        self.lat_emb = nn.Parameter(torch.zeros(2, dim))  # L, R
        nn.init.normal_(self.view_emb, std=0.02)
        nn.init.normal_(self.lat_emb, std=0.02)
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, len(BREASTS))
        # Learned prior of each breast head for each slot: own views first.
        prior = torch.tensor([[2.0, 2.0, -2.0, -2.0], [-2.0, -2.0, 2.0, 2.0]])
        self.slot_bias = nn.Parameter(prior)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h: (B, 4, C) in VIEWS order; mask: (B, 4) bool, True = view present.
        view_idx = torch.tensor([0, 1, 0, 1], device=h.device)
        lat_idx = torch.tensor([0, 0, 1, 1], device=h.device)
        h = h + self.view_emb[view_idx] + self.lat_emb[lat_idx]
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))  # (B, 4, 2)
        scores = scores.transpose(1, 2).float() + self.slot_bias  # (B, 2, 4)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, 2, 4)
        weights = torch.nan_to_num(weights, nan=0.0).to(h.dtype)  # no view at all
        return torch.einsum("bjv,bvc->bjc", weights, h), weights


class HybridCnnVssm(nn.Module):
    """Four views in, per-breast BI-RADS (and diagnosis) logits out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.weights == "shared":
            self.encoders = nn.ModuleDict({"all": ViewEncoder(cfg)})
        else:
            self.encoders = nn.ModuleDict({"CC": ViewEncoder(cfg), "MLO": ViewEncoder(cfg)})
        dim = cfg.dims[-1]
        self.fusion = GatedViewFusion(dim, cfg.attn_dim)
        self.head_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.birads_head = nn.Linear(dim, len(cfg.birads_classes))
        self.diagnosis_head = nn.Linear(dim, len(DIAGNOSIS_CLASSES)) if cfg.diagnosis else None
        self.density_head = nn.Linear(dim, len(DENSITY_CLASSES)) if cfg.density else None
        #: Set by data-parallel training (see forward).
        self.run_every_encoder = False

    def _encoder_for(self, view_index: int) -> ViewEncoder:
        enc = self.encoders[
            "all" if "all" in self.encoders else "CC" if view_index % 2 == 0 else "MLO"
        ]
        assert isinstance(enc, ViewEncoder)
        return enc

    def _heads(
        self, emb: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        fused, weights = self.fusion(emb, mask)  # (B, 2, C)
        z = self.drop(self.head_norm(fused))
        out = {"birads_logits": self.birads_head(z)}
        if self.diagnosis_head is not None:
            out["diagnosis_logits"] = self.diagnosis_head(z)
        if self.density_head is not None:
            out["density_logits"] = self.density_head(z)
        return out, weights

    def suspicion_logit(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2): the log-odds of malignancy per breast, what marks explain: of the
        diagnosis head's "malignant" when the model has one, else of the suspicious BI-RADS
        classes (4 and above; the last class of a grouped task)."""
        if "diagnosis_logits" in out:
            logits = out["diagnosis_logits"].float()
            pos = [DIAGNOSIS_CLASSES.index("malignant")]
        else:
            logits = out["birads_logits"].float()
            classes = self.cfg.birads_classes
            pos = [
                i
                for i, c in enumerate(classes)
                if c.replace("BI-RADS", "").strip()[:1] in ("4", "5")
            ] or [len(classes) - 1]
        neg = [i for i in range(logits.shape[-1]) if i not in pos]
        return torch.logsumexp(logits[..., pos], -1) - torch.logsumexp(logits[..., neg], -1)

    def region_evidence(
        self, emb: torch.Tensor, attn: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 4, h, w): each position's contribution to its breast's suspicion logit
        (:meth:`suspicion_logit`): how much the logit falls when that position's feature, with
        its attention weight, is replaced by the view's average feature (the pooled embedding
        becomes ``pooled + a_l * (mean_f - f_l)``), the views and heads run again on it.
        Attention weight x the feature's effect, exact rather than a gradient (LayerNorm
        makes the heads scale-invariant, and a first-order attribution then loses its sign);
        positive = towards malignancy. Costs one pass of the small heads per position, batched."""
        b, _, c, h, w = feats.shape
        n = h * w
        f = feats.float().flatten(3)  # (B, 4, C, n)
        a = attn.float().flatten(2)  # (B, 4, n)
        base = self.suspicion_logit(self._heads(emb.float(), mask)[0])  # (B, 2)
        out = torch.zeros(b, 4, n, device=feats.device)
        for i in range(b):
            for v in range(4):
                if not bool(mask[i, v]):
                    continue
                e = emb[i].float().expand(n, 4, c).clone()  # (n, 4, C)
                delta = a[i, v][None, :] * (f[i, v].mean(1, keepdim=True) - f[i, v])
                e[:, v] = e[:, v] + delta.T
                s = self.suspicion_logit(self._heads(e, mask[i].expand(n, 4))[0])
                j = 0 if v < 2 else 1  # own breast
                out[i, v] = base[i, j] - s[:, j]
        return out.view(b, 4, h, w)

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, evidence: bool = False
    ) -> dict[str, torch.Tensor]:
        """images: (B, 4, 1, H, W) in VIEWS order; mask: (B, 4) bool (view present).

        Returns a dict with ``birads_logits`` (B, 2, classes), ``diagnosis_logits``
        (B, 2, 3) when the model has that head, ``fusion_weights`` (B, 2, 4) (per breast,
        over the views), ``attention`` (B, 4, h, w) spatial attention per view (zeros for a
        missing view) and ``breast_present`` (B, 2) (the breast has at least one view);
        with ``evidence``, also ``evidence`` (B, 4, h, w) (:meth:`region_evidence`).
        """
        b = images.shape[0]
        mask = mask.bool()
        dim = self.cfg.dims[-1]
        emb = images.new_zeros(b, 4, dim)
        h, w = images.shape[-2] // 32, images.shape[-1] // 32
        attn = images.new_zeros(b, 4, h, w)
        groups = [(0, 1, 2, 3)] if "all" in self.encoders else [(0, 2), (1, 3)]
        feats: torch.Tensor | None = None
        for views in groups:
            sel = mask[:, list(views)]  # (B, len(views))
            bi, vi = sel.nonzero(as_tuple=True)
            if bi.numel() == 0:
                if self.run_every_encoder:
                    # Data-parallel training: every rank runs every encoder (the same
                    # collectives in the same order: synchronised BatchNorm, DDP's buckets);
                    # one blank view, its output weighted 0.
                    blank = images.new_zeros(1, *images.shape[2:])
                    emb = emb + 0.0 * self._encoder_for(views[0])(blank)[0].sum()
                continue
            v = torch.tensor(views, device=images.device)[vi]
            x = images[bi, v]  # (n, 1, H, W)
            pooled, a, f = self._encoder_for(views[0]).forward_features(x)
            emb = emb.index_put((bi, v), pooled.to(emb.dtype))
            attn = attn.index_put((bi, v), a.to(attn.dtype))
            if evidence:
                if feats is None:
                    feats = images.new_zeros(b, 4, f.shape[1], h, w)
                feats = feats.index_put((bi, v), f.to(feats.dtype))
        out, weights = self._heads(emb, mask)
        out["fusion_weights"] = weights
        out["attention"] = attn
        out["breast_present"] = torch.stack([mask[:, :2].any(1), mask[:, 2:].any(1)], dim=1)
        if evidence:
            out["evidence"] = (
                self.region_evidence(emb, attn, feats, mask)
                if feats is not None
                else torch.zeros_like(attn)
            )
        return out

    def loss_terms(
        self,
        out: dict[str, torch.Tensor],
        birads: torch.Tensor,
        diagnosis: torch.Tensor | None = None,
        density: torch.Tensor | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per task: (cross-entropy summed over the labelled breasts, how many are labelled);
        labels (B, 2) with -1 = unknown."""
        terms = {"birads": _ce_sum(out["birads_logits"], birads)}
        if diagnosis is not None and "diagnosis_logits" in out:
            terms["diagnosis"] = _ce_sum(out["diagnosis_logits"], diagnosis)
        if density is not None and "density_logits" in out:
            terms["density"] = _ce_sum(out["density_logits"], density)
        return terms

    def loss(
        self,
        out: dict[str, torch.Tensor],
        birads: torch.Tensor,
        diagnosis: torch.Tensor | None = None,
        density: torch.Tensor | None = None,
        counts: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted multi-task cross-entropy, the mean over labelled breasts; labels (B, 2)
        with -1 = unknown (density: only where a data set has density labels).

        ``counts``: the number of labelled breasts per task to divide by (default: this
        batch's). Data-parallel training passes the count over every rank divided by the
        world size, so that the ranks' averaged gradient is one process's over the whole
        batch. Every head stays in the graph (x 0 when unlabelled), as DDP requires."""
        lw = self.cfg.loss_weights
        total = out["birads_logits"].float().sum() * 0.0
        parts: dict[str, float] = {}
        for k, (s, n) in self.loss_terms(out, birads, diagnosis, density).items():
            denom = float(counts[k]) if counts is not None else float(n)
            total = total + s * (lw.get(k, 1.0) / denom if denom > 0 else 0.0)
            if n > 0:
                parts[k] = float(s.detach() / n)
        return total, parts


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = logits.float().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    return (
        F.cross_entropy(flat, y, ignore_index=-1, reduction="sum"),
        (y >= 0).sum().to(torch.float32),
    )


def create_model(arch: str = "hybrid", **kwargs: Any) -> HybridCnnVssm:
    """Factory: ``create_model("hybrid", weights="separate", task="birads-1v5")``."""
    return HybridCnnVssm(ModelConfig(arch=arch, **kwargs))
