"""Label-free calibration: pooled quantile threshold, healthy ECDF probability map, the calibration file."""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from bids_app.errors import BadDataError, MissingInputError
from bids_app.segmentation.calibration import (Calibration, CalibrationFile, calibrate, grow_threshold, image_bound,
                                               probability_map, probseg_threshold, read_calibration_file,
                                               subsample_sorted, with_threshold, write_calibration_file)


def healthy_set(seed: int = 0, n: int = 3, shape=(20, 20, 30)):
    """Residual maps from two different distributions and regions of unequal size."""
    rng = np.random.default_rng(seed)
    residuals, regions = [], []
    for k in range(n):
        res = (rng.gamma(2.0, 0.05, shape) if k % 2 else rng.exponential(0.1, shape)).astype(np.float32)
        region = np.zeros(shape, bool)
        region[2:15 + k, 3:17, :] = True
        res[~region] = 5.0  # outside values must never be pooled
        residuals.append(res)
        regions.append(region)
    return residuals, regions


@pytest.mark.parametrize("quantile", [0.9, 0.99, 0.999])
def test_threshold_is_the_pooled_quantile(quantile: float) -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=quantile)
    pool = np.concatenate([r[m] for r, m in zip(residuals, regions)]).astype(np.float64)
    assert cal.threshold == pytest.approx(float(np.quantile(pool, quantile)), rel=1e-12)
    assert cal.quantile == quantile and cal.source == "calibrated"
    assert cal.n_voxels == pool.size and cal.n_images == 3
    assert cal.reference.dtype == np.float32 and cal.reference.ndim == 1
    assert np.all(np.diff(cal.reference) >= 0) and cal.reference.max() < 5.0


def test_reference_is_subsampled_deterministically() -> None:
    residuals, regions = healthy_set()
    a = calibrate(residuals, regions, quantile=0.999, max_reference=1000)
    b = calibrate(residuals, regions, quantile=0.999, max_reference=1000)
    assert a.reference.size == 1000
    np.testing.assert_array_equal(a.reference, b.reference)
    pool = np.sort(np.concatenate([r[m] for r, m in zip(residuals, regions)]))
    assert a.reference[0] == pool[0] and a.reference[-1] == pool[-1]  # the extremes are kept
    # The subsample's ECDF stays within 1/m of the full one.
    probe = np.quantile(pool, np.linspace(0.01, 0.99, 50))
    full = np.searchsorted(pool, probe, side="right") / pool.size
    sub = np.searchsorted(a.reference, probe.astype(np.float32), side="right") / a.reference.size
    assert np.abs(full - sub).max() <= 2e-3
    np.testing.assert_array_equal(subsample_sorted(np.array([3.0, 1.0, 2.0])), [1.0, 2.0, 3.0])


def test_probability_of_the_reference_itself_is_uniform() -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.999)
    p = probability_map(cal.reference, cal)
    # Continuous data: the i-th of n sorted values has ECDF (i + 1) / n.
    np.testing.assert_allclose(np.sort(p), np.arange(1, p.size + 1) / p.size, atol=1e-4)
    hist, _ = np.histogram(p, bins=10, range=(0, 1))
    assert hist.min() >= 0.09 * p.size and hist.max() <= 0.11 * p.size


def test_probability_map_extremes_and_region() -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.999)
    res = np.full((4, 4, 4), cal.reference.max() + 1.0, np.float32)
    res[0] = -1.0  # below every reference value
    region = np.ones(res.shape, bool)
    region[3] = False
    p = probability_map(res, cal, region)
    assert p.dtype == np.float32
    assert np.all(p[1:3] == 1.0) and np.all(p[3] == 0.0)
    # Below every reference value, in the region: the smallest score, still above 0 (score > 0 is the region).
    assert np.all(p[0] == np.float32(1 / (cal.reference.size + 2))) and p[0].min() > 0
    assert 0.0 <= p.min() and p.max() <= 1.0
    # At the calibrated threshold the map reads (about) the calibration quantile.
    at = probability_map(np.array([cal.threshold]), cal)[0]
    assert at == pytest.approx(cal.quantile, abs=2e-4)


@pytest.mark.parametrize("where", ["calibrated", "a reference value", "between reference values", "above all",
                                   "below all"])
def test_thresholding_the_probseg_is_thresholding_the_residual(where: str) -> None:
    """``probseg > probseg_threshold`` exactly where ``residual > threshold``, wherever the threshold falls
    (the voxel ECDF alone is flat between reference values and would take in voxels at or below it)."""
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.99)
    ref = cal.reference
    threshold = {"calibrated": cal.threshold, "a reference value": float(ref[-50]),
                 "between reference values": float((ref[-50].astype(np.float64) + ref[-49]) / 2),
                 "above all": float(ref[-1]) + 0.5, "below all": float(ref[0]) - 0.5}[where]
    cal = cal if where == "calibrated" else with_threshold(cal, threshold)
    rng = np.random.default_rng(1)
    # Residuals at, just around and between reference values and the threshold: the hard cases.
    near = np.concatenate([ref[-60:], np.nextafter(ref[-60:], np.float32(np.inf)), rng.choice(ref, 500)])
    values = np.concatenate([near, [cal.threshold, np.nextafter(np.float32(cal.threshold), np.float32(np.inf)),
                                    ref[-1] + 1.0, ref[0] - 1.0]]).astype(np.float32)
    score = probability_map(values, cal)
    cut = probseg_threshold(cal)
    assert type(cut) is float and float(np.float32(cut)) == cut  # a float32 value, written exactly in JSON
    np.testing.assert_array_equal(score > cut, values > cal.threshold)
    np.testing.assert_array_equal(score > np.float32(cut), values > cal.threshold)
    assert (values > cal.threshold).any() and (values <= cal.threshold).any()


def test_with_threshold_marks_user() -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.999)
    user = with_threshold(cal, 0.2)
    assert user.source == "user" and user.threshold == 0.2
    assert user.quantile == pytest.approx(np.mean(cal.reference <= 0.2))
    assert cal.source == "calibrated"  # the original is untouched
    np.testing.assert_array_equal(user.reference, cal.reference)
    with pytest.raises(ValueError):
        with_threshold(cal, float("nan"))


def test_grow_threshold_is_a_lower_healthy_quantile() -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.999)
    pooled = np.concatenate([r[g] for r, g in zip(residuals, regions)])
    assert grow_threshold(cal, 0.99) == pytest.approx(np.quantile(pooled, 0.99), rel=1e-3)
    assert grow_threshold(cal, 0.99) < cal.threshold
    assert grow_threshold(cal, None) is None
    # Not below the threshold (a low user threshold): no growth.
    assert grow_threshold(with_threshold(cal, float(np.quantile(pooled, 0.5))), 0.99) is None
    with pytest.raises(ValueError, match="grow quantile"):
        grow_threshold(cal, 1.0)


IDENTITY = {"models_sha256": "abc", "seed": 0, "segmentation": {"counterfactual": {"strengths": [0.8]}}}
SUMMARY = {"threshold": 0.3, "n_images": 3}


def test_calibration_file_round_trip(tmp_path) -> None:
    residuals, regions = healthy_set()
    cal = calibrate(residuals, regions, quantile=0.995, lesion_free=[0.1, 0.2, 0.15], image_fpr=0.1,
                    grow_residuals=[r * 2.0 for r in residuals])
    path = tmp_path / "calibration.json"
    digest = write_calibration_file(path, CalibrationFile(IDENTITY, SUMMARY, cal))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    data = json.loads(path.read_text())
    assert isinstance(data["calibration"]["reference"]["data"], str)  # compact, not a list of 30k numbers
    back = read_calibration_file(path, digest)
    assert back.identity == IDENTITY and back.summary == SUMMARY
    for name in ("threshold", "quantile", "n_voxels", "n_images", "source", "rule", "image_fpr"):
        assert getattr(back.calibration, name) == getattr(cal, name)
    np.testing.assert_array_equal(back.calibration.reference, cal.reference)
    np.testing.assert_array_equal(back.calibration.grow_reference, cal.grow_reference)
    assert not back.calibration.reference.flags.writeable
    assert read_calibration_file(path).calibration.threshold == cal.threshold  # no checksum: not checked
    plain = dict(data["calibration"], reference=cal.reference.tolist())  # a plain list is accepted too
    np.testing.assert_array_equal(Calibration.from_dict(plain).reference, cal.reference)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary behind


def test_calibration_file_errors(tmp_path) -> None:
    with pytest.raises(MissingInputError, match="not found"):
        read_calibration_file(tmp_path / "absent.json")
    cal = calibrate(*healthy_set(n=1), quantile=0.999)
    good = tmp_path / "good.json"
    digest = write_calibration_file(good, CalibrationFile(IDENTITY, SUMMARY, cal))
    modified = json.loads(good.read_text())
    modified["calibration"]["threshold"] *= 0.5
    good.write_text(json.dumps(modified))
    with pytest.raises(BadDataError, match="checksum mismatch"):
        read_calibration_file(good, digest)
    assert read_calibration_file(good).calibration.threshold == pytest.approx(0.5 * cal.threshold)

    bad = tmp_path / "bad.json"

    def refused(content: str, match: str) -> None:
        bad.write_text(content)
        with pytest.raises(BadDataError, match=match):
            read_calibration_file(bad)

    refused("{not json", "invalid calibration")
    refused("[1, 2]", "JSON object")
    refused(json.dumps({"summary": SUMMARY, "calibration": cal.to_dict()}), "identity")
    refused(json.dumps({"identity": IDENTITY, "summary": SUMMARY, "calibration": {"threshold": 0.1}}),
            "quantile|reference")
    data = cal.to_dict()
    data["reference"]["count"] += 1
    refused(json.dumps({"identity": IDENTITY, "summary": SUMMARY, "calibration": data}), "values")
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(BadDataError):
        read_calibration_file(bad)


def test_empty_input_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], [], quantile=0.999)
    res = np.ones((3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="empty"):
        calibrate([res], [np.zeros(res.shape, bool)], quantile=0.999)
    with pytest.raises(ValueError, match="quantile"):
        calibrate([res], [res > 0], quantile=1.0)
    with caplog.at_level(logging.WARNING):
        calibrate([res], [res > 0], quantile=0.999)  # 27 voxels: the 0.999 tail is empty
    assert "poorly determined" in caplog.text


def test_threshold_bounds_the_healthy_false_positive_fraction() -> None:
    """The documented meaning of the quantile: ~(1 - q) of fresh healthy voxels exceed it."""
    rng = np.random.default_rng(5)
    shape = (40, 40, 100)
    train = [rng.gamma(2.0, 0.05, shape).astype(np.float32) for _ in range(3)]
    cal = calibrate(train, [np.ones(shape, bool)] * 3, quantile=0.999)
    fresh = rng.gamma(2.0, 0.05, (4, *shape))
    fraction = float(np.mean(fresh > cal.threshold))
    assert 0.0007 < fraction < 0.0013  # 640 of 640k voxels expected; bounds ~5 sigma incl. calibration error


def test_the_images_rule_raises_the_threshold_until_no_calibration_image_has_a_lesion() -> None:
    residuals, regions = healthy_set()
    plain = calibrate(residuals, regions, quantile=0.99)
    high = plain.threshold * 1.5
    raised = calibrate(residuals, regions, quantile=0.99, lesion_free=[plain.threshold * 0.5, high, 0.0])
    assert raised.threshold == high and raised.rule == "images" and plain.rule == "voxels"
    pool = np.concatenate([r[m] for r, m in zip(residuals, regions)])
    assert raised.quantile == pytest.approx(float(np.mean(pool <= high)))
    kept = calibrate(residuals, regions, quantile=0.99, lesion_free=[0.0, 0.0, 0.0])
    assert kept.threshold == plain.threshold and kept.quantile == 0.99
    assert Calibration.from_dict(json.loads(json.dumps(raised.to_dict()))).rule == "images"
    with pytest.raises(ValueError, match="lesion-free"):
        calibrate(residuals, regions, quantile=0.99, lesion_free=[0.1])


def test_the_image_bound_is_the_t_prediction_bound_of_one_more_image() -> None:
    values = [0.10, 0.14, 0.12, 0.16]
    mean, sd = np.mean(values), np.std(values, ddof=1)
    t90 = 1.6377443536962102  # Student t, 3 degrees of freedom, 0.9 quantile
    assert image_bound(values, 0.1) == pytest.approx(mean + t90 * sd * np.sqrt(1.25))
    assert image_bound(values, 0.05) > image_bound(values, 0.1) > image_bound(values, 0.3)
    assert image_bound(values, None) == 0.16 and image_bound([0.2], 0.1) == 0.2
    with pytest.raises(ValueError, match="image_fpr"):
        image_bound(values, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        image_bound([], 0.1)


def test_the_image_bound_keeps_its_false_positive_rate_on_normal_images() -> None:
    """Over many calibration sets of 8 images, a new image exceeds the bound 10 % of the time
    (the prediction bound is exact for normal values); the maximum of 8 is exceeded 1/9 of the time."""
    rng = np.random.default_rng(0)
    draws = rng.normal(0.15, 0.02, size=(20000, 9))
    bound = np.array([image_bound(row[:8], 0.1) for row in draws[:4000]])
    assert float(np.mean(draws[:4000, 8] > bound)) == pytest.approx(0.1, abs=0.015)
    assert float(np.mean(draws[:, 8] > draws[:, :8].max(axis=1))) == pytest.approx(1 / 9, abs=0.01)


def test_the_images_rule_at_a_false_positive_rate_records_it() -> None:
    residuals, regions = healthy_set()
    plain = calibrate(residuals, regions, quantile=0.99)
    lesion_free = [plain.threshold * f for f in (1.2, 1.5, 1.3)]
    cal = calibrate(residuals, regions, quantile=0.99, lesion_free=lesion_free, image_fpr=0.1)
    assert cal.threshold == pytest.approx(image_bound(lesion_free, 0.1)) and cal.threshold > max(lesion_free)
    assert cal.rule == "images" and cal.image_fpr == 0.1
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.image_fpr == 0.1 and back.threshold == cal.threshold
    assert "image_fpr" not in plain.to_dict() and Calibration.from_dict(plain.to_dict()).image_fpr is None
    assert calibrate(residuals, regions, quantile=0.99, image_fpr=0.1).image_fpr is None  # rule voxels
    with pytest.raises(ValueError, match="image_fpr"):
        Calibration.from_dict({**cal.to_dict(), "image_fpr": 2.0})


def test_the_growth_map_has_its_own_healthy_reference() -> None:
    residuals, regions = healthy_set()
    sharp = [r * 3.0 for r in residuals]  # a rougher map on another scale
    cal = calibrate(residuals, regions, quantile=0.99, grow_residuals=sharp)
    pooled = np.concatenate([s[m] for s, m in zip(sharp, regions)])
    assert grow_threshold(cal, 0.995) == pytest.approx(np.quantile(pooled, 0.995), rel=1e-3)
    assert grow_threshold(cal, 0.995) > cal.threshold, "on its own scale, not bounded by the threshold"
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(back.grow_reference, cal.grow_reference)
    assert "grow_reference" not in calibrate(residuals, regions, quantile=0.99).to_dict()
    with pytest.raises(ValueError, match="growth maps"):
        calibrate(residuals, regions, quantile=0.99, grow_residuals=sharp[:1])
