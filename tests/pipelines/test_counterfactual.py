"""CounterfactualPipeline: chains denoised together equal the same chains run one by one; patched
noising, seeding, adapter steering, the transferred edit and the raw decoding."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bids_app.errors import UsageError
from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.models.unet3d import UNet3D, UNet3DConfig
from bids_app.models.vqgan import VQGAN, VQGANConfig
from bids_app.pipelines.counterfactual import STEPS, CounterfactualPipeline, Window
from bids_app.schedulers import SchedulerConfig
from bids_app.settings import ComputeSettings
from bids_app.settings.segmentation import CounterfactualSettings

SCHEDULE = SchedulerConfig(num_train_timesteps=100, prediction_type="v_prediction")
WINDOW = (16, 16, 16)
#: 8 patch sets over a whole 8^3 latent (the default layout has 54): keeps most tests cheap.
FEW_PATCHES = {"patch_size": (2, 2, 2), "patch_period": 2, "patch_offsets": 1}


@pytest.fixture(scope="module")
def models() -> tuple[VQGAN, UNet3D, T2IAdapter]:
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(n_hiddens=4, downsample=(2, 2, 2), n_codes=16, embedding_dim=4, norm_groups=2)).eval()
    unet = UNet3D(UNet3DConfig(in_channels=4, base_channels=8, channel_mults=(1, 2), attention_levels=(False, True),
                               num_heads=2, norm_groups=4, zero_init_output=False)).eval()
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (2, 2, 2), hidden=4)).eval()
    for conv in adapter.outputs:  # zero-initialised: give the features something to change
        torch.nn.init.normal_(conv.weight, std=0.5)
    return vqgan, unet, adapter


def _pipeline(models, *, adapter: bool = False, unet: torch.nn.Module | None = None, latent_scale: float = 1.0,
              batch_size: int = 16) -> CounterfactualPipeline:
    vqgan, plain_unet, adapter_model = models
    return CounterfactualPipeline(vqgan, unet if unet is not None else plain_unet, SCHEDULE, latent_scale,
                                  adapter_model if adapter else None, window_shape=WINDOW,
                                  compute=ComputeSettings(inference_batch_size=batch_size))


def _settings(**overrides) -> CounterfactualSettings:
    return CounterfactualSettings(**{**FEW_PATCHES, **overrides})


def _images(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, size=WINDOW).astype(np.float32) for _ in range(n)]


def _stack(results: list) -> np.ndarray:
    return np.stack([c.image for per_input in results for c in per_input])


def test_batched_chains_equal_separate_runs(models) -> None:
    _, _, adapter = models
    editable = np.zeros(WINDOW, bool)
    editable[4:12, 4:12, :] = True
    control = torch.from_numpy(editable.astype(np.float32))[None, None]
    with torch.no_grad():
        features = adapter(control)
    inputs = [Window(image, features if i != 1 else None, editable if i != 2 else None, index=i)
              for i, image in enumerate(_images(3))]
    settings = _settings(strengths=(0.0, 0.4, 0.8), n_samples=2)
    together = _pipeline(models, latent_scale=1.3, batch_size=64).run_windows(inputs, settings, seed=7)
    alone = _pipeline(models, latent_scale=1.3, batch_size=1).run_windows(inputs, settings, seed=7)
    labels = [(c.strength, c.sample, c.start_timestep) for per_input in together for c in per_input]
    assert labels == [(c.strength, c.sample, c.start_timestep) for per_input in alone for c in per_input]
    assert len(labels) == 3 * (1 + 2 + 2), "strength 0 has a single (deterministic) sample"
    # One DDIM step from exactly the strength: round(s T) - 1 of the 100-step schedule; none at 0.
    assert {(s, t) for s, _, t in labels} == {(0.0, None), (0.4, 39), (0.8, 79)}
    np.testing.assert_allclose(_stack(together), _stack(alone), atol=2e-5)
    # Samples differ from each other, and the chains differ in what they were given.
    first = together[0]
    assert not np.allclose(first[1].image, first[2].image, atol=1e-3)
    # Each input one call at a time gives the same again (windows do not leak into each other).
    pipe = _pipeline(models, latent_scale=1.3, batch_size=64)
    for window, expected in zip(inputs, together):
        single = pipe.run_windows([window], settings, seed=7)[0]
        np.testing.assert_allclose(np.stack([c.image for c in single]), np.stack([c.image for c in expected]),
                                   atol=2e-5)


def test_a_sample_does_not_depend_on_how_many_are_drawn(models) -> None:
    image = _images(1)[0]
    one = _pipeline(models)(image, _settings(strengths=(0.6,)), seed=0)
    five = _pipeline(models, batch_size=5)(image, _settings(strengths=(0.6,), n_samples=5), seed=0)
    np.testing.assert_allclose(one[0].image, five[0].image, atol=2e-5)
    assert len({round(float(c.image.sum()), 3) for c in five}) == 5


def test_the_adapter_changes_the_counterfactual(models) -> None:
    image = _images(1)[0]
    control = np.ones(WINDOW, bool)
    settings = _settings(strengths=(0.8,))
    pipe = _pipeline(models, adapter=True)
    plain = _pipeline(models)(image, settings, seed=0)
    steered = pipe(image, settings, seed=0, control=control)
    assert pipe.steers(control, settings)
    assert np.abs(plain[0].image - steered[0].image).max() > 1e-3
    # No control mask, an empty one, or adapter_scale 0 (--no-adapter): not steered, the plain result.
    switched_off = dataclasses.replace(settings, adapter_scale=0.0)
    for mask, run_settings in ((None, settings), (np.zeros(WINDOW, bool), settings), (control, switched_off)):
        assert not pipe.steers(mask, run_settings)
        np.testing.assert_allclose(pipe(image, run_settings, seed=0, control=mask)[0].image, plain[0].image,
                                   atol=2e-5)
    assert not _pipeline(models).steers(control, settings), "no adapter loaded"


def test_windowed_fast_path_is_unchanged_by_the_batch_size(models) -> None:
    image = np.concatenate(_images(2), axis=2)  # two windows and a half-overlap one
    settings = _settings(strengths=(0.5, 0.7), n_samples=2)
    wide = _pipeline(models, batch_size=16)(image, settings, seed=0)
    narrow = _pipeline(models, batch_size=3)(image, settings, seed=0)
    assert len(wide) == len(narrow) == 4
    np.testing.assert_allclose(np.stack([c.image for c in wide]), np.stack([c.image for c in narrow]), atol=2e-5)


def test_channels_last_preparation_keeps_the_result(models) -> None:
    image = _images(1)[0]
    settings = _settings(strengths=(0.5,))
    copies = [type(m)(m.config) for m in models[:2]]
    for copy, original in zip(copies, models[:2]):
        copy.load_state_dict(original.state_dict())
        copy.train()
    pipe = CounterfactualPipeline(copies[0], copies[1], SCHEDULE, 1.0, window_shape=WINDOW)
    assert not any(m.training for m in copies), "prepared for inference: evaluation mode"
    assert copies[1].conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    prepared = pipe(image, settings, seed=0)
    for copy in copies:
        copy.to(memory_format=torch.contiguous_format)
    assert not copies[1].conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    plain = pipe(image, settings, seed=0)
    np.testing.assert_allclose(prepared[0].image, plain[0].image, atol=2e-5)


def test_inference_settings_are_checked() -> None:
    with pytest.raises(UsageError, match="compute.precision"):
        ComputeSettings(precision="int8")
    with pytest.raises(UsageError, match="compute.inference_batch_size"):
        ComputeSettings(inference_batch_size=0)
    with pytest.raises(UsageError, match="segmentation.counterfactual.strengths"):
        CounterfactualSettings(strengths=(0.5, 1.5))
    with pytest.raises(UsageError, match="segmentation.counterfactual.n_samples"):
        CounterfactualSettings(n_samples=0)


def test_from_models_takes_the_window_and_the_compute_settings(models) -> None:
    vqgan, unet, adapter = models
    trained = SimpleNamespace(vqgan=vqgan, unet=unet, adapter=adapter, scheduler_config=SCHEDULE, latent_scale=1.3,
                              plan=SimpleNamespace(target_shape=(16, 16, 32)))
    compute = ComputeSettings(inference_batch_size=5, precision="fp32", max_latent_voxels=64)
    pipe = CounterfactualPipeline.from_models(trained, "cpu", compute)
    assert (pipe.window_shape, pipe.batch_size, pipe.precision, pipe.max_latent_voxels) == ((16, 16, 32), 5, "fp32",
                                                                                           64)
    assert (pipe.vqgan, pipe.unet, pipe.adapter, pipe.latent_scale) == (vqgan, unet, adapter, 1.3)


class _Counting(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.evaluations, self.config = unet, 0, unet.config

    def forward(self, z, t, *rest):
        single = z.shape[0] == 2 and torch.equal(z[0], z[1])  # one chain, run twice (avoid_single_batch)
        self.evaluations += 1 if single else z.shape[0]
        return self.unet(z, t, *rest)


def test_one_evaluation_per_chain(models) -> None:
    """One DDIM step (STEPS) per chain: a whole 8^3 latent is 8 patch sets of FEW_PATCHES, so two
    strengths cost 16 evaluations; strength 0 none."""
    assert STEPS == 1
    counting = _Counting(models[1])
    results = _pipeline(models, unet=counting)(_images(1)[0], _settings(strengths=(0.0, 0.5, 0.8)), seed=0)
    assert counting.evaluations == 2 * 8
    assert len(results) == 3


def test_patched_noising_runs_one_chain_per_patch_set(models) -> None:
    counting = _Counting(models[1])
    editable = np.zeros(WINDOW, bool)
    editable[6:10, 6:10, 2:14] = True  # latent 3:5 x 3:5 x 1:7 (2x downsampling)
    _pipeline(models, unet=counting)(_images(1)[0], _settings(strengths=(0.8,)), seed=0, editable=editable)
    # latent boxes along x, y: {2:4, 4:6} -> both classes; along z: 1:7 covers classes 0 and 1: 2*2*2 sets.
    assert counting.evaluations == 8


def test_default_settings_run_one_chain_per_strength_sample_and_patch_set(models, monkeypatch) -> None:
    """CounterfactualSettings() as the app runs it: strength 0.8, one sample, 2x2x2 patches 3 apart on
    2 shifted grids. An editable box's latent footprint 3:5 x 3:5 x 1:7 holds 15 patch sets: offset 0
    covers box classes {1, 2} x {1, 2} x {0, 1, 2} (12), offset 1 {2} x {2} x {0, 1, 2} (3). Only the
    footprint's latents are regenerated; everything else decodes from the input's own latent."""
    defaults = CounterfactualSettings()
    assert (defaults.strengths, defaults.n_samples, defaults.patch_size, defaults.patch_period,
            defaults.patch_offsets) == ((0.8,), 1, (2, 2, 2), 3, 2)
    image = _images(1)[0]
    editable = np.zeros(WINDOW, bool)
    editable[6:10, 6:10, 2:14] = True
    footprint = np.zeros((8, 8, 8), bool)
    footprint[3:5, 3:5, 1:7] = True
    counting = _Counting(models[1])
    pipe = _pipeline(models, unet=counting)
    decoded: list[torch.Tensor] = []
    real_decode = pipe._decode
    monkeypatch.setattr(pipe, "_decode", lambda latents: decoded.extend(latents) or real_decode(latents))

    result = pipe(image, defaults, seed=0, editable=editable)
    assert counting.evaluations == 1 * 1 * 15
    assert [(c.strength, c.sample, c.start_timestep) for c in result] == [(0.8, 0, 79)]
    # decoded: the input's latent (for the reconstruction), then the counterfactual latent
    z0, z = (latent[0].detach().numpy() for latent in decoded)
    changed = np.abs(z - z0).max(axis=0)
    assert np.array_equal(z[:, ~footprint], z0[:, ~footprint])
    assert changed[footprint].min() > 0, "every latent voxel of the footprint was regenerated"
    # ... and the image changes there (image voxels 6:10 x 6:10 x 2:14).
    assert np.abs(result[0].image - image)[6:10, 6:10, 2:14].max() > 1e-3

    counting.evaluations = 0
    more = pipe(image, dataclasses.replace(defaults, strengths=(0.5, 0.8), n_samples=2), seed=0, editable=editable)
    assert [(c.strength, c.sample) for c in more] == [(0.5, 0), (0.5, 1), (0.8, 0), (0.8, 1)]
    assert counting.evaluations == 2 * 2 * 15


def test_patched_noising_changes_only_the_editable_latents(models) -> None:
    """Outside the editable region the counterfactual latent is the input's own, so with nothing
    editable the counterfactual is the input exactly, and a small region changes the image mostly
    near it."""
    image = _images(1)[0]
    pipe = _pipeline(models)
    nothing = np.zeros(image.shape, bool)
    result = pipe(image, CounterfactualSettings(strengths=(0.8,)), seed=0, editable=nothing)
    np.testing.assert_array_equal(result[0].image, image)
    assert result[0].start_timestep is None
    corner = nothing.copy()
    corner[:4, :4, :4] = True
    changed = pipe(image, CounterfactualSettings(strengths=(0.8,)), seed=0, editable=corner)[0].image
    difference = np.abs(changed - image)
    near, far = difference[:4, :4, :4].max(), difference[10:, 10:, 10:].max()
    assert near > 1e-3
    assert far < near / 10  # only the decoder's volume-wide normalisation reaches this far


def test_patched_noising_is_deterministic_and_seeded(models) -> None:
    image = _images(1)[0]
    pipe = _pipeline(models)
    first, again, other = (pipe(image, CounterfactualSettings(), seed)[0].image for seed in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


def test_a_single_volume_runs_as_a_pair_on_cpu_and_gives_the_same_result() -> None:
    from bids_app.pipelines.batching import avoid_single_batch

    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    seen = []

    def fn(x, t, features):
        seen.append((x.shape[0], t.shape[0], features[0].shape[0]))
        return conv(x) + t.view(-1, 1, 1, 1, 1) + features[0]

    x, t, f = torch.randn(1, 2, 4, 5, 6), torch.ones(1), [torch.randn(1, 3, 4, 5, 6)]
    out = avoid_single_batch(fn, x, t, f, width=2 * 4 * 5)
    assert seen == [(2, 2, 2)] and out.shape == (1, 3, 4, 5, 6)
    torch.testing.assert_close(out, conv(x) + 1 + f[0], atol=1e-5, rtol=1e-5)
    avoid_single_batch(fn, torch.randn(3, 2, 4, 5, 6), torch.ones(3), [torch.randn(3, 3, 4, 5, 6)], width=40)
    assert seen[-1] == (3, 3, 3), "real batches pass unchanged"
    avoid_single_batch(fn, x, t, f, width=64 * 16 * 64)
    assert seen[-1] == (1, 1, 1), "layers wide enough for oneDNN alone are not run twice"


def test_each_counterfactual_holds_the_transferred_image_and_the_raw_decoding(models) -> None:
    """image = x + D(z) - D(E(x)); decoded = D(z). Both are blended over the windows alike, so
    image - decoded = x - D(E(x)) for every strength, and at strength 0 (no step) decoded is the
    reconstruction D(E(x)) and image the input itself."""
    image = np.concatenate(_images(2), axis=2)  # three windows: the decodings are blended like the images
    still, moved = _pipeline(models)(image, _settings(strengths=(0.0, 0.6)), seed=3)
    np.testing.assert_array_equal(still.image, image)  # strength 0: the input, and its reconstruction
    reconstruction = still.decoded
    assert reconstruction.shape == image.shape
    assert not np.allclose(reconstruction, image, atol=1e-2)
    np.testing.assert_allclose(moved.image - moved.decoded, image - reconstruction, atol=1e-5)
    assert np.abs(moved.decoded - reconstruction).max() > 1e-3
