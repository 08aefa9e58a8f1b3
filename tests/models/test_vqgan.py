"""3D VQ-GAN: config round trip, shapes per downsampling config, input checks, overfitting a phantom."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bids_app.models.vqgan import PRESETS, VQGAN, VQGANConfig, default_config, tiny_config

#: Mean L1 (data in [-1, 1]) after OVERFIT_STEPS Adam steps on one phantom, eval mode. Measured ~0.010-0.012
#: over seeds 0-2 at 150 steps; predicting the mean gives ~0.32.
OVERFIT_STEPS = 120
OVERFIT_L1_BOUND = 0.04


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**overrides) -> VQGAN:  # noqa: ANN003
    torch.manual_seed(0)
    values = {**tiny_config().to_dict(), **overrides}
    return VQGAN(VQGANConfig.from_dict(values))


def test_config_round_trips_through_json_and_rejects_unknown_keys() -> None:
    config = VQGANConfig(downsample=(2, 2, 4), n_codes=32)
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="n_code, zz"):
        VQGANConfig.from_dict({"n_code": 3, "zz": 1})
    with pytest.raises(ValueError, match="powers of 2"):
        VQGANConfig(downsample=(3, 4, 4))
    with pytest.raises(ValueError, match="decoder_norm"):
        VQGANConfig(decoder_norm="batch")


def test_presets() -> None:
    assert set(PRESETS) == {"tiny", "default"}
    assert tiny_config().n_hiddens == 8 and tiny_config().n_codes == 64 and tiny_config().embedding_dim == 4
    assert default_config().downsample == (4, 4, 4) and default_config().embedding_dim == 8
    assert VQGANConfig(downsample=(2, 2, 4)).stage_strides() == [(2, 2, 2), (1, 1, 2)]


@pytest.mark.parametrize("downsample", [(4, 4, 4), (2, 2, 4), (1, 2, 8), (2, 2, 2)])
def test_shapes(downsample: tuple[int, int, int]) -> None:
    model = tiny(downsample=downsample)
    x = torch.rand(2, 1, 16, 16, 32) * 2 - 1
    out = model(x, torch.Generator().manual_seed(0))
    latent = tuple(s // f for s, f in zip((16, 16, 32), downsample))
    assert out.reconstruction.shape == x.shape
    assert out.quantized.shape == (2, 4, *latent)
    assert out.codes.shape == (2, *latent) and out.codes.dtype == torch.long
    assert model.encode(x).shape == (2, 4, *latent)
    assert out.commitment_loss.ndim == 0 and out.perplexity.ndim == 0 and out.dead_codes.ndim == 0
    assert 1.0 <= float(out.perplexity) <= 64.0


@pytest.mark.parametrize("shape", [(17, 16, 32), (16, 16, 30), (2, 16, 16)])
def test_non_divisible_input_is_rejected(shape: tuple[int, int, int]) -> None:
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by the downsampling factors"):
        model.encode(torch.zeros(1, 1, *shape))


def test_decode_codes_matches_quantized_decode_in_eval() -> None:
    model = tiny().eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(model.decode_codes(out.codes), out.reconstruction, atol=1e-5)
        assert torch.allclose(model.decode(model.quantize(model.encode(x)).quantized), out.reconstruction, atol=1e-5)


def test_gradient_reaches_encoder_through_quantiser() -> None:
    model = tiny()
    out = model(torch.rand(1, 1, 16, 16, 16) * 2 - 1, torch.Generator().manual_seed(0))
    out.reconstruction.abs().mean().backward()  # reconstruction only: no commitment term
    assert model.encoder.conv_in.weight.grad is not None
    assert float(model.encoder.conv_in.weight.grad.abs().sum()) > 0


def test_state_dict_round_trip_keeps_codebook() -> None:
    model = tiny()
    model(torch.rand(1, 1, 16, 16, 16), torch.Generator().manual_seed(0))
    clone = VQGAN(model.config)
    clone.load_state_dict(model.state_dict())
    assert bool(clone.quantizer.initialised)
    assert torch.equal(clone.quantizer.embedding, model.quantizer.embedding)


def tube_phantom() -> torch.Tensor:
    """A smooth 16x16x32 volume in [-1, 1]: a bright, gently curving tube on a graded background."""
    x, y, z = torch.meshgrid(
        torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 32), indexing="ij"
    )
    radius = torch.sqrt((x - 0.3 * torch.sin(math.pi * z)) ** 2 + y**2)
    volume = -0.8 + 0.2 * z + 1.5 * torch.sigmoid((0.45 - radius) / 0.08)
    return volume.clamp(-1, 1)[None, None]


def test_overfits_a_fixed_phantom() -> None:
    volume = tube_phantom()
    model = tiny()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=5e-3, total_steps=OVERFIT_STEPS, pct_start=0.2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(OVERFIT_STEPS):
        out = model(volume, generator)
        loss = (out.reconstruction - volume).abs().mean() + out.commitment_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        l1 = float((model(volume).reconstruction - volume).abs().mean())
    baseline = float((volume - volume.mean()).abs().mean())
    assert l1 < OVERFIT_L1_BOUND < baseline / 5, (l1, baseline)


def test_voxel_norm_gradient_is_that_of_its_formula() -> None:
    """The hand-written backward (it keeps less memory) against gradcheck and against autograd of the formula."""
    from bids_app.models.vqgan import VoxelNorm, _VoxelNormFunction

    torch.manual_seed(0)
    norm = VoxelNorm(5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = (p.detach().double().requires_grad_() for p in (norm.weight, norm.bias))
    assert torch.autograd.gradcheck(lambda *a: _VoxelNormFunction.apply(*a, 1e-6), (x, weight, bias))

    def formula(h: torch.Tensor) -> torch.Tensor:
        mean = h.mean(dim=1, keepdim=True)
        h = (h - mean) * torch.rsqrt((h - mean).pow(2).mean(dim=1, keepdim=True) + norm.eps)
        return h * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)

    x = torch.randn(2, 5, 3, 4, 2, requires_grad=True)
    upstream = torch.randn(2, 5, 3, 4, 2)
    grads = torch.autograd.grad((norm(x) * upstream).sum(), (x, norm.weight, norm.bias))
    expected = torch.autograd.grad((formula(x) * upstream).sum(), (x, norm.weight, norm.bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        assert torch.equal(norm(x), formula(x))


def _training_pass(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one reconstruction + commitment loss, and the peak bytes of the tensors it created."""
    from tests.memory import LiveTensorBytes

    model = tiny(downsample=(2, 2, 2), n_res_blocks=2).set_activation_checkpointing(checkpointing)
    x = torch.rand(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    memory = LiveTensorBytes()
    with memory:
        out = model(x, torch.Generator().manual_seed(0))
        ((out.reconstruction - x).abs().mean() + out.commitment_loss).backward()
    return {name: p.grad for name, p in model.named_parameters()}, memory.peak


def test_activation_checkpointing_keeps_the_gradients_and_cuts_the_memory() -> None:
    plain, plain_peak = _training_pass(False)
    checkpointed, checkpointed_peak = _training_pass(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    assert checkpointed_peak < 0.5 * plain_peak, (checkpointed_peak, plain_peak)


def test_activation_checkpointing_is_off_without_gradients() -> None:
    """Inference (no grad) takes the plain path: nothing to recompute, same result."""
    model = tiny().set_activation_checkpointing(True).eval()
    latent = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        on = model.decode(latent)
        off = model.set_activation_checkpointing(False).decode(latent)
    assert torch.equal(on, off)
