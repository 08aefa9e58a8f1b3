"""benchmarks/calibration_rule.py: the rules compared against the app's image-level bound."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.calibration_rule import RULES, lognormal_bound, positive_part
from bids_app.segmentation.calibration import image_bound


def test_the_normal_rule_is_the_apps_bound() -> None:
    values = np.random.default_rng(0).normal(1.0, 0.1, size=8)
    assert RULES["normal"](values, 0.05) == image_bound(values, 0.05)
    assert RULES["max"](values, 0.05) == values.max()


def test_lognormal_bound_is_the_normal_bound_on_logarithms() -> None:
    values = np.exp(np.random.default_rng(1).normal(0.0, 0.5, size=10))
    assert lognormal_bound(values, 0.05) == pytest.approx(np.exp(image_bound(np.log(values), 0.05)))
    skewed = np.array([1.0, 1.1, 1.2, 1.0, 1.3, 3.0])
    assert lognormal_bound(skewed, 0.05) > values.max() and lognormal_bound(skewed, 0.05) > 0


def test_positive_part_leaves_out_images_without_residual_and_scales_the_rate() -> None:
    seen = []

    def bound(values, fpr):
        seen.append((list(values), fpr))
        return 7.0

    rule = positive_part(bound)
    assert rule([0.0, 0.2, 0.4, 0.0], 0.05) == 7.0
    assert seen == [([0.2, 0.4], pytest.approx(0.1))]  # half the images can exceed: the rate doubles
    assert rule([0.0, 0.0, 0.3], 0.05) == 0.3  # one positive image: its maximum
