"""Config keys of counterseg 0.1.0 (flat ``segmentation`` settings): read for one more version.

A key that moved is translated to its new place with a warning that names it. A key whose
variants were removed (the project measured them worse or no better, docs/benchmarks.md) is
accepted with a warning when it asks for what the app still does, and refused (exit 64)
otherwise. Both go in the version after 0.2.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from bids_app.errors import UsageError
from bids_app.settings.fields import set_path

log = logging.getLogger(__name__)

#: Old ``segmentation.<key>`` -> the new setting's path.
MOVED: dict[str, str] = {
    **{key: f"segmentation.counterfactual.{key}" for key in
       ("strengths", "n_samples", "adapter_scale", "window_overlap", "patch_size", "patch_period", "patch_offsets")},
    "polarity": "segmentation.residual.polarity",
    "detection_inset_mm": "segmentation.residual.detection_inset_mm",
    "min_lesion_mm3": "segmentation.lesions.min_lesion_mm3",
    "grow_quantile": "segmentation.lesions.grow_quantile",
    "threshold": "segmentation.lesions.threshold",
    "calibration_quantile": "segmentation.calibration.quantile",
    "calibration_image_fpr": "segmentation.calibration.image_fpr",
    "batch_size": "compute.inference_batch_size",
    "precision": "compute.precision",
    "max_latent_voxels": "compute.max_latent_voxels",
    "overwrite": "overwrite",
}

#: Removed settings -> (the one behaviour left, what it means).
REMOVED: dict[str, tuple[Any, str]] = {
    "segmentation.steps": (1, "one denoising step (the clean latent read off the noised one)"),
    "segmentation.sampler": ("ddim", "the DDIM read-out"),
    "segmentation.eta": (0.0, "a deterministic read-out"),
    "segmentation.reference": ("both", "the agreement of the transferred and the raw residual"),
    "segmentation.noising": ("patch", "patched noising"),
    "segmentation.edit_region": ("cord", "only the cord is regenerated"),
    "segmentation.calibration_rule": ("images", "the image-level rule (segmentation.calibration.image_fpr)"),
    "segmentation.majority_smoothing": (False, "no majority smoothing"),
    "segmentation.compile": (False, "no torch.compile"),
    "segmentation.median_size": (3, "a 3-voxel median filter before thresholding"),
    "segmentation.grow_median_size": (1, "growth over the unsmoothed residual"),
    "segmentation.cord_margin_mm": (0.0, "the cord mask as it is"),
    "training.vqgan.lr_schedule": ("constant", "a constant learning rate"),
    "training.vqgan.cord_weight": (0.0, "the plain L1 loss"),
}


def migrate(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with 0.1.0 keys moved to their new places; refuses removed variants (exit 64)."""
    values = _copy(values)
    segmentation = values.get("segmentation")
    if isinstance(segmentation, dict):
        use_adapter = segmentation.pop("use_adapter", None)
        for key in [k for k in segmentation if k in MOVED]:
            new = MOVED[key]
            log.warning("setting segmentation.%s is deprecated: it is now %s", key, new)
            _put(values, new, segmentation.pop(key))
        if use_adapter is not None:
            log.warning("setting segmentation.use_adapter is deprecated: use segmentation.counterfactual."
                        "adapter_scale (0: no adapter)")
            if use_adapter is False:  # switched off, whatever scale it had
                set_path(values, "segmentation.counterfactual.adapter_scale", 0.0)
    for path, (kept, meaning) in REMOVED.items():
        section, _, key = path.rpartition(".")
        holder = _get(values, section)
        if not isinstance(holder, dict) or key not in holder:
            continue
        value = holder.pop(key)
        if value != kept:
            raise UsageError(f"setting {path} was removed: counterseg always uses {meaning} ({path}: {kept!r}); "
                             f"remove it from the config file")
        log.warning("setting %s was removed (counterseg always uses %s): remove it from the config file", path,
                    meaning)
    return values


def _copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}


def _get(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _put(values: dict[str, Any], path: str, value: Any) -> None:
    section, _, key = path.rpartition(".")
    holder = _get(values, section) if section else values
    if isinstance(holder, Mapping) and key in holder and holder[key] != value:
        raise UsageError(f"setting {path} is given twice, under its old and its new name, with different values")
    set_path(values, path, value)
