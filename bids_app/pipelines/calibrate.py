"""The lesion threshold from healthy held-out images, without lesion labels (stage ``calibrate``).

The participant level's procedure (:func:`~bids_app.pipelines.segment.native_residual`) runs on
healthy images the models never trained on; their residuals give the healthy reference and, with
each image's lesion-free threshold, the threshold (:func:`bids_app.segmentation.calibration.calibrate`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from bids_app import killpoints, runlog
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput, native_residual
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.segmentation.calibration import Calibration, calibrate
from bids_app.segmentation.lesions import lesion_free_threshold
from bids_app.segmentation.residuals import RESIDUAL_MAP_VERSION
from bids_app.settings.fields import calibrated_values
from bids_app.settings.segmentation import SegmentationSettings, resolve_polarity

log = logging.getLogger(__name__)

def calibration_identity(seg: SegmentationSettings, seed: int, models_sha256: str,
                         suffixes: Sequence[str] = ()) -> dict[str, Any]:
    """What a calibration holds for: the models, the seed, every setting declared ``calibrated``, the
    version of the residual map, and the residual polarity as resolved for each contrast it
    calibrates (``auto`` means different polarities for different contrasts, so the resolved one is
    what the threshold holds for)."""
    identity = {"models_sha256": models_sha256, "seed": seed, "segmentation": calibrated_values(seg),
                "residual_map": RESIDUAL_MAP_VERSION}
    if suffixes:
        identity["polarity"] = {suffix: resolve_polarity(seg.residual.polarity, suffix) for suffix in sorted(set(suffixes))}
    return identity


def run_calibration(pipeline: CounterfactualPipeline, plan: PreprocessingPlan, images: Sequence[ImageInput],
                    seg: SegmentationSettings, seed: int) -> Calibration:
    """The threshold from the residuals of healthy images the models never saw."""
    residuals, regions, lesion_free, growth = [], [], [], []
    with runlog.progress(images, "calibrate", "image") as todo:  # a bar with an ETA on a terminal
        for item in todo:
            result = native_residual(pipeline, plan, item, seg, seed)
            residuals.append(result.residual)
            regions.append(result.detection_region)  # the voxels where a healthy image could get a lesion
            growth.append(result.growth)
            lesion_free.append(lesion_free_threshold(result.residual, result.detection_region, result.spacing_mm,
                                                     seg.lesions.min_lesion_mm3))
            log.info("calibrate: %s (%.1f s), lesion-free from a threshold of %.4g", item.name, result.seconds,
                     lesion_free[-1])
            killpoints.reached("calibrate:image")
    return calibrate(residuals, regions, quantile=seg.calibration.quantile, lesion_free=lesion_free,
                     image_fpr=seg.calibration.image_fpr, grow_residuals=growth)
