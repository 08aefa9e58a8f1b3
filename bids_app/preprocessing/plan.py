"""The preprocessing plan: every data decision the models depend on, saved with the models.

The plan is derived at the group level from the data fingerprint (as nnU-Net plans from a dataset
fingerprint) unless settings fix its values, written to the model directory as JSON, and read back
by the participant level so that inference always sees data prepared exactly as in training.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bids_app.errors import BadDataError, MissingInputError

PLAN_FILE = "preprocessing_plan.json"
PLAN_FORMAT = 1


@dataclass(frozen=True)
class PreprocessingPlan:
    """How a native image becomes a model-space volume.

    ``target_spacing`` and ``target_shape`` are in RAS voxel-axis order (after reorientation).
    Intensities map the per-image ``percentiles`` to [-1, 1] with clipping. Images with a
    non-finite fraction up to ``max_nonfinite_fraction`` get those voxels replaced (and a warning);
    more is an error. The default 0 makes any NaN/Inf voxel an error; the fraction is a run setting
    (``preprocessing.max_nonfinite_fraction``) that each run applies to the plan it uses.
    """

    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    target_shape: tuple[int, int, int] = (64, 64, 64)
    image_order: int = 1
    mask_interpolation: str = "nearest"
    percentiles: tuple[float, float] = (0.5, 99.5)
    max_nonfinite_fraction: float = 0.0

    def __post_init__(self) -> None:
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be 3 positive numbers, got {self.target_spacing}")
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape must be 3 positive integers, got {self.target_shape}")
        if self.image_order not in (1, 3):
            raise ValueError(f"image_order must be 1 (linear) or 3 (cubic), got {self.image_order}")
        if self.mask_interpolation not in ("nearest", "linear"):
            raise ValueError(f"mask_interpolation must be nearest or linear, got {self.mask_interpolation}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessingPlan":
        values = dict(data)
        fmt = values.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"preprocessing plan format {fmt} is not supported (expected {PLAN_FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown preprocessing plan field(s): {', '.join(unknown)}")
        for key in ("target_spacing", "percentiles"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        if "target_shape" in values:
            values["target_shape"] = tuple(int(v) for v in values["target_shape"])
        return cls(**values)

    def digest(self) -> str:
        """A short content hash: part of every cache key, so a changed plan invalidates the cache."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def save_plan(plan: PreprocessingPlan, directory: Path) -> Path:
    from bids_app.io import atomic_write_json

    return atomic_write_json(Path(directory) / PLAN_FILE, plan.to_dict())


def load_plan(directory: Path) -> PreprocessingPlan:
    """Read the plan of a model directory: missing is exit 66, invalid is bad data (65)."""
    path = Path(directory) / PLAN_FILE
    try:
        return PreprocessingPlan.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise MissingInputError(f"{path}: missing: the model directory has no preprocessing plan") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise BadDataError(f"{path}: invalid preprocessing plan: {exc}") from exc
