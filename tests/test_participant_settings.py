"""The participant level warns when its settings differ from those the threshold was calibrated with."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from bids_app.participant import _warn_if_settings_differ
from bids_app.pipelines.calibrate import calibration_identity
from bids_app.settings import RunSettings, build_settings
from bids_app.settings.segmentation import SegmentationSettings

BASE = {"bids_dir": "/b", "output_dir": "/o", "analysis_level": "participant"}


def settings_with(section: str | None = None, **values) -> RunSettings:
    """The default run settings with ``values`` in one section of ``segmentation`` (None: at its top)."""
    base = build_settings(BASE)
    seg = base.segmentation
    if section is None:
        seg = dataclasses.replace(seg, **values)
    else:
        seg = dataclasses.replace(seg, **{section: dataclasses.replace(getattr(seg, section), **values)})
    return dataclasses.replace(base, segmentation=seg)


def calibrated_with_defaults() -> dict:
    return calibration_identity(SegmentationSettings(), 0, "abc")


def test_same_settings_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), calibrated_with_defaults())
    assert "differ" not in caplog.text


@pytest.mark.parametrize("section, change", [
    ("residual", {"polarity": "both"}), ("counterfactual", {"strengths": (0.5,)}),
    ("counterfactual", {"window_overlap": 0.25}), ("counterfactual", {"patch_size": (1, 2, 2)}),
    ("counterfactual", {"patch_offsets": 1}), ("counterfactual", {"patch_period": 2}),
    ("counterfactual", {"n_samples": 2}), ("counterfactual", {"adapter_scale": 0.5}),
    ("residual", {"detection_inset_mm": 0.0}), ("lesions", {"min_lesion_mm3": 10.0}),
    ("calibration", {"image_fpr": 0.1}), ("calibration", {"quantile": 0.99}),
])
def test_a_changed_calibrated_setting_warns_naming_it(caplog: pytest.LogCaptureFixture, section: str,
                                                      change: dict) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(section, **change), calibrated_with_defaults())
    name, value = next(iter(change.items()))
    assert "segmentation settings differ" in caplog.text
    assert f"segmentation.{section}.{name}: " in caplog.text
    shown = list(value) if isinstance(value, tuple) else value
    assert f"now {shown}" in caplog.text


@pytest.mark.parametrize("section, change", [
    ("lesions", {"grow_quantile": 0.99}), ("lesions", {"threshold": 0.3}), (None, {"strength_sweep": (0.2, 0.4)}),
])
def test_a_setting_applied_after_the_threshold_does_not_warn(caplog: pytest.LogCaptureFixture, section, change) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(section, **change), calibrated_with_defaults())
    assert "differ" not in caplog.text


def test_another_seed_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The noise draws are part of what the threshold was calibrated on."""
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), calibration_identity(SegmentationSettings(), 3, "abc"))
    assert "compute.seed: 3 now 0" in caplog.text


def test_a_calibration_of_an_earlier_version_warns(caplog: pytest.LogCaptureFixture) -> None:
    """0.1.0's identity was flat: none of today's calibrated settings can be matched in it."""
    old = {"models_sha256": "abc", "strengths": [0.8], "polarity": "auto", "quantile": 0.999, "seed": 0}
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), old)
    assert "calibrated by counterseg 0.1.0" in caplog.text and "rerun the group stage calibrate" in caplog.text


def test_a_threshold_calibrated_on_an_earlier_residual_map_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The map's median filter and search region changed in version 2: a threshold calibrated on
    version 1 maps (no ``residual_map`` in its identity) sits at another false-positive rate."""
    identity = calibrated_with_defaults()
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), identity)
    assert "residual maps of version" not in caplog.text
    del identity["residual_map"]
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), identity)
    assert "residual maps of version 1" in caplog.text and "rerun the group stage calibrate" in caplog.text
