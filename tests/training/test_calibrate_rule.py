"""The calibration stage's rule: the voxel quantile, or raised for the healthy images' false-positive rate."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bids_app.data import Sample
from bids_app.settings import build_settings
from bids_app.training import calibrate as stage


def _residual(index: int) -> SimpleNamespace:
    """A healthy image's native residual: low noise, and in image 1 one bright blob of 27 voxels."""
    rng = np.random.default_rng(index)
    residual = rng.uniform(0.0, 0.1, (20, 20, 20)).astype(np.float32)
    if index == 1:
        residual[5:8, 5:8, 5:8] = 0.6
    region = np.ones(residual.shape, bool)
    return SimpleNamespace(residual=residual, region=region, detection_region=region, spacing_mm=(1.0, 1.0, 1.0),
                           seconds=0.0, growth=None)


@pytest.mark.parametrize("rule, image_fpr", [("voxels", 0.1), ("images", None), ("images", 0.1)])
def test_the_rule_decides_whether_the_blob_of_a_calibration_image_stays_below_the_threshold(monkeypatch, caplog, rule,
                                                                                          image_fpr) -> None:
    results = iter([_residual(0), _residual(1)])
    monkeypatch.setattr(stage, "native_residual", lambda *args, **kwargs: next(results))
    monkeypatch.setattr(stage, "adapter_for", lambda *args: None)
    base = build_settings({"bids_dir": "/b", "output_dir": "/o", "analysis_level": "group"})
    settings = dataclasses.replace(base, segmentation=dataclasses.replace(
        base.segmentation, calibration_rule=rule, calibration_quantile=0.99, min_lesion_mm3=5.0,
        calibration_image_fpr=image_fpr))
    samples = [Sample(f"sub-0{i}_T2w", Path(f"/b/sub-0{i}_T2w.nii.gz"), {}) for i in (1, 2)]
    with caplog.at_level("INFO"):
        calibration = stage.run_calibration(settings, SimpleNamespace(), samples, "cpu")
    logged = caplog.text.count("lesion-free from a threshold of")
    assert logged == (2 if rule == "images" else 0), "each image's lesion-free threshold is logged under rule images"
    assert calibration.rule == rule
    if rule == "voxels":
        assert calibration.threshold < 0.6  # the 0.99 quantile of 16000 voxels of which 27 are bright
        assert calibration.image_fpr is None
    elif image_fpr is None:
        assert calibration.threshold == pytest.approx(0.6)  # the blob no longer passes
    else:  # two images, lesion-free at ~0.1 and 0.6: the t bound (1 degree of freedom) lies far above both
        assert calibration.threshold > 1.0 and calibration.image_fpr == 0.1



def test_the_growth_maps_of_the_calibration_images_give_the_grow_reference(monkeypatch) -> None:
    def with_growth(index: int) -> SimpleNamespace:
        result = _residual(index)
        result.growth = result.residual * 2.0
        return result

    results = iter([with_growth(0), with_growth(1)])
    monkeypatch.setattr(stage, "native_residual", lambda *args, **kwargs: next(results))
    monkeypatch.setattr(stage, "adapter_for", lambda *args: None)
    settings = build_settings({"bids_dir": "/b", "output_dir": "/o", "analysis_level": "group"})
    samples = [Sample(f"sub-0{i}_T2w", Path(f"/b/sub-0{i}_T2w.nii.gz"), {}) for i in (1, 2)]
    calibration = stage.run_calibration(settings, SimpleNamespace(), samples, "cpu")
    assert calibration.grow_reference is not None
    assert calibration.grow_reference.max() == pytest.approx(2 * calibration.reference.max())
