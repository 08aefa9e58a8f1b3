"""Sliding windows: full coverage, exact blending, and windowed counterfactuals that agree with one window."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_app.pipelines.windows import EDGE_WEIGHT, blend_weights, slide, window_starts, windows


@pytest.mark.parametrize("extent,size,overlap", [(32, 32, 0.5), (37, 32, 0.5), (110, 32, 0.5), (100, 16, 0.25),
                                                 (17, 16, 0.0), (5, 8, 0.5)])
def test_window_starts_cover_everything_inside_the_volume(extent: int, size: int, overlap: float) -> None:
    starts = window_starts(extent, size, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if extent <= size:
        assert starts == [0]
        return
    assert starts[-1] == extent - size
    covered = np.zeros(extent, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert gaps.max() <= size * (1 - overlap) + 1e-9  # at least the requested overlap


def test_window_starts_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        window_starts(10, 0, 0.5)
    with pytest.raises(ValueError):
        window_starts(10, 4, overlap=1.0)


def test_blend_weights_peak_in_the_middle_and_stay_positive() -> None:
    w = blend_weights((8, 8, 16))
    assert w.min() > 0 and w.min() >= EDGE_WEIGHT ** 3 * 0.99
    assert w.max() <= 1 and w[3:5, 3:5, 7:9].min() > 0.8
    assert w[0, 4, 8] < w[4, 4, 8]


def test_slide_of_the_identity_returns_the_volume() -> None:
    volume = np.random.default_rng(0).normal(size=(16, 20, 45)).astype(np.float32)
    seen: list[int] = []

    def apply(index: int, window: tuple[slice, ...]) -> list[np.ndarray]:
        seen.append(index)
        return [volume[window], 2 * volume[window]]

    same, double = slide(volume.shape, (16, 16, 16), apply, 0.5)
    np.testing.assert_allclose(same, volume, atol=1e-6)
    np.testing.assert_allclose(double, 2 * volume, atol=1e-5)
    assert seen == list(range(len(list(windows(volume.shape, (16, 16, 16), 0.5)))))
    assert len(seen) == 2 * 5  # two windows across 20 voxels, five along 45 at half overlap


def test_slide_blends_disagreeing_windows_smoothly() -> None:
    """Each window outputs its own index: the blend stays between neighbours and is monotone."""
    blended, = slide((8, 8, 40), (8, 8, 8), lambda i, w: [np.full((8, 8, 8), float(i))], 0.5)
    profile = blended[4, 4]
    assert profile[0] == 0 and profile[-1] == len(window_starts(40, 8, 0.5)) - 1
    assert np.all(np.diff(profile) >= -1e-6)


def test_windows_refuse_a_volume_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="smaller"):
        list(windows((8, 8, 4), (8, 8, 8), 0.5))


def test_the_pipeline_over_one_window_equals_that_window_and_keeps_the_image_at_strength_zero() -> None:
    from bids_app.models.unet3d import UNet3D, UNet3DConfig
    from bids_app.models.vqgan import VQGAN, VQGANConfig
    from bids_app.pipelines.counterfactual import CounterfactualPipeline, Window
    from bids_app.schedulers import SchedulerConfig
    from bids_app.settings.segmentation import CounterfactualSettings

    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(n_hiddens=4, downsample=(2, 2, 2), n_codes=16, embedding_dim=4, norm_groups=2)).eval()
    unet = UNet3D(UNet3DConfig(in_channels=4, base_channels=8, channel_mults=(1, 2), attention_levels=(False, False))).eval()
    pipe = CounterfactualPipeline(vqgan, unet, SchedulerConfig(num_train_timesteps=100), 1.0, window_shape=(16, 16, 16))
    image = np.random.default_rng(1).uniform(-1, 1, size=(16, 16, 16)).astype(np.float32)
    settings = CounterfactualSettings(strengths=(0.0, 0.5), patch_period=2, patch_offsets=1)
    single = pipe.run_windows([Window(image, index=0)], settings, seed=4)[0]
    windowed = pipe(image, settings, seed=4)  # a volume of exactly the window's shape: one window
    assert [(c.strength, c.sample) for c in windowed] == [(c.strength, c.sample) for c in single] == [(0.0, 0),
                                                                                                     (0.5, 0)]
    for a, b in zip(single, windowed):
        np.testing.assert_allclose(a.image, b.image, atol=1e-5)
        np.testing.assert_allclose(a.decoded, b.decoded, atol=1e-5)
    # The edit is transferred onto the input: strength 0 changes nothing; its raw decoding does.
    np.testing.assert_array_equal(single[0].image, image)
    assert not np.allclose(single[0].decoded, image)
    long = np.concatenate([image, image[:, :, ::-1]], axis=2)
    assert all(c.image.shape == c.decoded.shape == long.shape for c in pipe(long, settings, seed=4))
