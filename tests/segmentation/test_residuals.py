"""Residual ensemble, median filter, analysis region (the cord as it is, fallback, padding)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from bids_app.errors import UsageError
from bids_app.segmentation import residuals as R
from bids_app.segmentation.residuals import (agreement_residual, analysis_region, median_footprint, residual_map,
                                             restrict, signed_residual, smooth)
from bids_app.settings.fields import calibrated_values
from bids_app.settings.segmentation import ResidualSettings


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The foreground warning fires once per process; every test starts before that first time."""
    monkeypatch.setattr(R, "_foreground_warned", False)


def test_residual_ensemble_mean_and_std() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (5, 6, 7)).astype(np.float32)
    cfs = [image + d for d in (0.1, -0.3, 0.5)]
    mean, spread = residual_map(image, cfs)
    assert mean.dtype == np.float32 and spread.dtype == np.float32
    np.testing.assert_allclose(mean, 0.3, atol=1e-6)
    np.testing.assert_allclose(spread, np.std([0.1, 0.3, 0.5]), atol=1e-6)


def test_residual_single_sample_has_zero_spread() -> None:
    image = np.zeros((4, 4, 4), np.float32)
    cf = image.copy()
    cf[1, 2, 3] = -0.7
    mean, spread = residual_map(image, [cf])
    assert mean[1, 2, 3] == pytest.approx(0.7) and mean.sum() == pytest.approx(0.7)
    assert not spread.any()


def test_residual_rejects_bad_input() -> None:
    image = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="at least one"):
        residual_map(image, [])
    with pytest.raises(ValueError, match="shape"):
        residual_map(image, [np.zeros((4, 4, 5))])
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        residual_map(image, [bad])


def test_median_filter_removes_salt_noise_and_keeps_a_blob() -> None:
    rng = np.random.default_rng(1)
    res = np.zeros((20, 20, 20), np.float32)
    res[8:13, 8:13, 8:13] = 1.0  # a 5^3 lesion
    salt = rng.random(res.shape) < 0.02
    salt[6:15, 6:15, 6:15] = False  # keep the noise away from the lesion
    res[salt] = 1.0
    out = smooth(res, 3)
    assert not out[salt].any()
    assert out[9:12, 9:12, 9:12].min() == 1.0  # lesion interior survives
    np.testing.assert_array_equal(smooth(res, 1), res)


def test_smooth_ignores_padding() -> None:
    res = np.zeros((9, 9, 9), np.float32)
    valid = np.zeros_like(res, dtype=bool)
    valid[:5, :5, :] = True  # padded on two sides: at the edge x=y=4, 15 of 27 window voxels pad
    res[~valid] = 2.0  # padding residual: meaningless and large
    out = smooth(res, 3, valid=valid)
    assert not out[valid].any()
    assert smooth(res, 3)[4, 4, 4] == 2.0  # without valid it bleeds in: the reason for the option


def test_region_never_includes_padding() -> None:
    valid = np.zeros((10, 10, 10), bool)
    valid[:, :, 2:8] = True
    cord = np.zeros_like(valid)
    cord[4:6, 4:6, :] = True  # runs into the padded slices
    region, source = analysis_region(valid, cord)
    assert source == "cord" and region.any()
    assert not (region & ~valid).any()
    image = np.full(valid.shape, 0.5, np.float32)  # bright everywhere, padding included
    region, source = analysis_region(valid, None, image=image)
    assert source == "foreground"
    np.testing.assert_array_equal(region, valid)


def test_the_cord_region_is_the_cord_mask_itself() -> None:
    """Not dilated: the bright CSF around the cord would dominate a dilated region."""
    cord = np.zeros((21, 21, 11), bool)
    cord[9:12, 9:12, 2:9] = True
    valid = np.ones_like(cord)
    region, source = analysis_region(valid, cord, image=np.full(cord.shape, 0.5, np.float32))
    assert source == "cord"
    np.testing.assert_array_equal(region, cord)
    soft = cord.astype(np.float32) * 0.7  # a soft mask counts where it is above 0
    np.testing.assert_array_equal(analysis_region(valid, soft)[0], cord)


def test_foreground_fallback_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    valid = np.ones((12, 12, 12), bool)
    image = np.full(valid.shape, -1.0, np.float32)
    image[3:9, 3:9, 3:9] = 0.2
    image[5:7, 5:7, 5:7] = -1.0  # a dark hole inside the body is still body
    with caplog.at_level(logging.INFO, logger=R.__name__):
        region, source = analysis_region(valid, None, image=image)
        region2, source2 = analysis_region(valid, np.zeros_like(valid), image=image)
    assert source == source2 == "foreground"
    assert region.sum() == 6 ** 3 and region[5, 5, 5]
    np.testing.assert_array_equal(region, region2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no cord mask" in warnings[0].getMessage()
    assert any("cord mask is empty" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_fallback_without_image_is_an_error() -> None:
    with pytest.raises(ValueError, match="no image"):
        analysis_region(np.ones((3, 3, 3), bool), None)


def test_restrict_zeroes_outside() -> None:
    res = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    region = res > 10
    out = restrict(res, region)
    assert out.dtype == res.dtype
    np.testing.assert_array_equal(out[region], res[region])
    assert not out[~region].any()


def test_median_sizes_are_fixed() -> None:
    """The thresholded map is median-filtered over 3 model voxels, the map lesions grow over is not."""
    assert (R.MEDIAN_SIZE, R.GROW_MEDIAN_SIZE) == (3, 1)


@pytest.mark.parametrize("spacing,expected", [
    ((0.8, 0.8, 0.8), (3, 3, 3)),  # the model's own grid
    ((1.0, 1.0, 1.0), (3, 3, 3)),  # 2.4 voxels: the nearest odd number is 3
    ((3.0, 0.82, 0.82), (1, 3, 3)),  # 3 mm sagittal slices: never across them
    ((0.53, 0.53, 4.0), (5, 5, 1)),  # fine in-plane voxels, 4 mm axial slices
])
def test_median_footprint_spans_the_model_voxels_in_millimetres(spacing, expected) -> None:
    assert median_footprint(spacing, (0.8, 0.8, 0.8)) == expected
    assert median_footprint((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), model_voxels=5) == (5, 5, 5)
    with pytest.raises(ValueError):
        median_footprint((1.0, 0.0, 1.0), (0.8, 0.8, 0.8))


def test_a_lesion_one_thick_slice_wide_survives_the_median_it_would_not_survive_in_voxels() -> None:
    """Across 3 mm slices a 3-voxel median spans 9 mm: a lesion within one slice was erased."""
    res = np.zeros((9, 24, 24), np.float32)
    res[4, 9:15, 9:15] = 1.0  # one 3 mm sagittal slice, 6 x 6 voxels in plane
    assert not smooth(res, 3).any()
    kept = smooth(res, median_footprint((3.0, 0.8, 0.8), (0.8, 0.8, 0.8)))
    assert kept[4, 10:14, 10:14].min() == 1.0 and not kept[3].any()
    with pytest.raises(ValueError):
        smooth(res, (3, 3))


@pytest.mark.parametrize("polarity,expected", [("bright", [0.5, 0.0, 0.0]), ("dark", [0.0, 0.25, 0.0]),
                                               ("both", [0.5, 0.25, 0.0])])
def test_polarity_keeps_only_the_requested_sign(polarity: str, expected: list[float]) -> None:
    image = np.array([1.0, 0.0, 0.3])
    counterfactual = np.array([0.5, 0.25, 0.3])
    np.testing.assert_allclose(signed_residual(image, counterfactual, polarity), expected)
    mean, _ = residual_map(image, [counterfactual], polarity)
    np.testing.assert_allclose(mean, expected)


def test_unknown_polarity_is_refused() -> None:
    with pytest.raises(ValueError):
        signed_residual(np.zeros(2), np.zeros(2), "up")
    with pytest.raises(UsageError, match="segmentation.residual.polarity"):
        ResidualSettings(polarity="up")


def test_agreement_is_the_geometric_mean_where_both_residuals_point_the_polarity_way() -> None:
    x = np.array([1.0, 1.0, 1.0, 1.0])
    counterfactual = np.array([0.0, 0.5, 1.5, 0.2])  # x - cf: 1, 0.5, -0.5, 0.8
    decoded = np.array([0.75, -3.0, 0.5, 1.6])  # x - D(z): 0.25, 4, 0.5, -0.6
    np.testing.assert_allclose(agreement_residual(x, counterfactual, decoded, "bright"), [0.5, np.sqrt(2.0), 0, 0])
    np.testing.assert_allclose(agreement_residual(x, counterfactual, decoded, "dark"), [0, 0, 0, 0])
    np.testing.assert_allclose(agreement_residual(x, counterfactual, decoded, "both"), [0.5, np.sqrt(2.0), 0, 0])
    np.testing.assert_allclose(agreement_residual(-x, -counterfactual, -decoded, "dark"), [0.5, np.sqrt(2.0), 0, 0])
    with pytest.raises(ValueError, match="polarity"):
        agreement_residual(x, counterfactual, decoded, "up")


def test_agreement_equals_the_plain_residual_when_the_decoding_is_the_counterfactual() -> None:
    rng = np.random.default_rng(3)
    x, cf = rng.normal(size=(2, 6, 6, 6))
    for polarity in ("bright", "dark", "both"):
        np.testing.assert_allclose(agreement_residual(x, cf, cf, polarity), signed_residual(x, cf, polarity))


def test_residual_map_with_decodings_averages_the_agreement() -> None:
    x = np.ones((2, 2, 2), np.float32)
    cfs = [np.zeros_like(x), np.full_like(x, 0.5)]
    decodings = [np.full_like(x, 0.75), np.zeros_like(x)]  # agreements sqrt(1 * 0.25) = 0.5, sqrt(0.5 * 1)
    mean, spread = residual_map(x, cfs, "bright", decodings)
    np.testing.assert_allclose(mean, (0.5 + np.sqrt(0.5)) / 2, rtol=1e-6)
    np.testing.assert_allclose(spread, (np.sqrt(0.5) - 0.5) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="decodings"):
        residual_map(x, cfs, "bright", decodings[:1])
    with pytest.raises(ValueError, match="decoding 1"):
        residual_map(x, cfs, "bright", [decodings[0], np.zeros((2, 2))])


def test_detection_region_drops_the_surface_layer_and_the_field_of_view_ends() -> None:
    from bids_app.segmentation.residuals import detection_region

    region = np.zeros((9, 9, 6), bool)
    region[2:7, 2:7, :] = True  # a 5x5 cord running through the whole field of view
    inner = detection_region(region, (1.0, 1.0, 1.0), 1.0)
    expected = np.zeros_like(region)
    expected[3:6, 3:6, 1:5] = True  # one layer off every side, the ends of the array included
    np.testing.assert_array_equal(inner, expected)
    np.testing.assert_array_equal(detection_region(region, (1.0, 1.0, 1.0), 0.0), region)
    # In mm: with 0.5 mm voxels a 1 mm inset takes two layers.
    assert detection_region(region, (0.5, 0.5, 1.0), 1.0)[4, 4, 2] and not detection_region(region, (0.5, 0.5, 1.0), 1.0)[3, 4, 2]


def test_detection_region_drops_the_outermost_layer_of_thick_slices_too() -> None:
    """Across 3 mm sagittal slices the cord's lateral slices lie 3 mm deep, beyond a 1 mm inset, but
    are half CSF: they go, as the outermost layer of a fine grid does."""
    from bids_app.segmentation.residuals import detection_region

    region = np.zeros((6, 12, 12), bool)
    region[1:5, 3:9, :] = True  # 4 sagittal slices of 3 mm: a 12 mm wide cord
    inner = detection_region(region, (3.0, 0.8, 0.8), 1.0)
    assert inner[2:4, 5:7, 2:10].all() and not inner[[1, 4]].any()
    assert not inner[:, :, [0, 11]].any()  # the ends of the field of view, as before
    two_slices = np.zeros_like(region)
    two_slices[2:4, 3:9, :] = True  # nothing is off the outermost layer: searched in all of it
    np.testing.assert_array_equal(detection_region(two_slices, (3.0, 0.8, 0.8), 1.0), two_slices)


def test_detection_region_falls_back_to_a_region_too_thin_for_the_inset(caplog) -> None:
    from bids_app.segmentation.residuals import detection_region

    thin = np.zeros((5, 5, 5), bool)
    thin[2, 2, 1:4] = True
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(detection_region(thin, (1.0, 1.0, 1.0), 1.0), thin)
    assert "nowhere deeper" in caplog.text
    with pytest.raises(ValueError, match="inset_mm"):
        detection_region(thin, (1.0, 1.0, 1.0), -1.0)


def test_detection_inset_is_validated() -> None:
    with pytest.raises(UsageError, match="segmentation.residual.detection_inset_mm"):
        ResidualSettings(detection_inset_mm=-0.5)
    assert calibrated_values(ResidualSettings(detection_inset_mm=0.5))["detection_inset_mm"] == 0.5
