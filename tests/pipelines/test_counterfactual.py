"""The fast path: chains denoised together equal the same chains run one by one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.models.unet3d import UNet3D, UNet3DConfig
from bids_app.models.vqgan import VQGAN, VQGANConfig
from bids_app.pipelines.counterfactual import (
    CounterfactualSettings,
    Window,
    batch_counterfactuals,
    counterfactuals,
    prepare_for_inference,
    windowed_counterfactuals,
)
from bids_app.schedulers import SchedulerConfig

SCHEDULE = SchedulerConfig(num_train_timesteps=100, prediction_type="v_prediction")


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


def _images(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, size=(16, 16, 16)).astype(np.float32) for _ in range(n)]


def _stack(results: list) -> np.ndarray:
    return np.stack([c.image for per_input in results for c in per_input])


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 0.7)])
def test_batched_chains_equal_separate_runs(models, sampler: str, eta: float) -> None:
    vqgan, unet, adapter = models
    editable = np.zeros((16, 16, 16), bool)
    editable[4:12, 4:12, :] = True
    control = torch.from_numpy(editable.astype(np.float32))[None, None]
    with torch.no_grad():
        features = adapter(control)
    inputs = [Window(image, features if i != 1 else None, editable if i != 2 else None, index=i)
              for i, image in enumerate(_images(3))]
    settings = CounterfactualSettings(strengths=(0.0, 0.4, 0.8), n_samples=3, steps=4, sampler=sampler, eta=eta,
                                      seed=7, batch_size=64)
    together = batch_counterfactuals(vqgan, unet, SCHEDULE, 1.3, inputs, settings)
    alone = batch_counterfactuals(vqgan, unet, SCHEDULE, 1.3, inputs, dataclasses.replace(settings, batch_size=1))
    labels = [(c.strength, c.sample, c.start_timestep) for per_input in together for c in per_input]
    assert labels == [(c.strength, c.sample, c.start_timestep) for per_input in alone for c in per_input]
    assert len(labels) == 3 * (1 + 3 + 3), "strength 0 has a single (deterministic) sample"
    np.testing.assert_allclose(_stack(together), _stack(alone), atol=2e-5)
    # Samples differ from each other, and the chains differ in what they were given.
    first = together[0]
    assert not np.allclose(first[1].image, first[2].image, atol=1e-3)
    # Each input one call at a time gives the same again (windows do not leak into each other).
    for window, expected in zip(inputs, together):
        single = counterfactuals(vqgan, unet, SCHEDULE, 1.3, window.image, settings, "cpu", window.features,
                                 window.index, window.editable)
        np.testing.assert_allclose(np.stack([c.image for c in single]), np.stack([c.image for c in expected]),
                                   atol=2e-5)


def test_a_sample_does_not_depend_on_how_many_are_drawn(models) -> None:
    vqgan, unet, _ = models
    image = _images(1)[0]
    one = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, CounterfactualSettings(strengths=(0.6,), steps=3))
    five = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image,
                           CounterfactualSettings(strengths=(0.6,), steps=3, n_samples=5, batch_size=5))
    np.testing.assert_allclose(one[0].image, five[0].image, atol=2e-5)
    assert len({round(float(c.image.sum()), 3) for c in five}) == 5


def test_the_adapter_changes_the_counterfactual(models) -> None:
    vqgan, unet, adapter = models
    image = _images(1)[0]
    features = adapter(torch.ones(1, 1, 16, 16, 16))
    settings = CounterfactualSettings(strengths=(0.8,), steps=3)
    plain = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, settings)
    steered = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, settings, adapter_features=features)
    assert np.abs(plain[0].image - steered[0].image).max() > 1e-3


def test_windowed_fast_path_is_unchanged_by_the_batch_size(models) -> None:
    vqgan, unet, _ = models
    image = np.concatenate(_images(2), axis=2)  # two windows and a half-overlap one
    settings = CounterfactualSettings(strengths=(0.5, 0.7), steps=3, n_samples=2)
    wide = windowed_counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, settings, (16, 16, 16))
    narrow = windowed_counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, dataclasses.replace(settings, batch_size=3),
                                      (16, 16, 16))
    np.testing.assert_allclose(np.stack([c.image for c in wide]), np.stack([c.image for c in narrow]), atol=2e-5)


def test_channels_last_preparation_keeps_the_result(models) -> None:
    vqgan, unet, _ = models
    image = _images(1)[0]
    settings = CounterfactualSettings(strengths=(0.5,), steps=3)
    before = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, settings)
    copies = [type(m)(m.config) for m in (vqgan, unet)]
    for copy, original in zip(copies, (vqgan, unet)):
        copy.load_state_dict(original.state_dict())
    prepare_for_inference(*copies)
    assert copies[1].conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    after = counterfactuals(copies[0], copies[1], SCHEDULE, 1.0, image, settings)
    np.testing.assert_allclose(before[0].image, after[0].image, atol=2e-5)


def test_inference_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="precision"):
        CounterfactualSettings(precision="int8")
    with pytest.raises(ValueError, match="batch_size"):
        CounterfactualSettings(batch_size=0)


class _Counting(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.evaluations, self.config = unet, 0, unet.config

    def forward(self, z, t, *rest):
        single = z.shape[0] == 2 and torch.equal(z[0], z[1])  # one chain, run twice (avoid_single_batch)
        self.evaluations += 1 if single else z.shape[0]
        return self.unet(z, t, *rest)


@pytest.mark.parametrize("overrides, expected", [
    ({"steps": 4}, 4 + 4),  # every strength runs about `steps` evaluations
    ({"steps": 1}, 1 + 1),  # the one-step x0 read-out
    ({"chain_steps": 50, "sampler": "ddpm"}, 25 + 40),  # the seed's rule: int(50 s) steps of a 50-step chain
])
def test_evaluations_per_chain(models, overrides: dict, expected: int) -> None:
    vqgan, unet, _ = models
    counting = _Counting(unet)
    settings = CounterfactualSettings(strengths=(0.5, 0.8), noising="region", **overrides)
    results = counterfactuals(vqgan, counting, SCHEDULE, 1.0, _images(1)[0], settings)
    assert counting.evaluations == expected
    assert len(results) == 2


def test_patched_noising_runs_one_chain_per_patch_set(models) -> None:
    vqgan, unet, _ = models
    counting = _Counting(unet)
    editable = np.zeros((16, 16, 16), bool)
    editable[6:10, 6:10, 2:14] = True  # latent 3:5 x 3:5 x 1:7 (2x downsampling)
    settings = CounterfactualSettings(strengths=(0.8,), steps=2, patch_size=(2, 2, 2), patch_period=2, patch_offsets=1)
    counterfactuals(vqgan, counting, SCHEDULE, 1.0, _images(1)[0], settings, editable=editable)
    # latent boxes along x, y: {2:4, 4:6} -> both classes; along z: 1:7 covers classes 0 and 1: 2*2*2 sets.
    assert counting.evaluations == 8 * 2


def test_patched_noising_changes_only_the_editable_latents(models) -> None:
    """Outside the editable region the counterfactual latent is the input's own, so with nothing
    editable the counterfactual is the input exactly, and a small region changes the image mostly
    near it."""
    vqgan, unet, _ = models
    image = _images(1)[0]
    nothing = np.zeros(image.shape, bool)
    result = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, CounterfactualSettings(strengths=(0.8,)),
                             editable=nothing)
    np.testing.assert_array_equal(result[0].image, image)
    corner = nothing.copy()
    corner[:4, :4, :4] = True
    changed = counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, CounterfactualSettings(strengths=(0.8,)),
                              editable=corner)[0].image
    difference = np.abs(changed - image)
    near, far = difference[:4, :4, :4].max(), difference[10:, 10:, 10:].max()
    assert near > 1e-3
    assert far < near / 10  # only the decoder's volume-wide normalisation reaches this far


def test_patched_noising_is_deterministic_and_seeded(models) -> None:
    vqgan, unet, _ = models
    image = _images(1)[0]
    first, again, other = (counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, CounterfactualSettings(seed=seed))[0].image
                           for seed in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.65, 0.8, 1.0])
def test_chains_start_at_the_strength_and_run_the_asked_steps(steps: int, strength: float) -> None:
    from bids_app.pipelines.counterfactual import strength_timesteps

    timesteps = strength_timesteps(1000, strength, steps)
    assert timesteps[0] == round(strength * 1000) - 1
    # as many as asked while the range has room for them (0.05 of 1000: 50 timesteps, 49 above 0)
    assert len(timesteps) == steps if steps < timesteps[0] else len(timesteps) <= steps
    assert timesteps == sorted(set(timesteps), reverse=True) and timesteps[-1] >= 0


def test_one_step_strengths_differ() -> None:
    """With the respaced grid, one step at 0.5, 0.65 and 0.8 all started at t = 499."""
    from bids_app.pipelines.counterfactual import strength_timesteps

    assert [strength_timesteps(1000, s, 1) for s in (0.5, 0.65, 0.8, 1.0)] == [[499], [649], [799], [999]]
    assert strength_timesteps(1000, 0.0004, 3) == [] and strength_timesteps(1000, 0.0, 1) == []


def test_a_single_volume_runs_as_a_pair_on_cpu_and_gives_the_same_result() -> None:
    from bids_app.pipelines.counterfactual import avoid_single_batch

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


def test_reference_both_gives_the_transferred_image_and_the_raw_decoding(models) -> None:
    vqgan, unet, _ = models
    image = np.concatenate(_images(2), axis=2)  # three windows: the decodings are blended like the images
    settings = CounterfactualSettings(strengths=(0.0, 0.6), steps=2, seed=3)
    run = {ref: windowed_counterfactuals(vqgan, unet, SCHEDULE, 1.0, image, dataclasses.replace(settings, reference=ref),
                                         (16, 16, 16)) for ref in ("both", "reconstruction", "image")}
    for both, transferred, raw in zip(run["both"], run["reconstruction"], run["image"]):
        np.testing.assert_allclose(both.image, transferred.image, atol=1e-5)
        np.testing.assert_allclose(both.decoded, raw.image, atol=1e-5)
        assert transferred.decoded is None and raw.decoded is None
    np.testing.assert_array_equal(run["both"][0].image, image)  # strength 0: the input, and its reconstruction
    assert not np.allclose(run["both"][0].decoded, image, atol=1e-2)
