"""Atomic writes: all or nothing under a final name, errors mapped to exit codes 73/74."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import io as file_io
from bids_app.bids.derivatives import write_dataset_description
from bids_app.errors import CannotCreateError, OutputIOError
from tests.test_derivatives import _files, make_image



def test_atomic_write_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    file_io.atomic_write_json(target, {"é": 1})
    assert json.loads(target.read_text(encoding="utf-8")) == {"é": 1}
    file_io.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    file_io.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _files(tmp_path) == {"a/b/x.json"}


def test_atomic_write_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        file_io.atomic_write_text(tmp_path / "x.txt", "x")
        file_io.save_nifti_atomic(make_image(), tmp_path / "x.nii.gz")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "x.nii.gz").stat().st_mode & 0o777 == 0o644


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["bytes", "json", "nifti"])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str) -> None:
    monkeypatch.setattr(file_io.os, "fsync", _enospc)
    target = tmp_path / ("out.nii.gz" if writer == "nifti" else "out.bin")
    with pytest.raises(OutputIOError, match=r"out\..*ENOSPC") as info:
        if writer == "bytes":
            file_io.atomic_write_bytes(target, b"data")
        elif writer == "json":
            file_io.atomic_write_json(target, {"a": 1})
        else:
            file_io.save_nifti_atomic(make_image(), target)
    assert info.value.exit_code == 74
    assert _files(tmp_path) == set()


def test_failed_write_keeps_previous_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    file_io.atomic_write_json(target, {"v": 1})

    def eio(*_args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(file_io.os, "replace", eio)
    with pytest.raises(OutputIOError, match="EIO"):
        file_io.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _files(tmp_path) == {"x.json"}


def test_nifti_write_failure_midway_removes_partial_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def partial_save(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", partial_save)
    with pytest.raises(OutputIOError, match="No space left"):
        file_io.save_nifti_atomic(make_image(), tmp_path / "sub-01_label-lesion_mask.nii.gz")
    assert _files(tmp_path) == set()


def test_nifti_temp_name_is_hidden_and_keeps_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_save = nib.save

    def spy(img, filename):
        seen.append(Path(filename).name)
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", spy)
    file_io.save_nifti_atomic(make_image(), tmp_path / "sub-01_label-lesion_mask.nii.gz")
    assert seen[0].startswith(".sub-01_label-lesion_mask.") and seen[0].endswith(".tmp.nii.gz")


def test_nifti_roundtrip_and_deterministic_gzip(tmp_path: Path) -> None:
    img = make_image()
    a = file_io.save_nifti_atomic(img, tmp_path / "a.nii.gz")
    b = file_io.save_nifti_atomic(img, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field
    back = nib.load(a)
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())
    np.testing.assert_allclose(back.affine, img.affine)
    with pytest.raises(ValueError):
        file_io.save_nifti_atomic(img, tmp_path / "a.mgz")


def test_parent_under_regular_file_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CannotCreateError) as info:
        file_io.atomic_write_text(blocker / "sub" / "x.txt", "x")
    assert info.value.exit_code == 73
    with pytest.raises(CannotCreateError):
        file_io.save_nifti_atomic(make_image(), blocker / "x.nii.gz")
    with pytest.raises(CannotCreateError):
        write_dataset_description(blocker, "0.1.0", tmp_path)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod 0o500 does not stop root from writing",
)
def test_read_only_directory_cannot_be_written(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CannotCreateError, match="cannot create"):
            file_io.atomic_write_text(ro / "x.txt", "x")
        with pytest.raises(CannotCreateError):
            file_io.save_nifti_atomic(make_image(), ro / "x.nii.gz")
        with pytest.raises(CannotCreateError):
            file_io.atomic_write_text(ro / "sub" / "x.txt", "x")
    finally:
        ro.chmod(0o700)


def test_permission_error_maps_to_cannot_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above but forced, so it also runs as root."""
    real_open = os.open

    def deny(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(file_io.os, "open", deny)
    with pytest.raises(CannotCreateError, match="Permission denied"):
        file_io.atomic_write_text(tmp_path / "x.txt", "x")
    assert _files(tmp_path) == set()
