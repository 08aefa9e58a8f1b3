"""Per-image settings of the segmentation pipeline, and the residual on the image's own grid."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_app.pipelines.segment import ImageInput, native_grid_residual, native_residual
from bids_app.settings import SegmentationSettings
from bids_app.settings.segmentation import CounterfactualSettings, ResidualSettings, resolve_polarity


@pytest.mark.parametrize("name,expected", [("sub-01_T2w.nii.gz", "bright"), ("sub-01_ses-1_T1w.nii.gz", "dark"),
                                           ("sub-01_acq-sag_T2starw.nii", "bright"), ("sub-01_UNIT1.nii.gz", "dark")])
def test_auto_polarity_follows_the_suffix(name: str, expected: str) -> None:
    item = ImageInput("sub-01", Path(f"/data/sub-01/anat/{name}"))
    assert resolve_polarity("auto", item.suffix) == expected


def test_explicit_polarity_is_kept() -> None:
    assert resolve_polarity("both", "T1w") == "both"
    assert resolve_polarity("dark", "T2w") == "dark"


@pytest.fixture(scope="module")
def pipeline():
    from bids_app.models.adapter import AdapterConfig, T2IAdapter
    from bids_app.models.unet3d import UNet3D, UNet3DConfig
    from bids_app.models.vqgan import VQGAN, VQGANConfig
    from bids_app.pipelines.counterfactual import CounterfactualPipeline
    from bids_app.schedulers import SchedulerConfig

    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(n_hiddens=4, downsample=(2, 2, 2), n_codes=16, embedding_dim=4, norm_groups=2))
    unet = UNet3D(UNet3DConfig(in_channels=4, base_channels=8, channel_mults=(1, 2), attention_levels=(False, False),
                               norm_groups=4, zero_init_output=False))
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (2, 2, 2), hidden=4))
    return CounterfactualPipeline(vqgan, unet, SchedulerConfig(num_train_timesteps=100), 1.0, adapter,
                                  window_shape=(16, 16, 16))


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("name, polarity, expected", [("sub-01_T1w", "auto", "dark"), ("sub-01_T2w", "auto", "bright"),
                                                      ("sub-01_T1w", "bright", "bright")])
def test_native_residual_resolves_the_polarity_per_image(tmp_path, pipeline, name: str, polarity: str,
                                                         expected: str) -> None:
    """Through the real path: preprocess, counterfactuals in the cord, the residual on the native grid."""
    from bids_app.preprocessing.plan import PreprocessingPlan

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, size=(20, 20, 20)).astype(np.float32)
    cord = np.zeros(image.shape, np.uint8)
    cord[8:12, 8:12, 2:18] = 1
    item = ImageInput(name, _write(tmp_path / f"{name}.nii.gz", image), _write(tmp_path / "cord.nii.gz", cord),
                      _write(tmp_path / "control.nii.gz", cord))
    seg = SegmentationSettings(counterfactual=CounterfactualSettings(strengths=(0.5, 0.8), patch_period=2,
                                                                     patch_offsets=1),
                               residual=ResidualSettings(polarity=polarity))
    plan = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.0), target_shape=(16, 16, 16))
    result = native_residual(pipeline, plan, item, seg, seed=0)
    assert result.polarity == expected
    assert result.region_source == "cord" and result.adapter_used
    assert [(c.strength, c.sample) for c in result.counterfactuals] == [(0.5, 0), (0.8, 0)]
    assert result.residual.shape == result.region.shape == image.shape
    np.testing.assert_array_equal(result.region, cord.astype(bool))
    assert not result.residual[~result.region].any() and result.residual[result.region].any()
    assert result.mean_counterfactual().shape == image.shape
    without_control = native_residual(pipeline, plan, ImageInput(name, item.image, item.cord_mask), seg, seed=0)
    assert not without_control.adapter_used


def test_the_residual_is_taken_at_the_images_own_resolution(tmp_path) -> None:
    """A one-voxel lesion on a fine grid keeps its contrast on the native grid; the model-space
    residual (a grid twice as coarse) resampled back would have averaged it away.

    The residual is the agreement of the transferred edit and the raw decoding; here the
    transferred edit is a uniform ``contrast`` everywhere, so the raw decoding's comparison
    with the input decides where the residual is high."""
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
    params = next(r.params for r in pre.trace.records if r.op == "normalize")
    contrast = 2 * 0.3 / (params["high"] - params["low"])  # the lesion in model intensity units
    counterfactual = SimpleNamespace(image=pre.image - contrast, decoded=twin.image)
    residual, spread = native_grid_residual(pre, [counterfactual], "bright")
    assert residual.shape == lesioned.shape and not spread.any()
    assert residual[12, 12, 8] > 0.6 * contrast
    coarse = pre.trace.inverse(residual_map(pre.image, [counterfactual.image], "bright", [twin.image])[0],
                               "probability")
    assert coarse[12, 12, 8] < 0.4 * contrast


def test_the_median_footprint_reads_the_model_spacing_along_each_native_axis(tmp_path) -> None:
    """An image stored with its first voxel axis running inferior-superior: the model grid's 2 mm
    axis (S) lies along that native axis, its 1 mm axes along the other two."""
    from bids_app.pipelines.segment import native_footprint
    from bids_app.preprocessing.pipeline import preprocess
    from bids_app.preprocessing.plan import PreprocessingPlan

    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, 0.6, 0.6, 1.0  # voxel axes: S, R, A
    path = tmp_path / "oblique_order.nii.gz"
    data = np.random.default_rng(0).random((8, 20, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    plan = PreprocessingPlan(target_spacing=(1.0, 1.0, 2.0), target_shape=(12, 12, 8))
    pre = preprocess(path, plan, cover=True)
    assert native_footprint(pre.trace, plan) == (3, 5, 5)
