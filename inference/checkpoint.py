"""Checkpoints: safetensors weights plus the metadata needed to use them safely.

Metadata (all strings, as safetensors requires): ``format``, ``format_version``,
``model_config`` (JSON of :class:`ModelConfig`), ``task``, ``birads_classes``,
``diagnosis_classes``, ``input_size`` ("HxW"), ``training_data``, ``version``, ``created``,
``intended_use``, ``metrics`` (JSON, optional), ``operating_point`` (JSON, optional: the exam
score threshold chosen on validation data, with its specificity and sensitivity there),
``preprocessing`` (JSON: the input
normalisation ``mean`` / ``std``, breast ``segment``ation and the preprocessing ``version``
the weights were trained with; checkpoints without it used mean 0.5, std 0.5). Loading
checks every one of them against the weights and fails with a message that says what does
not match. The SHA-256 of the file is the model's identity in every result.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from inference.model import DENSITY_CLASSES, DIAGNOSIS_CLASSES, HybridCnnVssm, ModelConfig
from inference.preprocess import MEAN, PREPROCESS_VERSION, STD

FORMAT = "mammo-node-checkpoint"
FORMAT_VERSION = "1"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "demo.safetensors"
NOT_CLINICAL = (
    "Trained on synthetic phantoms only. NOT FOR CLINICAL USE: research and "
    "demonstration of the software only."
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message says why)."""


@dataclass
class CheckpointInfo:
    path: Path
    sha256: str
    config: ModelConfig
    metadata: dict[str, str]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.config.image_size)  # type: ignore[return-value]

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How images become this model's input (what training used)."""
        out: dict[str, Any] = {"mean": 0.5, "std": 0.5, "segment": True, "version": "1"}
        try:
            out.update(json.loads(self.metadata.get("preprocessing", "") or "{}"))
        except ValueError:
            pass
        return out

    @property
    def operating_point(self) -> float | None:
        """The 0-100 exam score above which an exam is called positive, chosen on
        validation data when the checkpoint was made (None: the checkpoint has none)."""
        try:
            op = json.loads(self.metadata.get("operating_point", "") or "null")
        except ValueError:
            return None
        return float(op["score"]) if isinstance(op, dict) and "score" in op else None

    @property
    def is_demo(self) -> bool:
        return "NOT FOR CLINICAL USE" in self.metadata.get("intended_use", "")

    def as_dict(self) -> dict[str, Any]:
        meta = dict(self.metadata)
        for k in (
            "model_config",
            "birads_classes",
            "diagnosis_classes",
            "metrics",
            "preprocessing",
            "operating_point",
        ):
            if meta.get(k):
                try:
                    meta[k] = json.loads(meta[k])
                except ValueError:
                    pass
        return {"path": str(self.path), "sha256": self.sha256, "metadata": meta}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mammo-node")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    model: HybridCnnVssm,
    path: str | Path,
    *,
    training_data: str,
    intended_use: str = "research",
    metrics: dict | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """Write weights and metadata; returns the file's SHA-256."""
    cfg = model.cfg
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "task": cfg.task,
        "birads_classes": json.dumps(cfg.birads_classes),
        "diagnosis_classes": json.dumps(DIAGNOSIS_CLASSES if cfg.diagnosis else []),
        "density_classes": json.dumps(DENSITY_CLASSES if cfg.density else []),
        "input_size": f"{cfg.image_size[0]}x{cfg.image_size[1]}",
        "training_data": training_data,
        "version": _package_version(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "intended_use": intended_use,
        "metrics": json.dumps(metrics or {}),
        "preprocessing": json.dumps(
            {"mean": MEAN, "std": STD, "segment": True, "version": PREPROCESS_VERSION}
        ),
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return sha256_file(path)


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and check a checkpoint's metadata (without building the model)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a mammo-node checkpoint (metadata format="
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}"
            f" is not supported (this mammo-node reads {FORMAT_VERSION!r})"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid model_config in metadata: {exc}") from exc
    if meta.get("task") != cfg.task:
        raise CheckpointError(
            f"{path}: metadata task {meta.get('task')!r} does not match the "
            f"model config's task {cfg.task!r}"
        )
    if json.loads(meta.get("birads_classes", "[]")) != cfg.birads_classes:
        raise CheckpointError(f"{path}: birads_classes in metadata do not match task {cfg.task!r}")
    if json.loads(meta.get("density_classes", "[]")) != (DENSITY_CLASSES if cfg.density else []):
        raise CheckpointError(
            f"{path}: density_classes in metadata do not match the model "
            f"config's density head ({cfg.density})"
        )
    size = f"{cfg.image_size[0]}x{cfg.image_size[1]}"
    if meta.get("input_size") != size:
        raise CheckpointError(
            f"{path}: metadata input_size {meta.get('input_size')!r} does not "
            f"match the model config's {size!r}"
        )
    return CheckpointInfo(path=path, sha256=sha256_file(path), config=cfg, metadata=meta)


def load_checkpoint(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    scan_backend: str | None = None,
) -> tuple[HybridCnnVssm, CheckpointInfo]:
    """Build the model of a checkpoint (None = the bundled demo) and load its weights."""
    info = read_info(path or DEMO_CHECKPOINT)
    cfg = info.config
    if scan_backend:
        cfg.scan_backend = scan_backend
    model = HybridCnnVssm(cfg)
    state = load_file(str(info.path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint "
                f"{tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            )
        raise CheckpointError(
            f"{info.path}: weights do not match the model config: " + "; ".join(parts)
        )
    model.load_state_dict(state)
    model.eval().to(device)
    return model, info
