"""One image -> counterfactual, anomaly map, lesion mask, lesion table (and metrics with ground truth).

The residual |x - x_hat| is computed in model space, smoothed and restricted to the analysis region
(dilated cord, or body foreground), then mapped back onto the native grid with the preprocessing
inverse (linear, as a continuous map: resample first, threshold after). Thresholding, the anomaly
probability and component filtering happen on the native grid, the same way at calibration time and
at inference, so the calibrated threshold means the same thing in both.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from bids_app.pipelines.counterfactual import (
    Counterfactual,
    CounterfactualSettings,
    prepare_for_inference,
    windowed_counterfactuals,
)
from bids_app.preprocessing.pipeline import Preprocessed, preprocess
from bids_app.segmentation.residuals import (
    ResidualSettings,
    analysis_region,
    detection_region,
    residual_map,
    restrict,
    smooth,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeResidual:
    """What calibration and segmentation share: the native-grid residual inside the region."""

    preprocessed: Preprocessed
    counterfactuals: tuple[Counterfactual, ...]
    residual: np.ndarray  # native grid, 0 outside the region
    region: np.ndarray  # native grid, bool
    uncertainty: np.ndarray  # native grid
    region_source: str
    seconds: float
    spacing_mm: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))
    adapter_used: bool = False
    #: The map lesions grow over (native grid, 0 outside the region): the residual median-filtered
    #: with ``ResidualSettings.grow_median_size``; None when that is the thresholded map's own filter.
    growth: np.ndarray | None = None
    #: Where lesions may be found (native grid): the region less its surface layer
    #: (``ResidualSettings.detection_inset_mm``); None means the whole region.
    detection: np.ndarray | None = None

    @property
    def detection_region(self) -> np.ndarray:
        """Where the threshold may find lesions (the whole region unless an inset is set)."""
        return self.region if self.detection is None else self.detection


def native_residual(
    image: Path,
    cord_mask: Path | None,
    name: str,
    models: Any,
    cf_settings: CounterfactualSettings,
    residual_settings: ResidualSettings,
    device: str = "cpu",
    adapter: Any = None,
    control_mask: Path | None = None,
) -> NativeResidual:
    """Preprocess the whole cord, synthesise the counterfactual(s) window by window, and map the
    residual back to the native grid."""
    started = time.monotonic()
    masks = {"cord": cord_mask} if cord_mask is not None else {}
    if control_mask is not None and adapter is not None:
        masks["control"] = control_mask
    pre = preprocess(image, models.plan, masks=masks, cover=True)
    used: list[bool] = []

    def features_for(window: tuple[slice, ...]) -> list | None:
        features = adapter(pre, window) if adapter is not None else None
        used.append(features is not None)
        return features

    region, source = analysis_region(pre.valid, pre.masks.get("cord"), models.plan.target_spacing,
                                     residual_settings.cord_margin_mm, image=pre.image,
                                     foreground_threshold=residual_settings.foreground_threshold)
    editable = region if cf_settings.edit_region == "cord" and source == "cord" else None
    cfs = windowed_counterfactuals(models.vqgan, models.unet, models.scheduler_config, models.latent_scale,
                                   pre.image, cf_settings, models.plan.target_shape, device, features_for, editable)
    if source != "cord":
        log.warning("%s: no cord mask: anomalies are searched in the whole body foreground", name)
    trace = pre.trace
    native_region = trace.inverse(region.astype(np.float32), "mask").astype(bool)
    zooms = tuple(float(z) for z in trace.source.zooms[:3])
    raw, spread = native_grid_residual(pre, cfs, cf_settings.reference, residual_settings.polarity)
    residual = restrict(smooth(raw, residual_settings.median_size, valid=native_region), native_region)
    growth = None
    if residual_settings.grow_median_size != residual_settings.median_size:
        growth = restrict(smooth(raw, residual_settings.grow_median_size, valid=native_region), native_region)
    uncertainty = restrict(spread, native_region)
    detect = detection_region(native_region, zooms, residual_settings.detection_inset_mm)
    return NativeResidual(pre, tuple(cfs), residual.astype(np.float32), native_region, uncertainty.astype(np.float32),
                          source, time.monotonic() - started, zooms, bool(used) and all(used), growth, detect)


def native_grid_residual(pre: Preprocessed, counterfactuals: Sequence[Counterfactual], reference: str,
                         polarity: str) -> tuple[np.ndarray, np.ndarray]:
    """The residual (mean, spread over the counterfactuals) on the image's own grid.

    The counterfactual is smooth (a decoding of a latent 2 voxels a side), the input is not: the
    decodings are resampled onto the native grid and compared there with the input at its own
    resolution (``Preprocessed.native``), so a lesion keeps its sharp edges and slices thicker than
    the model grid's are not averaged away. The transferred counterfactual's edit
    ``D(E(x)) - D(z)`` is as coarse as the latent and is simply resampled. Measured on the
    demo-budget model (docs/benchmarks.md, "Residual on the native grid"): median Dice over 9
    lesion images 0.57 -> 0.68 at the calibrated threshold (0.76 with the detection inset), the
    image with 3 mm slices 0.00 -> 0.71.
    """
    trace = pre.trace

    def to_grid(volume: np.ndarray) -> np.ndarray:
        return trace.inverse(np.asarray(volume, dtype=np.float32), "probability")

    native = pre.native
    if reference == "image":  # the counterfactual is the raw decoding itself
        images = [to_grid(c.image) for c in counterfactuals]
    else:  # the edit transferred onto the sharp input
        images = [native - to_grid(pre.image - c.image) for c in counterfactuals]
    decodings = [to_grid(c.decoded) for c in counterfactuals] if reference == "both" else None
    return residual_map(native, images, polarity, decodings)


def adapter_for(models: Any, seg: Any) -> Callable[[Preprocessed, tuple[slice, ...]], list | None] | None:
    """Adapter features from a window of an image's control derivative (computed once per window,
    reused at every step), or None when the model has no adapter, it is switched off, or the image
    has no control derivative."""
    if getattr(models, "adapter", None) is None or not seg.use_adapter or seg.adapter_scale == 0:
        return None
    device = next(models.unet.parameters()).device

    def features(pre: Preprocessed, window: tuple[slice, ...]) -> list | None:
        mask = pre.masks.get("control")
        if mask is None or not mask.any():
            return None
        control = torch.from_numpy(np.ascontiguousarray(mask[window], dtype=np.float32))[None, None].to(device)
        with torch.no_grad():
            return models.adapter(control, seg.adapter_scale)

    return features


def inference_models(models: Any, seg: Any) -> Any:
    """The loaded models made ready for the fast path: evaluation mode, channels-last on CPU, and
    the UNet through ``torch.compile`` when ``segmentation.compile`` is set (``dynamic``: the batch
    shrinks as chains finish, which would otherwise recompile)."""
    prepare_for_inference(models.vqgan, models.unet, getattr(models, "adapter", None))
    if not seg.compile:
        return models
    return dataclasses.replace(models, unet=torch.compile(models.unet, dynamic=True))


def mean_counterfactual(result: NativeResidual) -> np.ndarray:
    """The counterfactual image written out: the mean over strengths and samples, on the native grid."""
    mean = np.mean([c.image for c in result.counterfactuals], axis=0)
    return result.preprocessed.trace.inverse(mean, "image")


def counterfactual_settings(seg: Any, seed: int, strengths: tuple[float, ...] | None = None) -> CounterfactualSettings:
    """The pipeline settings from the run's ``segmentation`` settings."""
    return CounterfactualSettings(strengths=tuple(strengths or seg.strengths), n_samples=seg.n_samples,
                                  steps=seg.steps, sampler=seg.sampler, eta=seg.eta,
                                  max_latent_voxels=seg.max_latent_voxels, seed=seed, reference=seg.reference,
                                  window_overlap=seg.window_overlap, edit_region=seg.edit_region,
                                  batch_size=seg.batch_size, precision=seg.precision, noising=seg.noising,
                                  patch_size=tuple(seg.patch_size), patch_period=seg.patch_period,
                                  patch_offsets=seg.patch_offsets)


#: Suffixes on which lesions are darker than healthy tissue (T1 "black holes"); on T2w, T2*w,
#: PD and FLAIR they are brighter.
DARK_LESION_SUFFIXES = frozenset({"T1w", "UNIT1", "MP2RAGE", "inplaneT1"})


def resolve_polarity(polarity: str, image: Path | str) -> str:
    """``auto``: ``dark`` for T1-weighted suffixes, else ``bright``; other values pass through."""
    if polarity != "auto":
        return polarity
    name = Path(image).name.split(".")[0]
    return "dark" if name.rsplit("_", 1)[-1] in DARK_LESION_SUFFIXES else "bright"


def residual_settings(seg: Any, image: Path | str) -> ResidualSettings:
    """The post-processing settings for one image (``polarity: auto`` resolved by its suffix)."""
    return ResidualSettings(median_size=seg.median_size, grow_median_size=seg.grow_median_size,
                            cord_margin_mm=seg.cord_margin_mm, detection_inset_mm=seg.detection_inset_mm,
                            min_lesion_mm3=seg.min_lesion_mm3, majority_smoothing=seg.majority_smoothing,
                            polarity=resolve_polarity(seg.polarity, image))


def describe_settings(cf: CounterfactualSettings, residual: ResidualSettings) -> Mapping[str, Any]:
    return {
        "Strengths": list(cf.strengths), "Samples": cf.n_samples, "Steps": cf.steps, "Sampler": cf.sampler,
        "Eta": cf.eta, "Seed": cf.seed, "MedianFilterSize": residual.median_size,
        "GrowMedianFilterSize": residual.grow_median_size,
        "CordMarginMM": residual.cord_margin_mm, "DetectionInsetMM": residual.detection_inset_mm,
        "ResidualGrid": "native", "MinLesionVolumeMM3": residual.min_lesion_mm3,
        "ResidualPolarity": residual.polarity, "ResidualReference": cf.reference, "WindowOverlap": cf.window_overlap,
        "EditRegion": cf.edit_region, "Noising": cf.noising,
        **({"PatchSize": list(cf.patch_size), "PatchPeriod": cf.patch_period, "PatchOffsets": cf.patch_offsets}
           if cf.noising == "patch" else {}),
    }
