"""T2I-Adapter: shapes follow the UNet, an untrained adapter changes nothing, a trained one does."""
from __future__ import annotations

import pytest
import torch

from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.models.unet3d import UNet3D, UNet3DConfig


@pytest.fixture()
def unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(UNet3DConfig.tiny(4, zero_init_output=False)).eval()


def test_features_match_the_unet_encoder(unet: UNet3D) -> None:
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (4, 4, 4)))
    features = adapter(torch.ones(2, 1, 32, 32, 32))
    expected = unet.config.encoder_feature_shapes((8, 8, 8))
    assert [(f.shape[1], tuple(f.shape[2:])) for f in features] == expected


def test_untrained_adapter_leaves_the_unet_output_unchanged(unet: UNet3D) -> None:
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (4, 4, 4)))
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    control = (torch.rand(1, 1, 32, 32, 32) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(unet(x, t), unet(x, t, adapter(control)))


def test_a_trained_adapter_steers_and_scale_zero_switches_it_off(unet: UNet3D) -> None:
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (4, 4, 4)))
    for conv in adapter.outputs:
        torch.nn.init.normal_(conv.weight, std=0.1)
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500])
    control = torch.zeros(1, 1, 32, 32, 32)
    control[..., 10:20, 10:20, :] = 1
    with torch.no_grad():
        assert not torch.allclose(unet(x, t), unet(x, t, adapter(control)))
        assert torch.equal(unet(x, t), unet(x, t, adapter(control, scale=0.0)))


def test_gradients_reach_only_the_adapter(unet: UNet3D) -> None:
    adapter = T2IAdapter(AdapterConfig.for_models(unet.config, (4, 4, 4)))
    unet.requires_grad_(False)
    out = unet(torch.randn(1, 4, 8, 8, 8), torch.tensor([10]), adapter(torch.ones(1, 1, 32, 32, 32)))
    out.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.outputs.parameters())


def test_config_round_trip() -> None:
    config = AdapterConfig.for_models(UNet3DConfig.tiny(4), (2, 2, 2))
    assert AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        AdapterConfig.from_dict({"colour": 1})
