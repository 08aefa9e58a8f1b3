"""Evaluation metrics on constructed cases with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bids_app.segmentation.metrics import (auprc, best_dice_over_thresholds, dice, evaluate,
                                           healthy_false_positive, lesion_wise, summarise, volume_error_mm3,
                                           write_metrics_tsv, write_summary_tsv)

SHAPE = (12, 12, 12)


def cube(lo: int, hi: int) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_dice_cases() -> None:
    truth = np.zeros(SHAPE, bool)
    truth[2:6, 2:6, 2:6] = True
    assert dice(truth, truth) == 1.0
    assert dice(np.roll(truth, 6, axis=0), truth) == 0.0
    half = np.zeros(SHAPE, bool)
    half[2:4, 2:6, 2:6] = True  # half of the truth, nothing else: 2*32/(32+64)
    assert dice(half, truth) == pytest.approx(2 / 3)
    shifted = np.roll(truth, 2, axis=0)  # overlaps half of the truth, same size
    assert dice(shifted, truth) == pytest.approx(0.5)
    empty = np.zeros(SHAPE, bool)
    assert dice(empty, empty) == 1.0 and dice(empty, truth) == 0.0


def test_auprc_perfect_reversed_and_no_positives() -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros(1000, bool)
    truth[rng.choice(1000, 10, replace=False)] = True
    scores = np.where(truth, 1.0, 0.0) + rng.uniform(0, 0.5, 1000)
    assert auprc(scores, truth) == pytest.approx(1.0)
    reversed_ap = auprc(-scores, truth)
    assert reversed_ap < 0.02  # prevalence is 0.01; a reversed ranking is worse than chance
    random_ap = auprc(rng.uniform(size=1000), truth)
    assert reversed_ap < random_ap
    assert math.isnan(auprc(scores, np.zeros(1000, bool)))


def test_auprc_hand_computed_with_ties_and_region() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.1, 5.0])
    truth = np.array([1, 0, 1, 0, 1])
    region = np.array([True, True, True, True, False])  # the top-scoring voxel is outside
    # Thresholds 0.9: P=1, R=1/2; 0.8 (tie enters together): P=2/3, R=1; 0.1: R unchanged.
    assert auprc(scores, truth, region) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_lesion_wise_one_missed_and_one_false() -> None:
    truth = np.zeros(SHAPE, bool)
    truth[1:3, 1:3, 1:3] = True  # detected
    truth[8:10, 1:3, 1:3] = True  # missed
    pred = np.zeros(SHAPE, bool)
    pred[2:4, 2:4, 2:4] = True  # overlaps the first true lesion
    pred[8:10, 8:10, 8:10] = True  # false lesion
    out = lesion_wise(pred, truth)
    assert out["n_pred_lesions"] == 2 and out["n_true_lesions"] == 2
    assert out["lesion_precision"] == 0.5 and out["lesion_recall"] == 0.5
    assert out["lesion_f1"] == pytest.approx(0.5)
    empty = np.zeros(SHAPE, bool)
    none = lesion_wise(empty, truth)
    assert math.isnan(none["lesion_precision"]) and none["lesion_recall"] == 0 and none["lesion_f1"] == 0
    both = lesion_wise(empty, empty)
    assert all(math.isnan(both[k]) for k in ("lesion_precision", "lesion_recall", "lesion_f1"))


def test_volume_error_and_healthy_false_positive() -> None:
    assert volume_error_mm3(cube(0, 2), cube(0, 3), 0.5) == pytest.approx(19 * 0.5)
    assert volume_error_mm3(cube(0, 3), cube(0, 2), 0.5) == pytest.approx(19 * 0.5)
    assert healthy_false_positive(np.zeros(SHAPE), 2.0) == {"any_lesion": False, "fp_volume_mm3": 0.0}
    assert healthy_false_positive(cube(0, 2), 2.0) == {"any_lesion": True, "fp_volume_mm3": 16.0}


def test_best_dice_over_thresholds_is_an_oracle() -> None:
    truth = cube(3, 6)
    scores = np.where(truth, 0.7, 0.2).astype(np.float32)
    scores[0, 0, 0] = 0.9  # one bright healthy voxel: threshold 0.8 would miss the lesion
    out = best_dice_over_thresholds(scores, truth, None, [0.1, 0.5, 0.8])
    assert set(out) == {"oracle_best_dice", "oracle_best_threshold"}
    assert out["oracle_best_threshold"] == 0.5
    assert out["oracle_best_dice"] == pytest.approx(2 * 27 / (28 + 27))
    auto = best_dice_over_thresholds(scores, truth, None)
    assert auto["oracle_best_dice"] == pytest.approx(2 * 27 / 55)
    assert math.isnan(best_dice_over_thresholds(scores, np.zeros(SHAPE), None)["oracle_best_dice"])


def test_evaluate_and_summarise(tmp_path) -> None:
    truth = cube(2, 6)
    region = np.ones(SHAPE, bool)
    scores = truth.astype(np.float32)
    row = evaluate(truth, scores, truth, region, 0.5)
    assert row["dice"] == 1.0 and row["auprc"] == pytest.approx(1.0)
    assert row["lesion_f1"] == 1.0 and row["volume_error_mm3"] == 0.0
    assert row["fp_volume_mm3"] == 0.0 and row["any_lesion"] is True
    assert row["oracle_best_dice"] == 1.0
    healthy = evaluate(cube(0, 2), np.zeros(SHAPE), np.zeros(SHAPE), region, 0.5)
    assert healthy["fp_volume_mm3"] == 4.0 and math.isnan(healthy["auprc"])
    rows = [dict(row, participant_id="sub-01"), dict(healthy, participant_id="sub-02"),
            {"participant_id": "sub-03", "dice": 0.4, "auprc": math.nan}]
    summary = summarise(rows)
    assert "participant_id" not in summary
    assert summary["auprc"] == {"mean": pytest.approx(1.0), "median": pytest.approx(1.0), "n": 1}
    assert summary["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 0.4) / 3)
    assert summary["dice"]["median"] == pytest.approx(0.4)
    assert summary["any_lesion"]["mean"] == 1.0
    assert math.isnan(summarise([{"x": math.nan}])["x"]["mean"])
    lines = write_summary_tsv(tmp_path / "summary.tsv", rows).read_text().splitlines()
    assert lines[0] == "metric\tmean\tmedian\tn"
    assert "auprc\t1\t1\t1" in lines
    table = write_metrics_tsv(tmp_path / "metrics.tsv", rows).read_text().splitlines()
    header = table[0].split("\t")
    assert len(table) == 4 and header[0] == "dice" and "participant_id" in header
    assert table[3].split("\t")[header.index("lesion_f1")] == "n/a"


#: AUPRC of :func:`auprc_cases` computed by the hand-written implementation this module had before
#: it called scikit-learn (commit 077a82b): the maintained implementation must give the same numbers.
AUPRC_BEFORE_SCIKIT_LEARN = {
    "continuous": 0.3865494345191075,
    "ties": 0.4217635709680706,
    "volume_region": 0.22355892811687766,
    "all_positive": 1.0,
    "constant_scores": 0.3,
}


def auprc_cases() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Fixed inputs: continuous scores, many ties, a 3D volume inside a region, two edge cases."""
    rng = np.random.default_rng(24)
    truth = rng.random(2000) < 0.05
    cases = {"continuous": (rng.normal(size=2000) + 1.5 * truth, truth, None),
             "ties": (np.round(rng.random(2000) + 0.4 * truth, 1), truth, None)}
    volume = rng.normal(size=(8, 12, 10)).astype(np.float32)
    lesion = np.zeros((8, 12, 10), bool)
    lesion[2:5, 3:7, 4:6] = True
    volume[lesion] += 1.0
    region = np.zeros((8, 12, 10), bool)
    region[1:7, 2:10, 2:9] = True
    cases["volume_region"] = (volume, lesion, region)
    cases["all_positive"] = (np.array([0.3, 0.1, 0.2]), np.array([1, 1, 1]), None)
    cases["constant_scores"] = (np.zeros(10), np.arange(10) < 3, None)
    return cases


@pytest.mark.parametrize("name", sorted(AUPRC_BEFORE_SCIKIT_LEARN))
def test_auprc_equals_the_hand_written_values(name: str) -> None:
    scores, truth, region = auprc_cases()[name]
    assert auprc(scores, truth, region) == pytest.approx(AUPRC_BEFORE_SCIKIT_LEARN[name], rel=1e-12)
