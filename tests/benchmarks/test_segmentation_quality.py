"""benchmarks/segmentation_quality.py: resampled calibration counts false positives and Dice per draw."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.segmentation_quality import resampled_calibration


def test_calibrating_at_the_maximum_gives_the_exchangeable_rate() -> None:
    """A threshold at the largest of k calibration values is exceeded by a new exchangeable value
    with probability 1 / (k + 1): the resampling must reproduce that rate."""
    values = np.random.default_rng(3).normal(size=40)
    size = 4
    result = resampled_calibration(values, lambda chosen: (float(values[chosen].max()), None),
                                   lambda threshold, grow: [0.5], size, draws=3000, seed=1)
    assert result["healthy_fp_rate"] == pytest.approx(1 / (size + 1), abs=0.02)
    assert result["calibration_images"] == size and result["draws"] == 3000


def test_median_dice_and_its_share_above_the_target_follow_the_threshold() -> None:
    values = np.arange(10, dtype=float)  # lesion-free thresholds 0..9
    seen = []

    def thresholds_for(chosen: list[int]) -> tuple[float, float | None]:
        assert len(chosen) == 3 and len(set(chosen)) == 3
        seen.append(chosen)
        return float(values[chosen].max()), 0.5

    def dice_at(threshold: float, grow: float | None) -> list[float]:
        assert grow == 0.5
        return [0.9, 0.8, 0.1] if threshold < 8 else [0.6, 0.1, 0.0]  # high thresholds miss lesions

    result = resampled_calibration(values, thresholds_for, dice_at, 3, draws=500, seed=0)
    low = np.mean([max(c) < 8 for c in seen])  # draws whose threshold stays below 8
    assert 0 < low < 1
    assert result["median_dice_mean"] == pytest.approx(0.8 * low + 0.1 * (1 - low))
    assert result["share_median_dice_at_least_0.7"] == pytest.approx(low)
    # The false positives are counted on the images left out of each draw only.
    expected = np.mean([np.mean([v > max(c) for i, v in enumerate(values) if i not in c]) for c in seen])
    assert result["healthy_fp_rate"] == pytest.approx(expected)


def test_sizes_that_leave_nothing_to_count_are_refused() -> None:
    with pytest.raises(ValueError, match="calibration size"):
        resampled_calibration([0.1, 0.2], lambda c: (0.0, None), lambda t, g: [0.0], 2, draws=1)
    with pytest.raises(ValueError, match="draws"):
        resampled_calibration([0.1, 0.2], lambda c: (0.0, None), lambda t, g: [0.0], 1, draws=0)


def test_breakdown_by_lesion_type_and_acquisition() -> None:
    from benchmarks.segmentation_quality import breakdown

    rows = [
        {"groups": {"lesion_type": "ms", "acquisition": "ax-thick"}, "dice": 0.2, "detected": 1, "n_lesions": 3},
        {"groups": {"lesion_type": "ms", "acquisition": "sag-iso"}, "dice": 0.6, "detected": 2, "n_lesions": 2},
        {"groups": {"lesion_type": "sci", "acquisition": "sag-iso"}, "dice": 0.9, "detected": 1, "n_lesions": 1},
        {"groups": {"lesion_type": "n/a", "acquisition": "ax-thick"}, "false_positive": True},
        {"groups": {"lesion_type": "n/a", "acquisition": "ax-thick"}, "false_positive": False},
        {"groups": {}, "false_positive": False},  # a dataset without the columns
    ]
    result = breakdown(rows)
    assert result["lesion_type"]["ms"] == {"n_images": 2, "median_dice": pytest.approx(0.4), "lesion_recall": 0.6}
    assert result["lesion_type"]["sci"]["lesion_recall"] == 1.0
    assert result["acquisition"]["ax-thick"] == {"n_images": 1, "median_dice": 0.2, "lesion_recall": pytest.approx(1 / 3),
                                                 "healthy_with_false_positive": "1 / 2"}
    assert result["acquisition"]["n/a"] == {"healthy_with_false_positive": "0 / 1"}
    assert result["lesion_type"]["n/a"] == {"healthy_with_false_positive": "1 / 3"}
