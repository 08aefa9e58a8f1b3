"""Training datasets: cache behaviour, split, and augmentation that never reaches inference."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_app.data import AugmentationSettings, Sample, TrainingVolumes, augment_volume, split_participants
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


def test_split_is_by_participant_seeded_and_never_empty() -> None:
    labels = [f"{i:02d}" for i in range(1, 11)]
    train, val = split_participants(labels, 0.2, seed=0)
    assert len(val) == 2 and set(train) | set(val) == set(labels) and not set(train) & set(val)
    assert split_participants(labels, 0.2, seed=0) == (train, val)
    assert split_participants(labels, 0.2, seed=1) != (train, val)
    assert split_participants(["01", "02"], 0.1, seed=0)[1] != ()
    assert split_participants(["01"], 0.5, seed=0) == (("01",), ())
