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


def test_the_residual_is_taken_at_the_images_own_resolution(tmp_path) -> None:
    """A one-voxel lesion on a fine grid keeps its contrast on the native grid; the model-space
    residual (a grid twice as coarse) resampled back would have averaged it away."""
    from types import SimpleNamespace

    import nibabel as nib
    import numpy as np

    from bids_app.pipelines.segment import native_grid_residual
    from bids_app.preprocessing.pipeline import preprocess
    from bids_app.preprocessing.plan import PreprocessingPlan
    from bids_app.segmentation.residuals import residual_map

    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 16)], indexing="ij")
    healthy = (0.4 + 0.2 * np.exp(-(x ** 2 + y ** 2) * 3) + 0.05 * z).astype(np.float32)
    healthy[:2] = 1.0  # a bright band holds the top percentile, so the lesion does not move it
    lesioned = healthy.copy()
    lesioned[12, 12, 8] += 0.3
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    paths = []
    for name, data in (("healthy", healthy), ("lesion", lesioned)):
        paths.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), str(paths[-1]))
    plan = PreprocessingPlan(target_spacing=(1.0, 1.0, 2.0), target_shape=(16, 16, 8))
    twin, pre = (preprocess(p, plan, cover=True) for p in paths)
    counterfactual = SimpleNamespace(image=twin.image, decoded=None)
    residual, spread = native_grid_residual(pre, [counterfactual], "image", "bright")
    assert residual.shape == lesioned.shape and not spread.any()
    params = next(r.params for r in pre.trace.records if r.op == "normalize")
    contrast = 2 * 0.3 / (params["high"] - params["low"])  # the lesion in model intensity units
    assert residual[12, 12, 8] > 0.6 * contrast
    coarse = pre.trace.inverse(residual_map(pre.image, [twin.image], "bright")[0], "probability")
    assert coarse[12, 12, 8] < 0.4 * contrast
