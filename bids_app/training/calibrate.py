"""Stage ``calibrate``: the lesion threshold from healthy held-out participants, without lesion labels.

The same counterfactual procedure the participant level runs is applied to the validation
participants (healthy, never trained on); their native-grid residuals inside the analysis region are
pooled and the threshold is set at a high quantile of them, so that a healthy cord voxel exceeds it
with probability ``1 - quantile``. The pooled values are kept as the reference distribution that
turns a residual into the anomaly probability written as ``probseg``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from bids_app import killpoints
from bids_app.data import Sample
from bids_app.model_store import TrainedModels
from bids_app.pipelines.segment import adapter_for, counterfactual_settings, native_residual, residual_settings
from bids_app.segmentation.calibration import Calibration, calibrate
from bids_app.segmentation.lesions import lesion_free_threshold
from bids_app.settings import RunSettings

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


def segmentation_identity(seg: Any) -> dict[str, Any]:
    """Every segmentation setting the residuals depend on: a calibration holds only for these."""
    return {
        "use_adapter": seg.use_adapter, "adapter_scale": seg.adapter_scale, "strengths": list(seg.strengths),
        "n_samples": seg.n_samples, "steps": seg.steps, "sampler": seg.sampler, "eta": seg.eta,
        "median_size": seg.median_size, "grow_median_size": seg.grow_median_size, "polarity": seg.polarity, "reference": seg.reference,
        "window_overlap": seg.window_overlap, "edit_region": seg.edit_region, "cord_margin_mm": seg.cord_margin_mm,
        "noising": seg.noising, "patch_size": list(seg.patch_size), "patch_period": seg.patch_period,
        "patch_offsets": seg.patch_offsets, "detection_inset_mm": seg.detection_inset_mm,
        "residual_grid": "native",  # residuals taken on the image's own grid since session 7
    }


def calibration_identity(settings: RunSettings, upstream_sha256: str) -> dict[str, Any]:
    """What a calibration depends on: the model and every setting of the residual procedure."""
    return {"models_sha256": upstream_sha256, **segmentation_identity(settings.segmentation),
            "quantile": settings.segmentation.calibration_quantile,
            "rule": settings.segmentation.calibration_rule, "seed": settings.compute.seed,
            **({"image_fpr": settings.segmentation.calibration_image_fpr}
               if settings.segmentation.calibration_rule == "images" else {})}


def run_calibration(settings: RunSettings, models: TrainedModels, samples: Sequence[Sample], device: str) -> Calibration:
    """Threshold from the residuals of healthy images the models never saw."""
    seg = settings.segmentation
    cf = counterfactual_settings(seg, settings.compute.seed)
    residuals, regions, lesion_free, growth = [], [], [], []
    for sample in samples:
        rs = residual_settings(seg, sample.image)
        result = native_residual(sample.image, sample.masks.get("cord"), sample.name, models, cf, rs, device,
                                 adapter_for(models, seg), sample.masks.get("control"))
        residuals.append(result.residual)
        regions.append(result.detection_region)  # the voxels where a healthy image could get a lesion
        if result.growth is not None:
            growth.append(result.growth)
        if seg.calibration_rule == "images":
            lesion_free.append(lesion_free_threshold(result.residual, result.detection_region, result.spacing_mm,
                                                     seg.min_lesion_mm3, seg.majority_smoothing))
        log.info("calibrate: %s (%.1f s)%s", sample.name, result.seconds,
                 f", lesion-free from a threshold of {lesion_free[-1]:.4g}" if lesion_free else "")
        killpoints.reached("calibrate:image")
    calibration = calibrate(residuals, regions, quantile=seg.calibration_quantile,
                            lesion_free=lesion_free if seg.calibration_rule == "images" else None,
                            image_fpr=seg.calibration_image_fpr,
                            grow_residuals=growth or None)  # every image has one, or none does
    return calibration


def calibration_path(model_dir: Path) -> Path:
    return Path(model_dir) / CALIBRATION_FILE
