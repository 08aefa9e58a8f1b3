"""Training datasets: cache behaviour, split, and augmentation that never reaches inference."""
from __future__ import annotations

import builtins
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_app.data import (AugmentationSettings, Sample, TrainingVolumes, augment_volume, model_window,
                           split_participants, thick_slices)
from bids_app.preprocessing.pipeline import preprocess
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.synthetic import generate_dataset

PLAN = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.5), target_shape=(32, 32, 32))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("data") / "bids"
    ds = generate_dataset(root, n_healthy=3, n_lesion=0, seed=4, field_of_view=(24, 24, 40))
    out = []
    for image in ds.images:
        mask = ds.cord_masks[image]
        image = image if image.is_absolute() else root / image
        mask = mask if mask.is_absolute() else root / mask
        out.append(Sample(name=image.name, image=image, masks={"cord": mask}))
    return out


class OpenCounter:
    """Counts opens of NIfTI files through builtins.open (nibabel's gzip reader uses it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real_open = builtins.open

        def counting_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(file).endswith((".nii", ".nii.gz")):
                self.paths.append(str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting_open)


def test_second_epoch_reads_no_nifti_and_a_touched_file_is_reread(samples, tmp_path: Path, monkeypatch) -> None:
    dataset = TrainingVolumes(samples, PLAN, tmp_path / "cache")
    counter = OpenCounter(monkeypatch)
    first = [dataset[i]["image"] for i in range(len(dataset))]
    assert counter.paths, "the first epoch preprocesses from the NIfTI files"
    counter.paths.clear()
    dataset.set_epoch(1)
    second = [dataset[i]["image"] for i in range(len(dataset))]
    assert counter.paths == []
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    stat = os.stat(samples[1].image)
    os.utime(samples[1].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    dataset[1]
    assert str(samples[1].image) in counter.paths
    assert all(str(samples[i].image) not in counter.paths for i in (0, 2))


def test_changed_plan_or_content_misses_the_cache(samples, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    TrainingVolumes(samples[:1], PLAN, cache)[0]
    other = PreprocessingPlan(target_spacing=(1.0, 1.0, 1.5), target_shape=(32, 32, 16))
    assert TrainingVolumes(samples[:1], other, cache)[0]["image"].shape == (1, 32, 32, 16)
    assert len(list(cache.glob("*.npz"))) == 2


def test_corrupted_cache_entry_is_rebuilt(samples, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    reference = TrainingVolumes(samples[:1], PLAN, cache)[0]["image"]
    entry = next(cache.glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])
    rebuilt = TrainingVolumes(samples[:1], PLAN, cache)[0]["image"]
    assert "corrupted" in caplog.text
    assert torch.equal(reference, rebuilt)
    assert np.load(entry, allow_pickle=False)["image"].shape == (32, 32, 32)


def test_without_augmentation_items_equal_inference_preprocessing(samples, tmp_path: Path) -> None:
    dataset = TrainingVolumes(samples, PLAN, tmp_path / "cache", augment=None)
    for index, sample in enumerate(samples):
        expected = preprocess(sample.image, PLAN, masks=dict(sample.masks))
        for epoch in (0, 3):
            dataset.set_epoch(epoch)
            item = dataset[index]
            assert np.array_equal(item["image"][0].numpy(), expected.image)
            assert np.array_equal(item["cord"][0].numpy(), expected.masks["cord"].astype(bool))
            assert np.array_equal(item["valid"][0].numpy(), expected.valid)


def test_augmentation_is_seeded_and_changes_per_epoch(samples, tmp_path: Path) -> None:
    settings = AugmentationSettings(crop_shape=(32, 32, 16))
    a = TrainingVolumes(samples, PLAN, tmp_path / "cache", augment=settings, seed=3)
    b = TrainingVolumes(samples, PLAN, tmp_path / "cache", augment=settings, seed=3)
    assert torch.equal(a[0]["image"], b[0]["image"])
    assert a[0]["image"].shape == (1, 32, 32, 16)
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])


def test_augmentation_keeps_masks_binary_and_aligned(samples, tmp_path: Path) -> None:
    base = TrainingVolumes(samples[:1], PLAN, tmp_path / "cache").arrays(0)
    out = augment_volume(base, AugmentationSettings(rotation_degrees=8.0), np.random.default_rng(0))
    assert set(np.unique(out["mask_cord"])) <= {0, 1}
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    assert np.all(out["image"][~out["valid"].astype(bool)] == -1)
    cord = out["mask_cord"].astype(bool)
    assert 0.8 < cord.sum() / base["mask_cord"].sum() < 1.2


def test_thick_slices_average_each_slab_and_interpolate_linearly_between() -> None:
    image = np.random.default_rng(0).normal(size=(5, 12, 4))
    out = thick_slices(image, axis=1, thickness=3.0, phase=0.0)
    slabs = [image[:, a:a + 3].mean(axis=1) for a in (0, 3, 6, 9)]
    for centre, slab in zip((1, 4, 7, 10), slabs):
        assert np.allclose(out[:, centre], slab, atol=1e-6)
    assert np.allclose(out[:, 2], slabs[0] * 2 / 3 + slabs[1] / 3, atol=1e-6)
    assert np.allclose(out[:, 0], slabs[0], atol=1e-6)  # before the first centre: that slab's value


def test_thick_slices_blur_only_across_the_slices_and_keep_the_signal() -> None:
    point = np.zeros((9, 9, 30))
    point[4, 4, 15] = 1.0
    out = thick_slices(point, axis=2, thickness=4.5, phase=0.3)
    assert out.sum() == pytest.approx(1.0, abs=0.02)  # the slab that holds it spreads it, no more
    assert np.count_nonzero(out[4, 4] > 1e-6) >= 5 and out.max() < 0.3
    assert np.count_nonzero(out) == np.count_nonzero(out[4, 4])  # nothing leaks along the other axes
    assert np.allclose(thick_slices(np.full((6, 7, 8), 0.25), 0, 3.7, 0.9), 0.25)
    assert np.array_equal(thick_slices(point, 2, 1.0, 0.5), point.astype(np.float32))


def test_thick_slice_augmentation_changes_the_image_only_and_reads_the_voxel_size(samples, tmp_path: Path) -> None:
    base = TrainingVolumes(samples[:1], PLAN, tmp_path / "cache").arrays(0)
    settings = AugmentationSettings(rotation_degrees=0.0, flip_left_right=0.0, intensity_scale=0.0,
                                    intensity_shift=0.0, gamma=0.0, thick_slice_probability=1.0,
                                    thick_slice_mm=(4.0, 4.0))
    out = augment_volume(base, settings, np.random.default_rng(1), spacing=(1.0, 1.0, 1.0))
    assert not np.allclose(out["image"], base["image"])
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    for name in ("valid", "mask_cord"):
        assert np.array_equal(out[name], base[name])
    # 4 mm slices on a 4 mm grid are the grid itself: nothing to average.
    same = augment_volume(base, settings, np.random.default_rng(1), spacing=(4.0, 4.0, 4.0))
    assert np.allclose(same["image"], base["image"], atol=1e-6)
    never = dataclasses.replace(settings, thick_slice_probability=0.0)
    assert np.allclose(augment_volume(base, never, np.random.default_rng(1))["image"], base["image"], atol=1e-6)


def test_training_items_simulate_slices_in_the_plans_millimetres(samples, tmp_path: Path) -> None:
    """3-4 mm slices on a 1.6 mm model grid are 2-2.5 voxels thick, not the 3-4 of a 1 mm grid."""
    plan = PreprocessingPlan(target_spacing=(1.6, 1.6, 1.6), target_shape=(16, 16, 16))
    settings = AugmentationSettings(thick_slice_probability=1.0)
    data = TrainingVolumes(samples[:1], plan, tmp_path / "cache", augment=settings, seed=5)

    def augmented_on(spacing) -> np.ndarray:
        rng = np.random.default_rng([5, 0, 0])  # the draws of (seed 5, epoch 0, item 0)
        return augment_volume(model_window(data.covering(0), plan.target_shape, rng), settings, rng, spacing)["image"]

    item = data[0]["image"][0].numpy()
    assert np.array_equal(item, augmented_on(plan.target_spacing)) and not np.allclose(item, augmented_on((1.0,) * 3))


def test_split_is_by_participant_seeded_and_never_empty() -> None:
    labels = [f"{i:02d}" for i in range(1, 11)]
    train, val = split_participants(labels, 0.2, seed=0)
    assert len(val) == 2 and set(train) | set(val) == set(labels) and not set(train) & set(val)
    assert split_participants(labels, 0.2, seed=0) == (train, val)
    assert split_participants(labels, 0.2, seed=1) != (train, val)
    assert split_participants(["01", "02"], 0.1, seed=0)[1] != ()
    assert split_participants(["01"], 0.5, seed=0) == (("01",), ())
