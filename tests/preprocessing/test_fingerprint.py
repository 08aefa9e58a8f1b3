"""Data fingerprint and the plan derived from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from bids_app.preprocessing.fingerprint import (
    compute_fingerprint,
    load_fingerprint,
    plan_from_fingerprint,
    save_fingerprint,
)
from bids_app.synthetic import generate_dataset


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fp") / "bids"
    ds = generate_dataset(root, n_healthy=4, n_lesion=0, seed=0)
    items = [(_abs(root, i), _abs(root, ds.cord_masks[i]), str(i)) for i in ds.images]
    return compute_fingerprint(items)


def _abs(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def test_fingerprint_is_in_ras_axis_order(fingerprint) -> None:
    by_code = {i.axcodes: i for i in fingerprint.images}
    assert "PSR" in by_code, "the synthetic data should include a PSR image"
    psr = by_code["PSR"]
    # PSR stores S-I along the second array axis; in RAS order it is the third.
    assert psr.cord_extent_mm[2] == max(psr.cord_extent_mm)
    for image in fingerprint.images:
        assert image.cord_extent_mm[2] > 2 * max(image.cord_extent_mm[:2]), "the cord runs along S"
        low, mid, high = image.percentiles
        assert low < mid < high


def test_plan_uses_median_spacing_and_caps_shape(fingerprint) -> None:
    plan = plan_from_fingerprint(fingerprint, max_shape=(32, 32, 48), shape_multiple=16)
    assert plan.target_spacing == tuple(round(s, 3) for s in fingerprint.median_spacing())
    assert all(n % 16 == 0 for n in plan.target_shape)
    assert all(n <= cap for n, cap in zip(plan.target_shape, (32, 32, 48)))
    wide = plan_from_fingerprint(fingerprint, max_shape=(512, 512, 512), shape_multiple=8)
    fov = fingerprint.median_field_of_view()
    for n, f, s in zip(wide.target_shape, fov, wide.target_spacing):
        assert f / s <= n < f / s + 8, "an uncapped shape covers the median field of view"


def test_fixed_values_win(fingerprint) -> None:
    plan = plan_from_fingerprint(
        fingerprint, max_shape=(32, 32, 32), fixed={"target_spacing": (1.0, 1.0, 1.0), "target_shape": (16, 16, 16)}
    )
    assert plan.target_spacing == (1.0, 1.0, 1.0) and plan.target_shape == (16, 16, 16)


def test_fingerprint_round_trips_through_json(fingerprint, tmp_path: Path) -> None:
    save_fingerprint(fingerprint, tmp_path)
    assert load_fingerprint(tmp_path) == fingerprint
