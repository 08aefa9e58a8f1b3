"""Stage calibrate: the threshold from healthy held-out images, through the participant level's own
procedure (:func:`bids_app.pipelines.segment.native_residual`), with the image rule; and the
calibration's identity (what the threshold holds for)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_app.models.unet3d import UNet3D, UNet3DConfig
from bids_app.models.vqgan import VQGAN, VQGANConfig
from bids_app.pipelines import calibrate as stage
from bids_app.pipelines.calibrate import calibration_identity, run_calibration
from bids_app.pipelines.counterfactual import CounterfactualPipeline
from bids_app.pipelines.segment import ImageInput, native_residual
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.schedulers import SchedulerConfig
from bids_app.segmentation.calibration import subsample_sorted
from bids_app.segmentation.lesions import lesion_free_threshold
from bids_app.settings.segmentation import (CalibrationSettings, CounterfactualSettings, LesionSettings,
                                            ResidualSettings, SegmentationSettings)

IMAGES = [ImageInput(f"sub-0{i}_T2w", Path(f"/b/sub-0{i}/anat/sub-0{i}_T2w.nii.gz")) for i in (1, 2)]


def _residual(index: int, growth_scale: float = 1.0) -> SimpleNamespace:
    """A healthy image's native residual: low noise, and in image 1 one bright blob of 27 voxels.
    Lesions may be found only one voxel inside the region (the detection region)."""
    rng = np.random.default_rng(index)
    residual = rng.uniform(0.0, 0.1, (20, 20, 20)).astype(np.float32)
    if index == 1:
        residual[5:8, 5:8, 5:8] = 0.6
    region = np.ones(residual.shape, bool)
    detection = np.zeros_like(region)
    detection[1:-1, 1:-1, 1:-1] = True
    return SimpleNamespace(residual=residual, region=region, detection_region=detection, spacing_mm=(1.0, 1.0, 1.0),
                           seconds=0.0, growth=residual * growth_scale)


def _segmentation(image_fpr: float | None = 0.1, min_lesion_mm3: float = 5.0) -> SegmentationSettings:
    return SegmentationSettings(lesions=LesionSettings(min_lesion_mm3=min_lesion_mm3),
                                calibration=CalibrationSettings(quantile=0.99, image_fpr=image_fpr))


def _fake_native_residual(monkeypatch, results: list[SimpleNamespace]) -> list[tuple]:
    """``native_residual`` returning ``results`` in turn; the calls are recorded."""
    calls: list[tuple] = []
    remaining = iter(results)

    def fake(pipeline, plan, item, seg, seed):
        calls.append((pipeline, plan, item, seg, seed))
        return next(remaining)

    monkeypatch.setattr(stage, "native_residual", fake)
    return calls


@pytest.mark.parametrize("image_fpr", [None, 0.1])
def test_the_image_rule_keeps_the_blob_of_a_calibration_image_below_the_threshold(monkeypatch, caplog,
                                                                                 image_fpr) -> None:
    seg = _segmentation(image_fpr)
    calls = _fake_native_residual(monkeypatch, [_residual(0), _residual(1)])
    pipeline, plan = object(), object()
    with caplog.at_level("INFO"):
        calibration = run_calibration(pipeline, plan, IMAGES, seg, seed=3)
    assert [call[2] for call in calls] == IMAGES
    assert all(call[0] is pipeline and call[1] is plan and call[3] is seg and call[4] == 3 for call in calls), \
        "every image goes through the participant level's procedure with the same settings and seed"
    assert caplog.text.count("lesion-free from a threshold of") == 2, "each image's lesion-free threshold is logged"
    assert calibration.rule == "images" and calibration.n_images == 2
    assert calibration.n_voxels == 2 * 18 ** 3, "the healthy voxels pooled are those of the detection regions"
    if image_fpr is None:
        assert calibration.threshold == pytest.approx(0.6)  # the blob no longer passes
        assert calibration.image_fpr is None
    else:  # two images, lesion-free at ~0.1 and 0.6: the t bound (1 degree of freedom) lies far above both
        assert calibration.threshold > 1.0 and calibration.image_fpr == 0.1


def test_the_lesion_free_thresholds_use_the_minimum_lesion_size(monkeypatch) -> None:
    """A 27 mm3 blob is no lesion under a 30 mm3 size filter: it no longer raises the threshold."""
    _fake_native_residual(monkeypatch, [_residual(0), _residual(1)])
    small = run_calibration(None, None, IMAGES, _segmentation(min_lesion_mm3=30.0), seed=0)
    _fake_native_residual(monkeypatch, [_residual(0), _residual(1)])
    large = run_calibration(None, None, IMAGES, _segmentation(min_lesion_mm3=5.0), seed=0)
    assert small.threshold < 0.6 < large.threshold


def test_the_growth_maps_of_the_calibration_images_give_the_grow_reference(monkeypatch) -> None:
    _fake_native_residual(monkeypatch, [_residual(0, 2.0), _residual(1, 2.0)])
    calibration = run_calibration(None, None, IMAGES, SegmentationSettings(), seed=0)
    assert calibration.grow_reference is not None
    assert calibration.grow_reference.max() == pytest.approx(2 * calibration.reference.max())


# The real path: a (random, tiny) pipeline on two synthetic healthy images with cord masks.

@pytest.fixture(scope="module")
def pipeline() -> CounterfactualPipeline:
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(n_hiddens=4, downsample=(2, 2, 2), n_codes=16, embedding_dim=4, norm_groups=2)).eval()
    unet = UNet3D(UNet3DConfig(in_channels=4, base_channels=8, channel_mults=(1, 2), attention_levels=(False, True),
                               num_heads=2, norm_groups=4, zero_init_output=False)).eval()
    return CounterfactualPipeline(vqgan, unet, SchedulerConfig(num_train_timesteps=100, prediction_type="v_prediction"),
                                  1.0, window_shape=(16, 16, 16))


PLAN = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.0), target_shape=(16, 16, 16))


@pytest.fixture(scope="module")
def healthy_images(tmp_path_factory: pytest.TempPathFactory) -> list[ImageInput]:
    folder = tmp_path_factory.mktemp("healthy")
    x, y, _ = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (16, 16, 16)], indexing="ij")
    cord = ((x - 8) ** 2 + (y - 8) ** 2) <= 9
    items = []
    for index in (1, 2):
        rng = np.random.default_rng(index)
        image = (100 + 50 * cord + rng.normal(0, 5, cord.shape)).astype(np.float32)
        paths = [folder / f"sub-0{index}_T2w.nii.gz", folder / f"sub-0{index}_T2w_label-SC_seg.nii.gz"]
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(paths[0]))
        nib.save(nib.Nifti1Image(cord.astype(np.uint8), np.eye(4)), str(paths[1]))
        items.append(ImageInput(f"sub-0{index}_T2w", paths[0], cord_mask=paths[1]))
    return items


#: One window, one chain per image: a fast run of the whole procedure.
SMALL = SegmentationSettings(counterfactual=CounterfactualSettings(strengths=(0.5,), patch_period=1, patch_offsets=1),
                             residual=ResidualSettings(detection_inset_mm=0.0))


def test_the_calibration_pools_the_residuals_the_participant_level_computes(pipeline, healthy_images) -> None:
    calibration = run_calibration(pipeline, PLAN, healthy_images, SMALL, seed=4)
    results = [native_residual(pipeline, PLAN, item, SMALL, 4) for item in healthy_images]
    assert all(r.region_source == "cord" for r in results)
    pooled = np.concatenate([r.residual[r.detection_region] for r in results])
    assert calibration.n_images == 2 and calibration.n_voxels == pooled.size
    np.testing.assert_array_equal(calibration.reference, subsample_sorted(pooled))
    grown = np.concatenate([r.growth[r.detection_region] for r in results])
    np.testing.assert_array_equal(calibration.grow_reference, subsample_sorted(grown))
    lesion_free = [lesion_free_threshold(r.residual, r.detection_region, r.spacing_mm, SMALL.lesions.min_lesion_mm3)
                   for r in results]
    assert calibration.threshold >= max(float(np.quantile(pooled, SMALL.calibration.quantile)), max(lesion_free))
    other_seed = run_calibration(pipeline, PLAN, healthy_images, SMALL, seed=5)
    assert not np.array_equal(other_seed.reference, calibration.reference), "the seed reaches the counterfactuals"


# The identity: the models, the seed and every setting declared ``calibrated``.

def test_the_identity_holds_the_models_the_seed_and_the_calibrated_settings() -> None:
    seg = SegmentationSettings()
    identity = calibration_identity(seg, 7, "abc")
    assert identity["models_sha256"] == "abc" and identity["seed"] == 7 and identity["residual_map"] == 2
    assert identity["segmentation"] == {
        "counterfactual": {"strengths": [0.8], "n_samples": 1, "adapter_scale": 1.0, "window_overlap": 0.5,
                           "patch_size": [2, 2, 2], "patch_period": 3, "patch_offsets": 2},
        "residual": {"polarity": "auto", "detection_inset_mm": 1.0},
        "lesions": {"min_lesion_mm3": 5.0},
        "calibration": {"quantile": 0.999, "image_fpr": 0.05},
    }
    assert calibration_identity(seg, 8, "abc") != identity and calibration_identity(seg, 7, "abd") != identity


def _changed(section: str, **values) -> SegmentationSettings:
    seg = SegmentationSettings()
    return dataclasses.replace(seg, **{section: dataclasses.replace(getattr(seg, section), **values)})


@pytest.mark.parametrize("section, values", [
    ("counterfactual", {"strengths": (0.5,)}), ("counterfactual", {"n_samples": 2}),
    ("counterfactual", {"adapter_scale": 0.0}), ("counterfactual", {"window_overlap": 0.25}),
    ("counterfactual", {"patch_size": (1, 2, 2)}), ("counterfactual", {"patch_period": 2}),
    ("counterfactual", {"patch_offsets": 1}), ("residual", {"polarity": "both"}),
    ("residual", {"detection_inset_mm": 0.0}), ("lesions", {"min_lesion_mm3": 10.0}),
    ("calibration", {"quantile": 0.99}), ("calibration", {"image_fpr": 0.1}),
])
def test_a_calibrated_setting_changes_the_identity(section: str, values: dict) -> None:
    assert calibration_identity(_changed(section, **values), 0, "abc") != calibration_identity(
        SegmentationSettings(), 0, "abc")


@pytest.mark.parametrize("change", [
    lambda: _changed("lesions", grow_quantile=0.99), lambda: _changed("lesions", threshold=0.3),
    lambda: dataclasses.replace(SegmentationSettings(), strength_sweep=(0.2, 0.4)),
], ids=["grow_quantile", "threshold", "strength_sweep"])
def test_a_setting_applied_after_the_threshold_leaves_the_identity(change) -> None:
    assert calibration_identity(change(), 0, "abc") == calibration_identity(SegmentationSettings(), 0, "abc")
