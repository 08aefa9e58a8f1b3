"""The segmentation settings a user can set: counterfactual, residual, lesions, calibration.

Each setting is declared here once (default, help, validation, whether the calibration depends
on it); the pipeline, the calibration, the CLI and the sidecars read these objects. What the
project measured to choose each default is in docs/benchmarks.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bids_app.settings.fields import Checked, Rule, at_least, between, count, non_empty, setting

POLARITIES = ("auto", "bright", "dark", "both")
_FINITE = Rule(lambda v: isinstance(v, (int, float)) and v == v and abs(v) != float("inf"), "a finite number")


@dataclass(frozen=True)
class CounterfactualSettings(Checked):
    """How the pseudo-healthy counterfactual is synthesised (patched noising, one-step read-out)."""

    SECTION: ClassVar[str] = "segmentation.counterfactual"

    strengths: tuple[float, ...] = setting(
        (0.8,), "noising strength(s): the fraction of the diffusion chain the latent is noised to; several are "
        "averaged", rule=non_empty(between(0, 1)), calibrated=True)
    n_samples: int = setting(1, "noise draws per strength, averaged", rule=at_least(1), calibrated=True,
                             sidecar="Samples")
    adapter_scale: float = setting(1.0, "weight of the T2I-Adapter's features from the cord mask (0: no adapter)",
                                   rule=at_least(0), calibrated=True)
    window_overlap: float = setting(0.5, "overlap of the sliding windows that cover the cord, as a fraction",
                                    rule=between(0, 1, high_open=True), calibrated=True)
    patch_size: tuple[int, ...] = setting((2, 2, 2), "latent voxels per noised patch, per axis", rule=count(3),
                                          calibrated=True)
    patch_period: int = setting(3, "patches noised in one chain lie this many patches apart", rule=at_least(1),
                                calibrated=True)
    patch_offsets: int = setting(2, "shifted patch grids whose predictions are averaged", rule=at_least(1),
                                 calibrated=True)


@dataclass(frozen=True)
class ResidualSettings(Checked):
    """How the residual between the image and its counterfactual becomes an anomaly map."""

    SECTION: ClassVar[str] = "segmentation.residual"

    polarity: str = setting("auto", "which residuals are lesion: brighter than the counterfactual, darker, or both "
                            "(auto: dark on T1-weighted suffixes, bright otherwise)", choices=POLARITIES,
                            calibrated=True, sidecar="ResidualPolarity")
    detection_inset_mm: float = setting(1.0, "lesions are found only deeper than this below the cord's surface, "
                                        "then grow over the whole cord", rule=at_least(0), calibrated=True)


@dataclass(frozen=True)
class LesionSettings(Checked):
    """How the anomaly map becomes a lesion mask."""

    SECTION: ClassVar[str] = "segmentation.lesions"

    min_lesion_mm3: float = setting(5.0, "connected lesions smaller than this (mm3) are removed", rule=at_least(0),
                                    calibrated=True, sidecar="MinLesionVolumeMM3")
    grow_quantile: float | None = setting(
        0.995, "each lesion found at the threshold grows over its connected voxels above this healthy quantile "
        "(null: no growth)", rule=between(0, 1, low_open=True, high_open=True))
    threshold: float | None = setting(None, "a residual threshold used instead of the calibrated one", rule=_FINITE)


@dataclass(frozen=True)
class CalibrationSettings(Checked):
    """How the threshold is set from healthy held-out images (group level, stage calibrate)."""

    SECTION: ClassVar[str] = "segmentation.calibration"

    quantile: float = setting(0.999, "healthy voxel quantile the threshold starts from",
                              rule=between(0.5, 1, low_open=True, high_open=True), calibrated=True,
                              sidecar="CalibrationQuantile")
    image_fpr: float | None = setting(
        0.05, "the threshold is raised until a new healthy image gets a lesion with this probability (null: "
        "until none of the calibration images has one)", rule=between(0, 0.5, low_open=True, high_open=True),
        calibrated=True, sidecar="CalibrationImageFPR")


@dataclass(frozen=True)
class SegmentationSettings(Checked):
    """Counterfactual synthesis and residual -> lesion mask (participant level and calibration)."""

    SECTION: ClassVar[str] = "segmentation"

    counterfactual: CounterfactualSettings = field(default_factory=CounterfactualSettings)
    residual: ResidualSettings = field(default_factory=ResidualSettings)
    lesions: LesionSettings = field(default_factory=LesionSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    strength_sweep: tuple[float, ...] = setting(
        (), "also write the counterfactual and residual at each of these strengths (folder sweep/)",
        rule=between(0, 1))


#: Suffixes on which lesions are darker than healthy tissue (T1 "black holes"); on T2w, T2*w,
#: PD and FLAIR they are brighter.
DARK_LESION_SUFFIXES = frozenset({"T1w", "UNIT1", "MP2RAGE", "inplaneT1"})


def resolve_polarity(polarity: str, suffix: str) -> str:
    """``auto``: ``dark`` for T1-weighted suffixes, else ``bright``; other values pass through."""
    if polarity != "auto":
        return polarity
    return "dark" if suffix in DARK_LESION_SUFFIXES else "bright"
