"""How each bad-input case of the catalogue is made: a function per case that damages a private
copy of the simple dataset (or of the tiny model) and says how to run the app on it.

Participants 01 (healthy, cord mask) and 05 (lesion mask) are the ones damaged and selected, so a
failing run checks few files and a working one segments one image.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from bids_app.model_card import content_sha256
import torch

from bids_app.workspace import checkpoints_dir
from tests.conftest import participant_args

from tests.reliability.harness import FAST


@dataclass
class Setup:
    """What a case may change: the dataset copy, a scratch folder, the shared tiny model."""

    bids: Path
    tmp: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch

    def image(self, subject: str = "01") -> Path:
        return self.bids / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w.nii.gz"

    def mask(self, subject: str = "01", role: str = "SC") -> Path:
        return self.bids / "derivatives" / "labels" / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w_label-{role}_seg.nii.gz"

    def model_copy(self) -> Path:
        target = self.tmp / "models"
        shutil.copytree(self.model, target)
        return target


@dataclass
class Scenario:
    """How to run the app on a damaged input, and the file the error must name."""

    culprit: Path | None
    level: str = "participant"
    args: list[str] = field(default_factory=list)
    subject: str = "01"
    validate: bool = False
    out: Path | None = None
    bids: Path | None = None  # another path to the dataset (a symlink to it)

    def argv(self, setup: Setup) -> list[str]:
        out = self.out or setup.tmp / "out"
        flags = [] if self.validate else FAST
        if self.level == "participant" and "--model-dir" not in self.args:
            flags = [*flags, *participant_args(setup.model)]
        if self.level == "participant" and "--participant-label" not in self.args:
            flags = [*flags, "--participant-label", self.subject]
        return [str(self.bids or setup.bids), str(out), self.level, *flags, *self.args]


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None, header=None) -> None:
    """Save ``data`` under ``path`` as float32 (NaN survive), keeping the geometry unless told."""
    img = nib.load(str(path))
    hdr = (header if header is not None else img.header).copy()
    hdr.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), img.affine if affine is None else affine, hdr), str(path))


def _voxels(path: Path) -> np.ndarray:
    return nib.load(str(path)).get_fdata(dtype=np.float32)


PIXDIM_OFFSET = 76  # NIfTI-1: float32 pixdim[8] at byte 76 of the header


def _patch_pixdim(path: Path, axis: int, value: float) -> None:
    """Set one stored voxel size (header pixdim) in the file's bytes, the sform staying valid:
    nibabel itself would 'fix' a zero or negative value on the way out."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    order = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    struct.pack_into(f"{order}f", raw, PIXDIM_OFFSET + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(raw)))


def _crop_all(setup: Setup, box: tuple[slice, ...], pad: int = 0) -> None:
    """Crop (or, with ``pad``, enlarge) sub-01's image and masks identically, keeping world positions."""
    for path in (setup.image(), setup.mask()):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = img.affine.copy()
        if pad:
            data = np.pad(data, pad, mode="constant", constant_values=0)
            affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
        else:
            data = data[box]
            affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in box])
        nib.save(nib.Nifti1Image(data, affine, img.header), str(path))


def _cord_box(setup: Setup, size: int) -> tuple[slice, ...]:
    centre = np.round(np.argwhere(_voxels(setup.mask()) > 0.5).mean(axis=0)).astype(int)
    return tuple(slice(int(c) - size // 2, int(c) - size // 2 + size) for c in centre)


def _tsv(setup: Setup, edit: Callable[[list[list[str]]], list[list[str]]]) -> None:
    path = setup.bids / "participants.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    path.write_text("\n".join("\t".join(r) for r in edit(rows)) + "\n")


def _store_weights_bytes(models: Path, component: str, data: bytes) -> Path:
    """Replace a component's weights and make card and stage.json vouch for them (a forged model)."""
    weights = models / component / "weights.pt"
    weights.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    card = json.loads((models / "model_card.json").read_text())
    card["components"][component]["sha256"] = digest
    card["content_sha256"] = content_sha256(card)  # a forger re-seals the card
    (models / "model_card.json").write_text(json.dumps(card))
    stage = json.loads((models / component / "stage.json").read_text())
    stage["sha256"] = digest
    (models / component / "stage.json").write_text(json.dumps(stage))
    return weights


class Exploit:
    """Unpickling this runs code: what a weights-only loader must refuse."""

    def __reduce__(self):
        return (os.system, ("echo pickled code ran > /dev/null",))


# ------------------------------------------------------------------------------------- cases


def empty_image(s: Setup) -> Scenario:
    s.image().write_bytes(b"")
    return Scenario(s.image())


def truncated_image(s: Setup) -> Scenario:
    data = s.image().read_bytes()
    s.image().write_bytes(data[: len(data) // 2])
    return Scenario(s.image())


def gzip_not_nifti(s: Setup) -> Scenario:
    s.image().write_bytes(gzip.compress(b"this is a text file, compressed and misnamed\n" * 50))
    return Scenario(s.image())


def broken_symlink(s: Setup) -> Scenario:
    s.image().unlink()
    s.image().symlink_to(s.tmp / ".git" / "annex" / "objects" / "MD5E-s1234--0123.nii.gz")
    return Scenario(s.image())


def nonfinite_voxels(s: Setup) -> Scenario:
    data = _voxels(s.image())
    np.put(data, [10, 20, 30, 40], np.nan)
    np.put(data, [50, 60], [np.inf, -np.inf])
    _rewrite(s.image(), data)
    return Scenario(s.image())


def nonfinite_allowed(s: Setup) -> Scenario:
    data = _voxels(s.image())
    np.put(data, [10, 20], np.nan)
    _rewrite(s.image(), data)
    config = s.tmp / "allow.yaml"
    config.write_text("preprocessing:\n  max_nonfinite_fraction: 0.001\n")
    return Scenario(s.image(), args=["--config", str(config)])


def image_4d(s: Setup) -> Scenario:
    data = _voxels(s.image())
    _rewrite(s.image(), np.stack([data, data], axis=-1))
    return Scenario(s.image())


def image_2d(s: Setup) -> Scenario:
    _rewrite(s.image(), _voxels(s.image())[:, :, 0])
    return Scenario(s.image())


def voxel_size_zero(s: Setup) -> Scenario:
    _patch_pixdim(s.image(), 3, 0.0)
    return Scenario(s.image())


def voxel_size_negative(s: Setup) -> Scenario:
    _patch_pixdim(s.image(), 3, -1.0)
    return Scenario(s.image())


def voxel_size_100mm(s: Setup) -> Scenario:
    img = nib.load(str(s.image()))
    affine = img.affine.copy()
    affine[:3, 2] *= 100.0 / np.linalg.norm(affine[:3, 2])
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), str(s.image()))
    return Scenario(s.image())


def far_too_small(s: Setup) -> Scenario:
    _crop_all(s, _cord_box(s, 3))
    return Scenario(s.image())


def far_larger(s: Setup) -> Scenario:
    _crop_all(s, (), pad=40)  # about 3x the field of view along every axis
    return Scenario(None)


def too_many_voxels(s: Setup) -> Scenario:
    s.monkeypatch.setattr("bids_app.preprocessing.pipeline.MAX_INPUT_VOXELS", 1000)
    return Scenario(s.image())


def singular_affine(s: Setup) -> Scenario:
    img = nib.load(str(s.image()))
    flat = img.affine.copy()
    flat[:3, 2] = flat[:3, 1]
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), flat), str(s.image()))
    return Scenario(s.image())


def cord_mask_shape(s: Setup) -> Scenario:
    img = nib.load(str(s.mask()))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :-1], img.affine, img.header), str(s.mask()))
    return Scenario(s.mask())


def cord_mask_affine(s: Setup) -> Scenario:
    img = nib.load(str(s.mask()))
    shifted = img.affine.copy()
    shifted[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted, img.header), str(s.mask()))
    return Scenario(s.mask())


def cord_mask_empty(s: Setup) -> Scenario:
    img = nib.load(str(s.mask()))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), str(s.mask()))
    return Scenario(s.mask())


def lesion_mask_values(s: Setup) -> Scenario:
    path = s.mask("05", "lesion")
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    data[data > 0] = 2
    np.put(data, np.flatnonzero(data)[::2], 1)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    return Scenario(path, subject="05")


def participants_no_id(s: Setup) -> Scenario:
    _tsv(s, lambda rows: [["id", *rows[0][1:]], *rows[1:]])
    return Scenario(s.bids / "participants.tsv", level="group")


def participants_missing_cells(s: Setup) -> Scenario:
    _tsv(s, lambda rows: [*rows[:2], rows[2][:2], *rows[3:]])
    return Scenario(s.bids / "participants.tsv", level="group")


def participants_extra_cells(s: Setup) -> Scenario:
    _tsv(s, lambda rows: [rows[0], [*rows[1], "oops"], *rows[2:]])
    return Scenario(s.bids / "participants.tsv", level="group")


def participants_no_healthy_column(s: Setup) -> Scenario:
    _tsv(s, lambda rows: [r[:3] for r in rows])
    return Scenario(None, level="group")


def participants_extra_column(s: Setup) -> Scenario:
    _tsv(s, lambda rows: [[*rows[0], "site"], *([*r, "A"] for r in rows[1:])])
    return Scenario(None, level="group", args=["--dry-run"])


def description_missing(s: Setup) -> Scenario:
    (s.bids / "dataset_description.json").unlink()
    return Scenario(s.bids / "dataset_description.json")


def description_invalid(s: Setup) -> Scenario:
    (s.bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": ')
    return Scenario(s.bids / "dataset_description.json")


def empty_placeholders(s: Setup) -> Scenario:
    for path in s.bids.rglob("*.nii.gz"):
        path.write_bytes(b"")
    return Scenario(s.image(), validate=True)


def symlinked_files(s: Setup) -> Scenario:
    annex = s.tmp / "annex"
    annex.mkdir()
    for path in (s.image(), s.mask()):
        target = annex / hashlib.md5(path.name.encode()).hexdigest()
        shutil.move(path, target)
        path.symlink_to(target)
    link = s.tmp / "dataset-link"  # the dataset itself reached through a symlink too
    link.symlink_to(s.bids)
    return Scenario(None, bids=link)


def read_only_bids_dir(s: Setup) -> Scenario:
    """Mode bits do not stop root: as root, test_security's fresh-process test bind-mounts the dataset
    read-only instead; either way the digest proves nothing was written."""
    for path in (s.bids, *s.bids.rglob("*")):
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return Scenario(None)


def output_unwritable(s: Setup) -> Scenario:
    blocker = s.tmp / "a-file"
    blocker.write_text("not a folder")
    return Scenario(None, out=blocker / "out")


def disk_full(s: Setup) -> Scenario:
    """The disk fills while the anomaly map is written: half the bytes reach the temporary file."""
    real_save = nib.save

    def save_until_full(img, filename):
        real_save(img, filename)
        if "probseg" in str(filename):
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    s.monkeypatch.setattr(nib, "save", save_until_full)
    return Scenario(s.tmp / "out" / "sub-01" / "anat" / "sub-01_label-lesion_probseg.nii.gz")


def model_other_version(s: Setup) -> Scenario:
    models = s.model_copy()
    card = json.loads((models / "model_card.json").read_text())
    card["version"] = "7.0.0"
    (models / "model_card.json").write_text(json.dumps(card))
    return Scenario(models / "model_card.json", args=["--model-dir", str(models)])


def model_tampered(s: Setup) -> Scenario:
    models = s.model_copy()
    weights = models / "diffusion" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, weights)
    return Scenario(weights, args=["--model-dir", str(models)])


def model_truncated(s: Setup) -> Scenario:
    models = s.model_copy()
    weights = models / "vqgan" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    return Scenario(weights, args=["--model-dir", str(models)])


def model_pickle_code(s: Setup) -> Scenario:
    models = s.model_copy()
    weights = _store_weights_bytes(models, "vqgan", pickle.dumps({"x": Exploit()}))
    return Scenario(weights, args=["--model-dir", str(models)])


def _unfinished_training(s: Setup) -> tuple[Path, Path]:
    """A copy of the tiny model's output folder whose vqgan stage must resume from its checkpoint."""
    out = s.tmp / "trained"
    shutil.copytree(s.model.parent, out)
    (out / "models" / "vqgan" / "stage.json").unlink()
    (out / "models" / "model_card.json").unlink()  # written last: an unfinished training has none
    return out, checkpoints_dir(out / "work", out / "models") / "vqgan" / "latest.pt"


def _group_args(s: Setup) -> list[str]:
    return ["--preset", "tiny", "--config", str(s.model.parent.parent / "tiny.json")]


def checkpoint_corrupted(s: Setup) -> Scenario:
    out, checkpoint = _unfinished_training(s)
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    return Scenario(checkpoint, level="group", args=_group_args(s), out=out)


def checkpoint_pickle_code(s: Setup) -> Scenario:
    out, checkpoint = _unfinished_training(s)
    checkpoint.write_bytes(pickle.dumps({"format": 1, "step": 1, "stage": Exploit()}))
    return Scenario(checkpoint, level="group", args=_group_args(s), out=out)


SCENARIOS: dict[str, Callable[[Setup], Scenario]] = {
    "empty-image": empty_image, "truncated-image": truncated_image, "gzip-not-nifti": gzip_not_nifti,
    "broken-symlink": broken_symlink, "nonfinite-voxels": nonfinite_voxels, "nonfinite-allowed": nonfinite_allowed,
    "4d-image": image_4d, "2d-image": image_2d, "voxel-size-zero": voxel_size_zero,
    "voxel-size-negative": voxel_size_negative, "voxel-size-100mm": voxel_size_100mm,
    "far-too-small": far_too_small, "far-larger": far_larger, "too-many-voxels": too_many_voxels,
    "singular-affine": singular_affine, "cord-mask-shape": cord_mask_shape, "cord-mask-affine": cord_mask_affine,
    "cord-mask-empty": cord_mask_empty, "lesion-mask-values": lesion_mask_values,
    "participants-no-id": participants_no_id, "participants-missing-cells": participants_missing_cells,
    "participants-extra-cells": participants_extra_cells,
    "participants-no-healthy-column": participants_no_healthy_column,
    "participants-extra-column": participants_extra_column, "description-missing": description_missing,
    "description-invalid": description_invalid, "empty-placeholders": empty_placeholders,
    "symlinked-files": symlinked_files, "read-only-bids-dir": read_only_bids_dir,
    "output-unwritable": output_unwritable, "disk-full": disk_full, "model-other-version": model_other_version,
    "model-tampered": model_tampered, "model-truncated": model_truncated, "model-pickle-code": model_pickle_code,
    "checkpoint-corrupted": checkpoint_corrupted, "checkpoint-pickle-code": checkpoint_pickle_code,
}
