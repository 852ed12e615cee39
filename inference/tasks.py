"""Task and class names (no torch import: the daemon's CLI reads these)."""

from __future__ import annotations

#: Slot order of the four inputs.
VIEWS: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO")
BREASTS: tuple[str, ...] = ("L", "R")
BIRADS_TASKS: dict[str, list[str]] = {
    "birads-1v5": ["BI-RADS 1", "BI-RADS 5"],
    "birads-3class": ["BI-RADS 1", "BI-RADS 2-3", "BI-RADS 4-5"],
    "birads-5class": [f"BI-RADS {i}" for i in range(1, 6)],
}
DIAGNOSIS_CLASSES: list[str] = ["normal", "benign", "malignant"]
#: BI-RADS breast density (composition), 5th edition: A almost entirely fat, B scattered
#: fibroglandular, C heterogeneously dense, D extremely dense.
DENSITY_CLASSES: list[str] = ["A", "B", "C", "D"]
ARCHS: tuple[str, ...] = ("hybrid", "cnn", "vssm")


def birads_to_class(task: str, birads: int | None) -> int:
    """Class index of a BI-RADS category (1-5) for ``task``; -1 when it has none."""
    if birads is None or not 1 <= int(birads) <= 5:
        return -1
    b = int(birads)
    if task == "birads-1v5":
        return {1: 0, 5: 1}.get(b, -1)
    if task == "birads-3class":
        return 0 if b == 1 else (1 if b <= 3 else 2)
    if task == "birads-5class":
        return b - 1
    raise ValueError(f"unknown task {task!r} (known: {', '.join(BIRADS_TASKS)})")
