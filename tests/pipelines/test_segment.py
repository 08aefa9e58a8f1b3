"""Per-image settings of the segmentation pipeline."""
from __future__ import annotations

import pytest

from bids_app.pipelines.segment import resolve_polarity, residual_settings
from bids_app.settings import SegmentationSettings


@pytest.mark.parametrize("name,expected", [("sub-01_T2w.nii.gz", "bright"), ("sub-01_ses-1_T1w.nii.gz", "dark"),
                                           ("sub-01_acq-sag_T2starw.nii", "bright"), ("sub-01_UNIT1.nii.gz", "dark")])
def test_auto_polarity_follows_the_suffix(name: str, expected: str) -> None:
    assert resolve_polarity("auto", f"/data/sub-01/anat/{name}") == expected
    assert residual_settings(SegmentationSettings(), name).polarity == expected


def test_explicit_polarity_is_kept() -> None:
    assert resolve_polarity("both", "sub-01_T1w.nii.gz") == "both"
    assert residual_settings(SegmentationSettings(polarity="dark"), "sub-01_T2w.nii.gz").polarity == "dark"
