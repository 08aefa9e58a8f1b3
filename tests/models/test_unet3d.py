"""The 3D latent UNet: shapes, time and adapter conditioning, attention path, config, a training step."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bids_app.models.unet3d import UNET_PRESETS, UNet3D, UNet3DConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core runner the thread
    pool's contention made these tests several times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(in_channels: int = 2, **overrides) -> UNet3DConfig:
    """Narrower than the tiny preset: the tests are about wiring, not capacity."""
    values = dict(base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
                  zero_init_output=False)
    return UNet3DConfig(in_channels=in_channels, **{**values, **overrides})


def make(config: UNet3DConfig, seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(config).eval()


CASES = {
    "tiny-4x8x8x16": (UNet3DConfig.tiny(4, zero_init_output=False), (2, 4, 8, 8, 16)),
    "out-channels": (small(3, out_channels=5), (1, 3, 4, 6, 8)),
    "thin-axis": (small(downsample=(1, 2, 2)), (1, 2, 3, 4, 8)),
    "per-level": (small(channel_mults=(1, 2, 2), attention_levels=(False, False, True),
                        downsample=((1, 2, 2), (2, 2, 2))), (1, 2, 2, 8, 4)),
    "two-res-blocks": (small(n_res_blocks=2, dropout=0.1), (1, 2, 4, 4, 4)),
    "one-level": (small(channel_mults=(1,), attention_levels=(True,)), (1, 2, 3, 5, 7)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape(name: str) -> None:
    config, shape = CASES[name]
    net = make(config)
    x = torch.randn(shape)
    with torch.no_grad():
        out = net(x, torch.arange(shape[0]) * 100)
    assert out.shape == (shape[0], config.out_channels, *shape[2:])
    assert torch.isfinite(out).all()


def test_zero_initialised_output_starts_at_zero() -> None:
    net = make(small(zero_init_output=True))
    assert torch.equal(net(torch.randn(1, 2, 4, 4, 4), 5), torch.zeros(1, 2, 4, 4, 4))


def test_time_conditioning() -> None:
    net = make(small())
    x = torch.randn(2, 2, 4, 4, 4)
    with torch.no_grad():
        early, late = net(x, torch.tensor([1, 1])), net(x, torch.tensor([900, 900]))
        assert not torch.allclose(early, late, atol=1e-4)
        torch.testing.assert_close(net(x, 900), late)  # a scalar t is broadcast
        torch.testing.assert_close(net(x, torch.tensor([900.0, 900.0])), late)  # float t as long t
        mixed = net(x, torch.tensor([1, 900]))
    torch.testing.assert_close(mixed[:1], early[:1])
    torch.testing.assert_close(mixed[1:], late[1:])


def test_encoder_feature_shapes() -> None:
    config = small(channel_mults=(1, 2, 4), attention_levels=(False, False, True), downsample=((1, 2, 2), (2, 2, 2)))
    assert config.encoder_feature_shapes((2, 4, 16, 8)) == [(8, (4, 16, 8)), (16, (4, 8, 4)), (32, (2, 4, 2))]
    assert config.total_downsample == (2, 4, 4)
    assert UNet3D(config).encoder_feature_shapes((1, 2, 4, 16, 8)) == config.encoder_feature_shapes((4, 16, 8))


def test_adapter_features_condition_the_encoder() -> None:
    net = make(small(channel_mults=(1, 2, 2), attention_levels=(False, False, True)))
    x = torch.randn(2, 2, 4, 8, 8)
    shapes = net.encoder_feature_shapes(x.shape)
    zeros = [torch.zeros(2, c, *s) for c, s in shapes]
    with torch.no_grad():
        plain = net(x, 50)
        assert torch.equal(net(x, 50, zeros), plain)
        for level in range(len(shapes)):
            features = [None] * len(shapes)
            features[level] = torch.randn(2, *(shapes[level][0],), *shapes[level][1])
            assert not torch.allclose(net(x, 50, features), plain, atol=1e-4), f"level {level} has no effect"


@pytest.mark.parametrize("features, message", [
    (lambda shapes: [torch.zeros(2, c, *s) for c, s in shapes[:-1]], "one tensor per encoder level"),
    (lambda shapes: [torch.zeros(2, c + 1, *s) for c, s in shapes], "adapter feature 0"),
    (lambda shapes: [torch.zeros(2, c, *s) for c, s in shapes[:1]] + [torch.zeros(2, shapes[1][0], 4, 4, 4)],
     "adapter feature 1"),
    (lambda shapes: [torch.zeros(1, c, *s) for c, s in shapes], "adapter feature 0"),
])
def test_adapter_features_of_wrong_shape_are_refused(features, message: str) -> None:
    net = make(small())
    x = torch.randn(2, 2, 4, 8, 8)
    with pytest.raises(ValueError, match=message):
        net(x, 3, features(net.encoder_feature_shapes(x.shape)))


@pytest.mark.parametrize("shape, t, message", [
    ((1, 2, 5, 8, 8), 3, "divisible by \\(2, 2, 2\\)"),
    ((1, 2, 4, 8), 3, "expects"),
    ((1, 3, 4, 8, 8), 3, "expects"),
    ((2, 2, 4, 8, 8), torch.tensor([1, 2, 3]), "t must"),
])
def test_bad_inputs_are_refused(shape, t, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(small())(torch.randn(shape), t)


def test_thin_axis_downsampling_divisibility_is_per_axis() -> None:
    net = make(small(downsample=(1, 2, 2)))
    net(torch.randn(1, 2, 3, 4, 4), 1)
    with pytest.raises(ValueError, match="divisible by \\(1, 2, 2\\)"):
        net(torch.randn(1, 2, 4, 3, 4), 1)


@pytest.mark.parametrize("config, expected", [
    (small(), 1 + 1 + 2),  # coarse level: 1 encoder block, mid block, 2 decoder blocks
    (small(n_res_blocks=2, attention_levels=(True, True)), 2 * (2 + 3) + 1),
    (small(attention_levels=(False, False)), 0),
])
def test_attention_uses_scaled_dot_product_attention(monkeypatch, config: UNet3DConfig, expected: int) -> None:
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        make(config)(torch.randn(1, 2, 4, 4, 4), 7)
    assert len(calls) == expected
    assert all(shape[1] == config.num_heads for shape in calls)


def test_attention_equals_the_hand_written_reshapes() -> None:
    """The einops patterns are the reshape/transpose chain they replaced, bit for bit (forward and backward)."""
    from bids_app.models.unet3d import SelfAttention3D

    torch.manual_seed(0)
    attention = SelfAttention3D(16, num_heads=4, groups=4)
    x = torch.randn(2, 16, 3, 4, 5, requires_grad=True)

    def reshapes(x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        qkv = attention.qkv(attention.norm(x)).reshape(b, 3, 4, c // 4, d * h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, d, h, w)
        return x + attention.proj(out)

    got, expected = attention(x), reshapes(x)
    assert torch.equal(got, expected)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    assert torch.equal(grad_got, grad_expected)


def test_a_few_gradient_steps_reduce_the_loss() -> None:
    net = make(small()).train()
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, 2, 4, 4, 4, generator=g), torch.randn(2, 2, 4, 4, 4, generator=g)
    t = torch.tensor([3, 600])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(net(x, t), target)
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert losses[-1] < losses[0]


# -- config ------------------------------------------------------------------------------------
def test_config_round_trips_through_json() -> None:
    config = small(channel_mults=(1, 2, 4), attention_levels=(False, True, True), downsample=((1, 2, 2), (2, 2, 2)),
                   out_channels=3, dropout=0.1)
    restored = UNet3DConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert UNet3D(restored).state_dict().keys() == UNet3D(config).state_dict().keys()


def test_config_defaults_and_normalisation() -> None:
    config = UNet3DConfig(in_channels=4)
    assert config.out_channels == 4 and config.time_embed_dim == 128
    assert config.downsample == ((2, 2, 2), (2, 2, 2))
    assert config == UNet3DConfig(in_channels=4, downsample=[[2, 2, 2], [2, 2, 2]])
    assert UNet3DConfig(in_channels=4, base_channels=48).encoder_channels == (48, 96, 192)  # width is free


def test_config_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="heads.*latent_size|latent_size.*heads"):
        UNet3DConfig.from_dict({"in_channels": 4, "heads": 4, "latent_size": 16})


@pytest.mark.parametrize("values, message", [
    ({"attention_levels": (False, True)}, "one flag per level"),
    ({"num_heads": 3}, "num_heads"),
    ({"downsample": ((2, 2, 2),)}, "one per level transition"),
    ({"downsample": (2, 0, 2)}, "positive"),
    ({"channel_mults": ()}, "channel_mults"),
    ({"dropout": 1.0}, "dropout"),
])
def test_config_rejects_bad_values(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet3DConfig(in_channels=4, **values)


def test_presets() -> None:
    tiny, default = UNET_PRESETS["tiny"](4), UNET_PRESETS["default"](8)
    assert tiny.base_channels == 16 and tiny.channel_mults == (1, 2) and tiny.attention_levels == (False, True)
    assert default.in_channels == 8 and default.base_channels == 64
    assert UNET_PRESETS["tiny"](4, num_heads=4).num_heads == 4
    assert sum(p.numel() for p in UNet3D(tiny).parameters()) < 1_000_000
