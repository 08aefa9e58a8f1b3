"""One image -> counterfactual(s) and the residual on the image's own grid.

The image is preprocessed to model space (the whole cord, in sliding windows), its counterfactuals
are synthesised there, and the residual is taken on the native grid against the input at its own
resolution. Calibration and segmentation both go through :func:`native_residual`, so the
calibrated threshold means the same thing in both.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from nibabel.orientations import io_orientation

from bids_app.pipelines.counterfactual import Counterfactual, CounterfactualPipeline
from bids_app.preprocessing.pipeline import Preprocessed, preprocess
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.preprocessing.trace import Trace
from bids_app.segmentation.residuals import (
    GROW_MEDIAN_SIZE,
    MEDIAN_SIZE,
    analysis_region,
    detection_region,
    median_footprint,
    residual_map,
    restrict,
    smooth,
)
from bids_app.settings.segmentation import SegmentationSettings, resolve_polarity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageInput:
    """An image to segment or calibrate on, with its derivatives (paths; None where absent)."""

    name: str
    image: Path
    cord_mask: Path | None = None
    control_mask: Path | None = None

    @property
    def suffix(self) -> str:
        return Path(self.image).name.split(".")[0].rsplit("_", 1)[-1]


@dataclass(frozen=True)
class NativeResidual:
    """What calibration and segmentation share: the native-grid residual inside the region."""

    preprocessed: Preprocessed
    counterfactuals: tuple[Counterfactual, ...]
    residual: np.ndarray  # native grid, median-filtered, 0 outside the region: what is thresholded
    growth: np.ndarray  # native grid, unsmoothed, 0 outside the region: what lesions grow over
    region: np.ndarray  # native grid, bool: the cord (or the body foreground without a cord mask)
    detection_region: np.ndarray  # the region less its surface layer: where lesions may be found
    uncertainty: np.ndarray  # native grid: spread of the residual over the counterfactuals
    region_source: str
    polarity: str  # resolved for the image's suffix
    seconds: float
    spacing_mm: tuple[float, float, float]
    adapter_used: bool

    def mean_counterfactual(self) -> np.ndarray:
        """The counterfactual written out: the mean over strengths and samples, on the native grid."""
        mean = np.mean([c.image for c in self.counterfactuals], axis=0)
        return self.preprocessed.trace.inverse(mean, "image")


def native_residual(pipeline: CounterfactualPipeline, plan: PreprocessingPlan, item: ImageInput,
                    seg: SegmentationSettings, seed: int) -> NativeResidual:
    """Preprocess the whole cord, synthesise the counterfactual(s) and map the residual back to the
    native grid."""
    started = time.monotonic()
    masks = {"cord": item.cord_mask} if item.cord_mask is not None else {}
    if item.control_mask is not None and pipeline.adapter is not None and seg.counterfactual.adapter_scale > 0:
        masks["control"] = item.control_mask
    pre = preprocess(item.image, plan, masks=masks, cover=True)
    region, source = analysis_region(pre.valid, pre.masks.get("cord"), image=pre.image)
    if source != "cord":
        log.warning("%s: no cord mask: anomalies are searched in the whole body foreground", item.name)
    control = pre.masks.get("control")
    cfs = pipeline(pre.image, seg.counterfactual, seed, region if source == "cord" else None, control)
    trace = pre.trace
    native_region = trace.inverse(region.astype(np.float32), "mask").astype(bool)
    zooms = tuple(float(z) for z in trace.source.zooms[:3])
    polarity = resolve_polarity(seg.residual.polarity, item.suffix)
    raw, spread = native_grid_residual(pre, cfs, polarity)
    return NativeResidual(
        pre, tuple(cfs),
        residual=restrict(smooth(raw, native_footprint(trace, plan), valid=native_region),
                          native_region).astype(np.float32),
        growth=restrict(smooth(raw, GROW_MEDIAN_SIZE, valid=native_region), native_region).astype(np.float32),
        region=native_region,
        detection_region=detection_region(native_region, zooms, seg.residual.detection_inset_mm),
        uncertainty=restrict(spread, native_region).astype(np.float32),
        region_source=source, polarity=polarity, seconds=time.monotonic() - started, spacing_mm=zooms,
        adapter_used=pipeline.steers(control, seg.counterfactual))


def native_footprint(trace: Trace, plan: PreprocessingPlan) -> tuple[int, ...]:
    """The thresholded map's median filter on the image's own grid (``median_footprint``): the model
    grid's spacing is read along each native axis through the reorientation the preprocessing did."""
    zooms = tuple(float(z) for z in trace.source.zooms[:3])
    model_axis = io_orientation(trace.source.affine)[:, 0].astype(int)
    return median_footprint(zooms, [plan.target_spacing[a] for a in model_axis], MEDIAN_SIZE)


def native_grid_residual(pre: Preprocessed, counterfactuals: Sequence[Counterfactual],
                         polarity: str) -> tuple[np.ndarray, np.ndarray]:
    """The residual (mean, spread over the counterfactuals) on the image's own grid.

    The decodings are as coarse as the latent; the input is not. They are resampled onto the native
    grid and compared there with the input at its own resolution (``Preprocessed.native``), so a
    lesion keeps its sharp edges and thick slices are not averaged away. The transferred edit
    ``D(E(x)) - D(z)`` is resampled as it is.
    """
    trace = pre.trace

    def to_grid(volume: np.ndarray) -> np.ndarray:
        return trace.inverse(np.asarray(volume, dtype=np.float32), "probability")

    native = pre.native
    images = [native - to_grid(pre.image - c.image) for c in counterfactuals]
    decodings = [to_grid(c.decoded) for c in counterfactuals]
    return residual_map(native, images, polarity, decodings)
