"""Tiled decoding: plans cover every output voxel once (weights sum to 1); tiled == whole decoding."""
from __future__ import annotations

import pytest
import torch

from bids_app.models.tiling import choose_tile_counts, decode_with_tiles, plan_tiles, split_axis
from bids_app.models.vqgan import VQGAN, VQGANConfig

#: Tiled vs whole decoding, local (voxel-norm) decoder, float32: max |diff| / max |whole|.
EXACT_TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def weight_sum(plan, out_shape) -> torch.Tensor:  # noqa: ANN001
    total = torch.zeros(out_shape, dtype=torch.float64)
    for tile in plan:
        total[tile.output] += tile.weight(torch.float64)
    return total


@pytest.mark.parametrize(
    "n,count,overlap,halo,factor", [(16, 1, 2, 3, 4), (16, 3, 2, 0, 2), (7, 7, 2, 1, 1), (10, 4, 3, 2, 2)]
)
def test_split_axis_partitions_unity(n: int, count: int, overlap: int, halo: int, factor: int) -> None:
    tiles = split_axis(n, count, overlap, halo, factor)
    assert len(tiles) == count
    total = torch.zeros(n * factor, dtype=torch.float64)
    for t in tiles:
        assert 0 <= t.decode[0] <= t.keep[0] < t.keep[1] <= t.decode[1] <= n
        assert t.keep[0] - t.decode[0] >= halo or t.decode[0] == 0  # the halo at least, unless at the border
        assert t.decode[1] - t.keep[1] >= halo or t.decode[1] == n
        assert t.decode[1] - t.decode[0] == tiles[0].decode[1] - tiles[0].decode[0]  # one extent: one shape
        total[t.keep[0] * factor : t.keep[1] * factor] += t.weight
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)
    assert tiles[0].keep[0] == 0 and tiles[-1].keep[1] == n


def test_split_axis_rejects_more_tiles_than_voxels() -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_axis(4, 5)


@pytest.mark.parametrize("tiles", [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 2, 2), (3, 2, 5)])
@pytest.mark.parametrize("latent_shape", [(6, 5, 11), (8, 8, 8)])
def test_plan_covers_every_output_voxel_with_weights_summing_to_one(tiles, latent_shape) -> None:  # noqa: ANN001
    factors = (2, 4, 1)
    plan = plan_tiles(latent_shape, tiles=tiles, overlap=2, halo=(1, 2, 3), factors=factors)
    assert len(plan) == tiles[0] * tiles[1] * tiles[2]
    out_shape = tuple(n * f for n, f in zip(latent_shape, factors))
    total = weight_sum(plan, out_shape)
    assert float((total - 1.0).abs().max()) < 1e-12


def test_tile_counts_from_budget() -> None:
    counts = choose_tile_counts((8, 32, 32), max_latent_voxels=8 * 32 * 32 // 3, overlap=2, halo=0)
    plan = plan_tiles((8, 32, 32), max_latent_voxels=8 * 32 * 32 // 3, overlap=2)
    assert len(plan) == counts[0] * counts[1] * counts[2] > 1
    for tile in plan:
        assert (tile.latent[0].stop - tile.latent[0].start) * (tile.latent[1].stop - tile.latent[1].start) * (
            tile.latent[2].stop - tile.latent[2].start
        ) <= 8 * 32 * 32 // 3
    assert choose_tile_counts((8, 32, 32), max_latent_voxels=10**9) == (1, 1, 1)
    with pytest.raises(ValueError, match="max_latent_voxels"):
        choose_tile_counts((8, 8, 8), max_latent_voxels=10, halo=4)


def test_blending_reproduces_a_pointwise_decoder_exactly() -> None:
    """A decoder that is pointwise (nearest upsampling) must come back exactly: blending adds nothing."""
    factors = (2, 1, 4)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return z.repeat_interleave(2, 2).repeat_interleave(1, 3).repeat_interleave(4, 4)[:, :1] * 3.0

    latent = torch.randn(2, 3, 5, 7, 6, dtype=torch.float64)
    plan = plan_tiles(latent.shape[2:], tiles=(2, 3, 4), overlap=2, factors=factors)
    assert torch.allclose(decode_with_tiles(decode, latent, plan, factors), decode(latent), atol=1e-12)


def small_model(decoder_norm: str = "voxel", downsample=(2, 2, 2), n_res_blocks: int = 1) -> VQGAN:  # noqa: ANN001
    torch.manual_seed(0)
    config = VQGANConfig(n_hiddens=4, downsample=downsample, embedding_dim=4, n_codes=16, norm_groups=2,
                         n_res_blocks=n_res_blocks, decoder_norm=decoder_norm)
    return VQGAN(config).eval()


@pytest.mark.parametrize(
    "tiles,spatial",
    [((1, 1, 1), (32, 24, 40)), ((1, 1, 2), (32, 24, 40)), ((1, 1, 3), (32, 24, 40)), ((2, 2, 2), (32, 24, 40)),
     ((3, 2, 3), (30, 22, 26))],  # latent (15, 11, 13): counts divide no axis
)
def test_tiled_decoding_equals_whole_decoding(tiles, spatial) -> None:  # noqa: ANN001
    model = small_model()
    latent = torch.randn(1, 4, *(s // 2 for s in spatial), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.decode(latent)
        tiled = model.decode_tiled(latent, tiles=tiles)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max() / whole.abs().max()) < EXACT_TOLERANCE


def test_tiled_decoding_needs_the_halo() -> None:
    """Without the receptive-radius halo, tile borders see zero padding and differ: the halo test can fail."""
    model = small_model()
    latent = torch.randn(1, 4, 16, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.decode(latent)
        plan = plan_tiles(latent.shape[2:], tiles=(1, 1, 3), overlap=2, halo=0, factors=(2, 2, 2))
        no_halo = decode_with_tiles(model.decoder, latent, plan, (2, 2, 2))
    assert float((no_halo - whole).abs().max() / whole.abs().max()) > 1e-3


def test_receptive_radius_bounds_the_decoder_dependence() -> None:
    """Perturb one latent voxel: outputs change exactly within the stated radius (so the halo is tight)."""
    model = small_model(downsample=(2, 2, 4), n_res_blocks=1)
    factors = model.config.downsample
    radius = model.decoder.receptive_radius()
    latent = torch.randn(1, 4, 24, 24, 16, generator=torch.Generator().manual_seed(2))
    bumped = latent.clone()
    centre = (12, 12, 8)
    bumped[(0, slice(None), *centre)] += 10.0
    with torch.no_grad():
        changed = (model.decode(bumped) - model.decode(latent)).abs()[0, 0] > 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = changed.any(dim=other[1]).any(dim=other[0]).nonzero().flatten() // factors[axis]
        reach = max(centre[axis] - int(hit.min()), int(hit.max()) - centre[axis])
        assert reach == radius[axis], (axis, reach, radius)


def test_group_norm_decoder_is_only_approximately_tiled() -> None:
    """GroupNorm statistics are per tile: documented as approximate; seams stay small thanks to the halo."""
    model = small_model(decoder_norm="group")
    latent = torch.randn(1, 4, 16, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model.decode(latent)
        tiled = model.decode_tiled(latent, tiles=(2, 1, 3))
    rel = float((tiled - whole).abs().max() / whole.abs().max())
    assert EXACT_TOLERANCE < rel < 0.5


def test_tiled_decoding_from_a_voxel_budget() -> None:
    model = small_model()
    latent = torch.randn(1, 4, 16, 12, 20, generator=torch.Generator().manual_seed(3))
    budget = 16 * 12 * 20 * 2 // 3  # the halo of 5 makes tiles big: needs a few tiles to fit
    plan = plan_tiles(latent.shape[2:], max_latent_voxels=budget, halo=model.decoder.receptive_radius())
    assert len(plan) > 1
    with torch.no_grad():
        whole = model.decode(latent)
        tiled = model.decode_tiled(latent, max_latent_voxels=budget)
    assert float((tiled - whole).abs().max() / whole.abs().max()) < EXACT_TOLERANCE


def test_tiled_decoding_memory_hardly_grows_with_the_volume() -> None:
    """Issue 10's target at test size: with a fixed tile budget, the peak tensor memory of decoding a latent
    of 4x the voxels stays within 1.5x of the smaller one's (1.28x; a full-size float64 weight sum, since
    removed, made it 1.60x)."""
    from tests.memory import LiveTensorBytes

    torch.manual_seed(0)
    config = VQGANConfig(n_hiddens=8, downsample=(2, 2, 2), embedding_dim=4, n_codes=16, norm_groups=2, n_res_blocks=0)
    model = VQGAN(config).eval()
    peaks = []
    for latent_shape in ((8, 16, 24), (8, 32, 48)):
        latent = torch.randn(1, 4, *latent_shape, generator=torch.Generator().manual_seed(4))
        memory = LiveTensorBytes()
        with torch.inference_mode(), memory:
            model.decode_tiled(latent, max_latent_voxels=1500)
        peaks.append(memory.peak)
    assert peaks[1] > 4 * 16 * 64 * 96  # the output itself is counted
    assert peaks[1] <= 1.5 * peaks[0], peaks


def test_a_plan_that_is_not_a_product_of_axis_tilings_is_refused() -> None:
    plan = plan_tiles((8, 8, 8), tiles=(2, 1, 1), factors=(1, 1, 1))
    with pytest.raises(ValueError, match="product"):
        decode_with_tiles(lambda z: z, torch.zeros(1, 1, 8, 8, 8), plan[:1] + plan, (1, 1, 1))
    with pytest.raises(ValueError, match="uncovered"):
        decode_with_tiles(lambda z: z, torch.zeros(1, 1, 8, 8, 8), plan[:1], (1, 1, 1))
