"""Each preprocessing op alone: forward/inverse round trips and the geometry its affine claims."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from bids_app.preprocessing.ops import (BACKGROUND, CropPad, Normalize, OpRecord, Reorient, Resample,
                                        Volume, intensity_range, resampled_grid, voxel_sizes, window_start)
from bids_app.preprocessing.trace import SourceGeometry, Trace

AXES = ("RL", "AP", "SI")  # (positive, negative) letter per world axis


def all_axcodes() -> list[str]:
    """All 48 axis codes: 6 permutations of the world axes times 8 flip combinations."""
    codes = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((0, 1), repeat=3):
            codes.append("".join(AXES[p][f] for p, f in zip(perm, flips)))
    return codes


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(degrees)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def ras_affine(spacing=(0.8, 0.9, 1.5), offset=(-12.0, 30.0, -70.0), rot: np.ndarray | None = None) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = (np.eye(3) if rot is None else rot) @ np.diag(spacing)
    aff[:3, 3] = offset
    return aff


def to_axcodes(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered array in another axis order (the way a scanner might)."""
    ornt = ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(codes)))
    return np.ascontiguousarray(apply_orientation(data, ornt)), affine @ inv_ornt_aff(ornt, data.shape)


def world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def index_volume(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------- reorient


@pytest.mark.parametrize("oblique", [False, True], ids=["aligned", "oblique"])
def test_reorient_all_48_orientations_exact(oblique: bool) -> None:
    shape = (5, 6, 7)
    base = ras_affine(rot=rotation([1, 2, 0.5], 12) if oblique else None)
    seen = 0
    for codes in all_axcodes():
        data, affine = to_axcodes(index_volume(shape), base, codes)
        mask = (data % 3 == 0).astype(np.uint8)
        out, record = Reorient().forward(Volume.from_arrays(data, affine, {"cord": mask}))
        assert out.image.shape == shape
        # Every model voxel must sit at the same world point as the source voxel it came from.
        src_idx = np.argwhere(np.ones(data.shape, bool))
        src_of = {int(v): i for v, i in zip(data[tuple(src_idx.T)], src_idx)}
        model_idx = np.argwhere(np.ones(shape, bool))
        back = np.array([src_of[int(v)] for v in out.image[tuple(model_idx.T)]])
        np.testing.assert_allclose(world(out.affine, model_idx), world(affine, back), atol=1e-9)
        np.testing.assert_allclose(out.affine, base, atol=1e-9)  # closest canonical of base is base
        restored = Reorient.inverse(out.image, json.loads(json.dumps(record.params)), "image")
        assert np.array_equal(restored, data)
        assert np.array_equal(Reorient.inverse(out.masks["cord"], record.params, "mask"), mask)
        seen += 1
    assert seen == 48


# ---------------------------------------------------------------- resample


def linear_field(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """f(world) = a . x + b on a grid: linear interpolation must reproduce it exactly."""
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    return (world(affine, idx) @ np.array([0.7, -1.3, 0.4]) + 5.0).reshape(shape)


@pytest.mark.parametrize("spacing", [(0.5, 1.3, 2.0), (1.0, 1.0, 1.0), (2.2, 0.4, 0.9)])
@pytest.mark.parametrize("oblique", [False, True], ids=["aligned", "oblique"])
def test_resample_affine_describes_the_new_grid(spacing, oblique) -> None:
    shape = (14, 11, 9)
    affine = ras_affine(rot=rotation([0.3, 1, 1], 9) if oblique else None)
    vol = Volume.from_arrays(linear_field(affine, shape), affine)
    out, record = Resample(spacing, image_order=1).forward(vol)
    np.testing.assert_allclose(voxel_sizes(out.affine), spacing, rtol=1e-9)
    # Field of view centred: both grids share their centre in world mm.
    old_centre = world(affine, (np.array(shape) - 1) / 2.0)
    new_centre = world(out.affine, (np.array(out.image.shape) - 1) / 2.0)
    np.testing.assert_allclose(new_centre, old_centre, atol=1e-9)
    # Values at interior voxels equal the field evaluated where the new affine says they are.
    idx = np.indices(out.image.shape).reshape(3, -1).T.astype(float)
    old = idx * np.asarray(record.params["scale"]) + np.asarray(record.params["offset"])
    inside = np.all((old >= 0) & (old <= np.array(shape) - 1), axis=1)
    expected = world(out.affine, idx[inside]) @ np.array([0.7, -1.3, 0.4]) + 5.0
    np.testing.assert_allclose(out.image.reshape(-1)[inside], expected, atol=1e-4)
    # The inverse samples the new grid where the old voxels are: exact again between new voxels
    # that were themselves interior samples (the outermost ones are edge extensions).
    back = Resample.inverse(out.image, record.params, "image")
    old_idx = np.indices(shape).reshape(3, -1).T.astype(float)
    new_pos = (old_idx - np.asarray(record.params["offset"])) / np.asarray(record.params["scale"])
    ok = idx[inside]
    inside = np.all((new_pos >= ok.min(axis=0)) & (new_pos <= ok.max(axis=0)), axis=1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(back.reshape(-1)[inside], vol.image.reshape(-1)[inside], atol=1e-4)


def test_resampled_grid_matches_left_edge_formula_when_fov_divides() -> None:
    shape, scale, offset = resampled_grid((40, 30, 12), np.array([0.5, 1.0, 3.0]), (1.0, 0.5, 1.5))
    assert shape == (20, 60, 24)
    j = np.arange(5.0)
    for axis in range(3):  # new index j -> old index (j + 0.5) * t / z - 0.5
        np.testing.assert_allclose(scale[axis] * j + offset[axis], (j + 0.5) * scale[axis] - 0.5)


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0, mode="reflect")
    return (100.0 + 40.0 * field / field.std()).astype(np.float32)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("spacing", [(0.6, 0.6, 0.6), (1.2, 1.1, 1.6)], ids=["up", "down"])
def test_resample_round_trip_smooth_image(order: int, spacing) -> None:
    shape = (30, 28, 26)
    image = smooth_image(shape)
    out, record = Resample(spacing, image_order=order).forward(Volume.from_arrays(image, ras_affine((0.9, 0.8, 1.0))))
    back = Resample.inverse(out.image, record.params, "image")
    assert back.shape == shape and back.dtype == np.float32
    err = np.abs(back - image)[3:-3, 3:-3, 3:-3].mean() / np.ptp(image)
    assert err < 0.01, f"mean abs round-trip error {err:.4f} of the range"


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("spacing", [(0.45, 0.7, 0.55), (1.7, 1.3, 2.1)], ids=["up", "down"])
def test_resampled_masks_stay_binary(mode: str, spacing) -> None:
    shape = (20, 18, 16)
    blob = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal(shape), 2.0) > 0.05
    vol = Volume.from_arrays(np.zeros(shape), ras_affine(), {"cord": blob})
    out, record = Resample(spacing, mask_interpolation=mode).forward(vol)
    assert out.masks["cord"].dtype == np.uint8
    assert set(np.unique(out.masks["cord"])) <= {0, 1} and out.masks["cord"].any()
    assert out.valid.dtype == bool and out.valid.all()


# ---------------------------------------------------------------- normalise


def test_normalize_round_trip_exact_and_clipped() -> None:
    image = smooth_image((16, 16, 16), seed=3)
    vol = Volume.from_arrays(image, np.eye(4))
    out, record = Normalize((0.0, 100.0)).forward(vol)
    assert out.image.min() == pytest.approx(-1.0) and out.image.max() == pytest.approx(1.0)
    back = Normalize.inverse(out.image, record.params, "image")
    np.testing.assert_allclose(back, image, rtol=0, atol=1e-5 * np.ptp(image))
    # Default percentiles clip the tails; inside the range the inverse is still exact.
    out, record = Normalize((0.5, 99.5)).forward(vol)
    low, high = record.params["low"], record.params["high"]
    assert out.image.min() == -1.0 and out.image.max() == 1.0
    back = Normalize.inverse(out.image, record.params, "image")
    np.testing.assert_allclose(back, np.clip(image, low, high), rtol=0, atol=1e-5 * (high - low))
    assert Normalize.inverse(out.image, record.params, "probability") is out.image


def test_normalize_ignores_padded_voxels_and_sets_them_to_background() -> None:
    image = smooth_image((12, 12, 12))
    valid = np.zeros(image.shape, bool)
    valid[2:10, 2:10, 2:10] = True
    padded = np.where(valid, image, 1e6).astype(np.float32)
    vol = Volume(image=padded, masks={}, affine=np.eye(4), valid=valid)
    out, record = Normalize((0.0, 100.0)).forward(vol)
    assert record.params["high"] == pytest.approx(float(image[valid].max()))
    assert np.all(out.image[~valid] == BACKGROUND)


@pytest.mark.parametrize("value", [0.0, 250.0])
def test_normalize_flat_image_does_not_divide_by_zero(value: float) -> None:
    image = np.full((8, 8, 8), value, np.float32)
    out, record = Normalize().forward(Volume.from_arrays(image, np.eye(4)))
    assert record.params["flat"] is True
    assert np.all(np.isfinite(out.image)) and np.all(out.image == -1.0)
    np.testing.assert_allclose(Normalize.inverse(out.image, record.params, "image"), image)


def test_intensity_range_falls_back_to_min_max_for_mostly_constant_images() -> None:
    values = np.zeros(10000)
    values[:5] = 7.0  # fewer than 0.5 % non-zero: both percentiles are 0
    assert intensity_range(values, (0.5, 99.5)) == (0.0, 7.0, False)


# ---------------------------------------------------------------- crop / pad


@pytest.mark.parametrize("n, t, centre, expected", [
    (40, 20, 19.5, 10),  # centred
    (40, 20, 20.0, 11),  # half up
    (40, 20, 2.0, 0),  # pushed back inside the image
    (40, 20, 38.0, 20),
    (10, 16, 4.5, -3),  # pad evenly
    (10, 16, 0.0, -6),  # the pad case never cuts the image, even for an edge cord
])
def test_window_start(n, t, centre, expected) -> None:
    assert window_start(n, t, centre) == expected


def test_window_contains_every_bbox_that_fits() -> None:
    for n, t in ((40, 9), (40, 10), (12, 16), (11, 16)):
        for b0 in range(n):
            for b1 in range(b0, min(n, b0 + t)):
                start = window_start(n, t, (b0 + b1) / 2.0)
                assert start <= b0 and b1 <= start + t - 1, (n, t, b0, b1, start)


def test_crop_pad_pad_case_round_trip_and_valid() -> None:
    shape, target = (10, 13, 7), (16, 16, 12)
    image = smooth_image(shape)
    affine = ras_affine()
    out, record = CropPad(target).forward(Volume.from_arrays(image, affine, {"cord": image > 100}))
    start = np.array(record.params["start"])
    assert out.image.shape == target and np.all(start <= 0)
    assert out.valid.sum() == image.size and np.all(out.image[~out.valid] == BACKGROUND)
    assert np.all(out.masks["cord"][~out.valid] == 0)
    np.testing.assert_allclose(out.affine[:3, 3], world(affine, start), atol=1e-12)
    assert np.array_equal(CropPad.inverse(out.image, record.params, "image"), image)
    assert np.array_equal(CropPad.inverse(out.masks["cord"], record.params, "mask"), (image > 100).astype(np.float32))


def test_crop_pad_crop_case_keeps_the_cord_and_stays_inside() -> None:
    shape, target = (40, 36, 30), (16, 16, 16)
    image = smooth_image(shape)
    cord = np.zeros(shape, np.uint8)
    cord[20:26, 4:10, 20:29] = 1  # off-centre; near the edge along y and z
    out, record = CropPad(target).forward(Volume.from_arrays(image, ras_affine(), {"cord": cord}))
    start = np.array(record.params["start"])
    # x centred on the cord (22.5 - 7.5, half up), y and z pushed back inside the image.
    assert start.tolist() == [15, 0, 14]
    assert out.valid.all() and record.params["centred_on"] == "cord" and not record.params["cord_cut"]
    assert out.masks["cord"].sum() == cord.sum()
    back = CropPad.inverse(out.image, record.params, "image")
    window = tuple(slice(s, s + t) for s, t in zip(start, target))
    assert np.array_equal(back[window], image[window])
    outside = np.ones(shape, bool)
    outside[window] = False
    assert np.all(back[outside] == BACKGROUND)
    assert np.all(CropPad.inverse(out.image, record.params, "probability")[outside] == 0)


def test_crop_pad_flags_a_cord_larger_than_the_window() -> None:
    cord = np.zeros((30, 30, 30), np.uint8)
    cord[5:25, 10:15, 10:15] = 1
    out, record = CropPad((12, 12, 12)).forward(Volume.from_arrays(np.zeros(cord.shape), np.eye(4), {"cord": cord}))
    assert record.params["cord_cut"] is True


def test_crop_pad_cover_keeps_the_whole_cord_and_inverts_exactly() -> None:
    shape = (30, 30, 60)
    image = smooth_image(shape)
    cord = np.zeros(shape, np.uint8)
    cord[12:18, 10:15, 3:57] = 1  # a cord far longer than the 16-voxel window along S
    plain, _ = CropPad((16, 16, 16)).forward(Volume.from_arrays(image, ras_affine(), {"cord": cord}))
    out, record = CropPad((16, 16, 16), cover=True).forward(Volume.from_arrays(image, ras_affine(), {"cord": cord}))
    assert plain.masks["cord"].sum() < cord.sum()
    assert out.image.shape == (16, 16, 54) and out.masks["cord"].sum() == cord.sum()
    assert not record.params["cord_cut"]
    back = CropPad.inverse(out.image, record.params, "image")
    window = tuple(slice(s, s + t) for s, t in zip(record.params["start"], out.image.shape))
    assert np.array_equal(back[window], image[window])


def test_crop_pad_cover_without_mask_covers_the_image() -> None:
    image = smooth_image((20, 10, 40))
    out, record = CropPad((16, 16, 16), centre_mask=None, cover=True).forward(Volume.from_arrays(image, np.eye(4), {}))
    assert out.image.shape == (20, 16, 40) and out.valid.sum() == image.size


# ---------------------------------------------------------------- trace


def test_trace_json_round_trip_and_checks() -> None:
    shape = (12, 10, 14)
    data, affine = to_axcodes(smooth_image(shape), ras_affine(), "PSR")
    geom = SourceGeometry(path="/x/img.nii.gz", shape=data.shape, spatial_shape=data.shape, affine=affine,
                          qform=affine, qform_code=1, sform=affine, sform_code=1, zooms=(1.0, 1.0, 1.0),
                          dtype="int16", xyzt_units=("mm", "sec"))
    trace = Trace(geom)
    vol = Volume.from_arrays(data, affine)
    for op in (Reorient(), Resample((1.1, 0.7, 1.3), 3), Normalize(), CropPad((16, 16, 16))):
        vol, record = op.forward(vol)
        trace.push(record)
    restored = Trace.from_dict(json.loads(json.dumps(trace.to_dict())))
    assert restored.model_shape == (16, 16, 16)
    for kind in ("image", "probability", "mask"):
        assert np.array_equal(restored.inverse(vol.image, kind), trace.inverse(vol.image, kind))
    assert trace.inverse(vol.image, "mask").dtype == np.uint8
    with pytest.raises(ValueError, match="kind"):
        trace.inverse(vol.image, "label")
    with pytest.raises(ValueError, match="model shape"):
        trace.inverse(vol.image[:-1], "image")
    with pytest.raises(ValueError, match="unknown preprocessing op"):
        Trace(geom, [OpRecord("warp", {})]).inverse(data, "image")
