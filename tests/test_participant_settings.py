"""The participant level warns when its settings differ from those the threshold was calibrated with."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from bids_app.participant import _warn_if_settings_differ
from bids_app.settings import RunSettings, SegmentationSettings
from bids_app.training.calibrate import calibration_identity


def settings_with(**segmentation) -> RunSettings:
    from bids_app.settings import build_settings

    base = build_settings({"bids_dir": "/b", "output_dir": "/o", "analysis_level": "participant"})
    return dataclasses.replace(base, segmentation=SegmentationSettings(**segmentation))


def test_same_settings_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(), calibration_identity(settings_with(), "abc"))
    assert "differ" not in caplog.text


@pytest.mark.parametrize("change", [{"polarity": "both"}, {"edit_region": "all"}, {"strengths": (0.5,)},
                                    {"window_overlap": 0.25}, {"eta": 0.5}, {"noising": "region"},
                                    {"patch_size": (1, 2, 2)}, {"patch_offsets": 1}, {"reference": "reconstruction"},
                                    {"grow_median_size": 3}, {"detection_inset_mm": 0.0}])
def test_a_changed_residual_setting_warns(caplog: pytest.LogCaptureFixture, change: dict) -> None:
    with caplog.at_level(logging.WARNING):
        _warn_if_settings_differ(settings_with(**change), calibration_identity(settings_with(), "abc"))
    assert f"segmentation settings {next(iter(change))} differ" in caplog.text


def test_the_calibration_rule_and_its_false_positive_rate_are_part_of_its_identity() -> None:
    default = calibration_identity(settings_with(), "abc")
    assert default["rule"] == "images" and default["image_fpr"] == 0.05
    assert calibration_identity(settings_with(calibration_image_fpr=0.1), "abc") != default
    assert "image_fpr" not in calibration_identity(settings_with(calibration_rule="voxels"), "abc")
