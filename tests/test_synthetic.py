"""Tests of the synthetic phantom dataset that every other test and the demo rely on."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app.errors import ExitCode, UsageError
from bids_app.synthetic import SyntheticDataset, generate_dataset

SMALL_FOV = (24, 24, 16)


def _validator() -> str | None:
    """The venv's bids-validator-deno, else the one on PATH."""
    local = Path(sys.executable).parent / "bids-validator-deno"
    return str(local) if local.exists() else shutil.which("bids-validator-deno")


def _validation_errors(root: Path) -> list[dict]:
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run([exe, str(root), "--format", "json"], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    return [i for i in report["issues"]["issues"] if i["severity"] == "error"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def default_ds(tmp_path_factory) -> SyntheticDataset:
    return generate_dataset(tmp_path_factory.mktemp("default") / "ds")


@pytest.fixture(scope="module")
def multi_ds(tmp_path_factory) -> SyntheticDataset:
    return generate_dataset(tmp_path_factory.mktemp("multi") / "ds", n_healthy=1, n_lesion=1, seed=7,
                            sessions=("ses-pre", "post"), contrasts=("T2w", "T1w"), field_of_view=(32, 32, 24))


def test_default_layout_is_exact(default_ds):
    root = default_ds.root
    assert root.is_absolute()
    expected = {"dataset_description.json", "README.md", "participants.tsv", "participants.json",
                "derivatives/labels/dataset_description.json"}
    for i in range(1, 7):
        s = f"sub-{i:02d}"
        expected |= {f"{s}/anat/{s}_T2w.nii.gz", f"{s}/anat/{s}_T2w.json",
                     f"derivatives/labels/{s}/anat/{s}_T2w_label-SC_seg.nii.gz",
                     f"derivatives/labels/{s}/anat/{s}_T2w_label-SC_seg.json"}
        if i > 4:
            expected |= {f"derivatives/labels/{s}/anat/{s}_T2w_label-lesion_seg.nii.gz",
                         f"derivatives/labels/{s}/anat/{s}_T2w_label-lesion_seg.json"}
    assert set(_files(root)) == expected
    assert default_ds.images == [root / f"sub-{i:02d}/anat/sub-{i:02d}_T2w.nii.gz" for i in range(1, 7)]
    assert set(default_ds.cord_masks) == set(default_ds.images)
    assert sorted(default_ds.lesion_masks) == default_ds.images[4:]
    assert all(p.is_file() for p in [*default_ds.cord_masks.values(), *default_ds.lesion_masks.values()])
    assert default_ds.labels_root == root / "derivatives" / "labels"


def test_descriptions_and_sidecars(default_ds):
    raw = json.loads((default_ds.root / "dataset_description.json").read_text())
    assert raw["BIDSVersion"] == "1.10.0" and raw["DatasetType"] == "raw"
    assert raw["Name"] and raw["License"] and raw["Authors"]
    deriv = json.loads((default_ds.labels_root / "dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative"
    assert deriv["GeneratedBy"][0]["Name"] == "counterseg-synthetic"
    sidecar = json.loads(default_ds.images[0].with_name("sub-01_T2w.json").read_text())
    assert sidecar["Manufacturer"] == "counterseg-synthetic"
    assert 0 < sidecar["EchoTime"] < sidecar["RepetitionTime"] < 10
    mask_sidecar = json.loads(default_ds.cord_masks[default_ds.images[0]].with_suffix("").with_suffix(".json")
                              .read_text())
    assert mask_sidecar["SpatialReference"] == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"


def test_participants(default_ds):
    assert default_ds.participants == [("01", "HC"), ("02", "HC"), ("03", "HC"), ("04", "HC"),
                                       ("05", "MS"), ("06", "MS")]
    with open(default_ds.root / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert list(rows[0]) == ["participant_id", "age", "sex", "pathology", "lesion_type", "acquisition"]
    assert [(r["participant_id"], r["pathology"]) for r in rows] == \
        [(f"sub-{label}", path) for label, path in default_ds.participants]
    assert all(18 <= int(r["age"]) <= 90 and r["sex"] in {"M", "F"} for r in rows)
    assert [(r["lesion_type"], r["acquisition"]) for r in rows] == [
        ("n/a", "sag-iso"), ("n/a", "ax-thick"), ("n/a", "sag-thick"), ("n/a", "sag-iso"),
        ("central", "sag-iso"), ("ms", "ax-thick")]
    sidecar = json.loads((default_ds.root / "participants.json").read_text())
    assert {"age", "sex", "pathology", "lesion_type", "acquisition"} <= set(sidecar)
    assert set(sidecar["lesion_type"]["Levels"]) == {"central", "ms", "sci"}
    assert set(sidecar["acquisition"]["Levels"]) == {"sag-iso", "ax-thick", "sag-thick"}


@pytest.mark.parametrize("which", ["default_ds", "multi_ds"])
def test_bids_validator_reports_no_errors(which, request):
    ds = request.getfixturevalue(which)
    assert _validation_errors(ds.root) == []


def test_same_seed_same_bytes_other_seed_differs(default_ds, tmp_path):
    again = generate_dataset(tmp_path / "again")
    assert _files(again.root) == _files(default_ds.root)
    other = generate_dataset(tmp_path / "other", seed=1)
    first, second = _files(default_ds.root), _files(other.root)
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first if k.endswith("_T2w.nii.gz"))


def test_masks_are_binary_and_share_image_geometry(default_ds, multi_ds):
    for ds in (default_ds, multi_ds):
        for image, cord in [*ds.cord_masks.items(), *ds.lesion_masks.items()]:
            img, mask = nib.load(image), nib.load(cord)
            assert mask.get_data_dtype() == np.uint8
            assert mask.shape == img.shape
            assert np.array_equal(mask.affine, img.affine)
            assert np.array_equal(mask.header.get_sform(), img.header.get_sform())
            assert np.array_equal(mask.header.get_qform(), img.header.get_qform())
            values = np.unique(_data(cord))
            assert set(values.tolist()) == {0, 1}


def test_lesions_inside_cord_and_hyperintense_on_t2w(default_ds, multi_ds):
    for ds in (default_ds, multi_ds):
        assert ds.lesion_masks
        for image, lesion_path in ds.lesion_masks.items():
            lesion = _data(lesion_path).astype(bool)
            cord = _data(ds.cord_masks[image]).astype(bool)
            assert lesion.any() and not (lesion & ~cord).any()
            if not image.name.endswith("_T2w.nii.gz"):
                continue
            data = nib.load(image).get_fdata()
            background = data[cord & ~lesion].mean()
            assert data[lesion].mean() > background
            labels, n = ndimage.label(lesion)
            assert 1 <= n <= 4
            for k in range(1, n + 1):  # each lesion is brighter than the cord right around it
                blob = labels == k
                around = cord & ~lesion & ndimage.binary_dilation(blob, iterations=3)
                assert data[blob].mean() > data[around].mean()


def _csf_ring(cord: np.ndarray, zooms) -> np.ndarray:
    """Voxels 0.5-1.8 mm outside the cord (in mm, so that thick slices do not reach past the CSF)."""
    distance = ndimage.distance_transform_edt(~cord, sampling=zooms)
    return (distance > 0.5) & (distance <= 1.8)


def test_csf_bright_on_t2w_dark_on_t1w(default_ds, multi_ds):
    for ds in (default_ds, multi_ds):
        for image, cord_path in ds.cord_masks.items():
            cord = _data(cord_path).astype(bool)
            img = nib.load(image)
            data = img.get_fdata()
            csf, inside = data[_csf_ring(cord, img.header.get_zooms())].mean(), data[cord].mean()
            if image.name.endswith("_T2w.nii.gz"):
                assert csf > 1.3 * inside, image.name
            else:
                assert csf < 0.7 * inside, image.name


def test_healthy_participants_have_no_lesion_masks(default_ds):
    healthy = [img for img in default_ds.images if img.name < "sub-05"]
    assert healthy and not any(img in default_ds.lesion_masks for img in healthy)
    assert not list(default_ds.labels_root.glob("sub-0[1-4]/anat/*lesion*"))


def test_geometry_and_storage_vary(default_ds):
    codes, dtypes, slopes, spacings, cord_volumes, oblique = set(), set(), set(), set(), set(), False
    for image in default_ds.images:
        img = nib.load(image)
        codes.add("".join(nib.aff2axcodes(img.affine)))
        dtypes.add(str(img.get_data_dtype()))
        slopes.add(float(img.dataobj.slope))
        zooms = tuple(round(float(z), 3) for z in img.header.get_zooms())
        spacings.add(tuple(sorted(zooms)))
        cord = _data(default_ds.cord_masks[image]).astype(bool)
        cord_volumes.add(round(float(cord.sum() * np.prod(zooms) / 100)))
        direction = img.affine[:3, :3] / np.array(zooms)
        oblique |= not np.allclose(np.abs(direction).max(axis=0), 1.0)
    assert len(codes) >= 2 and codes - {"RAS"}
    assert {"PSR", "LAS"} <= codes
    assert {"float32", "int16"} <= dtypes
    assert 0.5 in slopes
    assert any(len(set(s)) > 1 for s in spacings) and len(spacings) >= 3
    assert oblique
    assert len(cord_volumes) >= 4  # cord size differs between participants


def test_int16_images_use_slope(default_ds):
    int_images = [i for i in default_ds.images if nib.load(i).get_data_dtype() == np.int16]
    assert int_images
    for image in int_images:
        img = nib.load(image)
        raw = np.asarray(img.dataobj.get_unscaled())
        assert raw.dtype == np.int16
        assert img.dataobj.slope == 0.5
        assert np.array_equal(img.get_fdata(), raw * 0.5)


def test_naive_intensity_band_cannot_segment_cord(default_ds):
    """Even the best global intensity window (chosen with the truth) leaves Dice low."""
    for image, cord_path in default_ds.cord_masks.items():
        data = nib.load(image).get_fdata()
        cord = _data(cord_path).astype(bool)
        cuts = np.percentile(data, np.linspace(0, 100, 31))
        best = max(2 * (w & cord).sum() / (w.sum() + cord.sum())
                   for i, lo in enumerate(cuts) for hi in cuts[i + 1:]
                   for w in [(data >= lo) & (data <= hi)])
        assert best < 0.75, image.name


def test_cord_is_curved_and_spans_the_volume(default_ds):
    image = default_ds.images[0]  # RAS, so axis 2 is inferior-superior
    cord = _data(default_ds.cord_masks[image]).astype(bool)
    assert cord.any(axis=(0, 1)).all()
    centres = np.array([ndimage.center_of_mass(cord[:, :, k]) for k in range(cord.shape[2])])
    line = np.polyval(np.polyfit(np.arange(len(centres)), centres[:, 1], 1), np.arange(len(centres)))
    assert np.abs(centres[:, 1] - line).max() > 0.5  # not a straight line


def test_sessions_and_contrasts_paths(multi_ds):
    root = multi_ds.root
    expected = [root / f"sub-{s}/ses-{ses}/anat/sub-{s}_ses-{ses}_{c}.nii.gz"
                for s in ("01", "02") for ses in ("pre", "post") for c in ("T2w", "T1w")]
    assert multi_ds.images == expected
    for image in expected:
        stem = image.name[:-len(".nii.gz")]
        rel = image.parent.relative_to(root)
        assert (image.parent / f"{stem}.json").is_file()
        assert multi_ds.cord_masks[image] == multi_ds.labels_root / rel / f"{stem}_label-SC_seg.nii.gz"
    assert set(multi_ds.lesion_masks) == {i for i in expected if "sub-02" in i.name}
    assert all(m.name.endswith("_label-lesion_seg.nii.gz") for m in multi_ds.lesion_masks.values())


def test_same_anatomy_across_sessions_and_contrasts(multi_ds):
    images = [i for i in multi_ds.images if i.name.startswith("sub-02")]
    cords = [_data(multi_ds.cord_masks[i]) for i in images]
    lesions = [_data(multi_ds.lesion_masks[i]) for i in images]
    assert all(np.array_equal(cords[0], c) for c in cords[1:])
    assert all(np.array_equal(lesions[0], m) for m in lesions[1:])
    t2 = [nib.load(i).get_fdata() for i in images if i.name.endswith("_T2w.nii.gz")]
    assert len(t2) == 2 and not np.array_equal(t2[0], t2[1])  # sessions differ by noise


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UsageError):
        generate_dataset(tmp_path, n_healthy=1, n_lesion=0, field_of_view=SMALL_FOV)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_accepts_existing_empty_out_dir(tmp_path):
    ds = generate_dataset(tmp_path, n_healthy=0, n_lesion=1, field_of_view=SMALL_FOV)
    assert ds.root == tmp_path.absolute() and len(ds.images) == 1 and len(ds.lesion_masks) == 1


@pytest.mark.parametrize("kwargs", [
    {"n_healthy": -1}, {"n_healthy": 0, "n_lesion": 0}, {"n_healthy": 100}, {"seed": -3},
    {"contrasts": ("FLAIR",)}, {"contrasts": ()}, {"contrasts": ("T2w", "T2w")},
    {"sessions": ("a_b",)}, {"sessions": ("1", "ses-1")}, {"field_of_view": (40, 40)}, {"field_of_view": (4, 40, 40)}, {"lesion_types": ("tumour",)}, {"acquisitions": ()}, {"acquisitions": ("ax-thick", "ax-thick")},
])
def test_bad_arguments_raise_usage_error(kwargs, tmp_path):
    with pytest.raises(UsageError):
        generate_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "bids_app.synthetic", *args], capture_output=True,
                          text=True, cwd=root, timeout=120)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    proc = _cli(str(out), "--n-healthy", "1", "--n-lesion", "1", "--seed", "3", "--sessions", "A",
                "--contrasts", "T2w", "T1w", "--field-of-view", *map(str, SMALL_FOV))
    assert proc.returncode == 0, proc.stderr
    assert (out / "sub-02/ses-A/anat/sub-02_ses-A_T1w.nii.gz").is_file()
    assert (out / "derivatives/labels/sub-02/ses-A/anat/sub-02_ses-A_T2w_label-lesion_seg.nii.gz").is_file()
    assert not (out / "derivatives/labels/sub-01/ses-A/anat/sub-01_ses-A_T2w_label-lesion_seg.nii.gz").exists()
    api = generate_dataset(tmp_path / "api", n_healthy=1, n_lesion=1, seed=3, sessions=["A"],
                           contrasts=["T2w", "T1w"], field_of_view=SMALL_FOV)
    assert _files(out) == _files(api.root)


def test_cli_usage_errors_exit_64(tmp_path):
    (tmp_path / "x").write_text("x")
    refused = _cli(str(tmp_path))
    assert refused.returncode == ExitCode.USAGE and "not empty" in refused.stderr
    assert _cli(str(tmp_path / "new"), "--contrasts", "DWI").returncode == ExitCode.USAGE
    assert _cli().returncode == ExitCode.USAGE


# --------------------------------------------------------------------------------------------
# Lesion types and acquisitions of the clinic
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clinic_ds(tmp_path_factory) -> SyntheticDataset:
    """Nine lesion participants: every lesion type in every acquisition."""
    return generate_dataset(tmp_path_factory.mktemp("clinic") / "ds", n_healthy=3, n_lesion=9, seed=5)


def _of(ds: SyntheticDataset, lesion_type: str | None = None, acquisition: str | None = None) -> list[Path]:
    def label(image: Path) -> str:
        return image.name.split("_")[0][4:]
    return [i for i in ds.images if (lesion_type is None or ds.lesion_types[label(i)] == lesion_type)
            and (acquisition is None or ds.acquisitions[label(i)] == acquisition)]


def test_every_lesion_type_meets_every_acquisition(clinic_ds):
    pairs = {(clinic_ds.lesion_types[p], clinic_ds.acquisitions[p]) for p, _ in clinic_ds.participants}
    assert {(t, a) for t in ("central", "ms", "sci") for a in ("sag-iso", "ax-thick", "sag-thick")} <= pairs
    assert {a for p, path in clinic_ds.participants if path == "HC" for a in [clinic_ds.acquisitions[p]]} == \
        {"sag-iso", "ax-thick", "sag-thick"}
    assert {path for _, path in clinic_ds.participants} == {"HC", "MS", "SCI"}


def _world_axis_extent(mask: np.ndarray, affine: np.ndarray, axis: int) -> float:
    """Extent (mm) of a mask along one world axis, voxel centres."""
    coords = nib.affines.apply_affine(affine, np.argwhere(mask))[:, axis]
    return float(coords.max() - coords.min())


def test_ms_lesions_sit_at_the_cord_surface(clinic_ds):
    n_lesions = n_touching = 0
    for image in _of(clinic_ds, "ms"):
        img = nib.load(image)
        zooms = img.header.get_zooms()[:3]
        cord = _data(clinic_ds.cord_masks[image]).astype(bool)
        depth = ndimage.distance_transform_edt(cord, sampling=zooms)  # mm to the nearest voxel outside
        in_plane = sorted(zooms)[1]  # the finer of the two largest spacings bounds a surface voxel's depth
        labels, n = ndimage.label(_data(clinic_ds.lesion_masks[image]).astype(bool))
        assert 1 <= n <= 4, image.name
        for k in range(1, n + 1):
            blob = labels == k
            shallowest = depth[blob].min()
            assert shallowest <= 1.5 + in_plane, (image.name, shallowest)
            n_lesions += 1
            n_touching += shallowest <= in_plane + 1e-3
            across = max(_world_axis_extent(blob, img.affine, a) for a in (0, 1))
            assert across <= 5.0 + 2 * max(zooms), (image.name, across)
    assert n_lesions >= 3 and n_touching >= 0.5 * n_lesions


def test_sci_lesion_is_one_long_lesion(clinic_ds):
    for image in _of(clinic_ds, "sci"):
        img = nib.load(image)
        lesion = _data(clinic_ds.lesion_masks[image]).astype(bool)
        assert ndimage.label(lesion)[1] == 1, image.name
        slice_step = abs(img.affine[2, :3]).max()  # one voxel along S-I
        assert _world_axis_extent(lesion, img.affine, 2) + slice_step >= 8.0, image.name


def test_thick_slices_have_their_voxel_size_and_sidecar(clinic_ds):
    for acquisition, world_axis, low, high in (("ax-thick", 2, 3.0, 4.0), ("sag-thick", 0, 3.0, 3.0)):
        images = _of(clinic_ds, acquisition=acquisition)
        assert images
        for image in images:
            img = nib.load(image)
            zooms = np.array(img.header.get_zooms()[:3], float)
            thick = int(np.argmax(np.abs(img.affine[world_axis, :3]) / zooms))  # stored axis along that world axis
            assert low - 1e-4 <= zooms[thick] <= high + 1e-4
            others = np.delete(zooms, thick)
            assert others.max() <= 0.9 + 1e-4 and zooms[thick] >= 3 * others.max()
            sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
            assert sidecar["MRAcquisitionType"] == "2D"
            assert sidecar["SliceThickness"] == pytest.approx(float(zooms[thick]), abs=1e-4)
            assert sidecar["SliceEncodingDirection"] == "ijk"[thick]
            assert len(sidecar["SliceTiming"]) == img.shape[thick]
    for image in _of(clinic_ds, acquisition="sag-iso"):
        zooms = nib.load(image).header.get_zooms()[:3]
        assert max(zooms) - min(zooms) < 1e-4 and 0.8 - 1e-4 <= zooms[0] <= 1.0 + 1e-4


def test_slice_profile_integrates_partial_volume():
    from bids_app.synthetic.acquisition import SUBSLICES, Acquisition, integrate_slices, slice_profile

    profile = slice_profile()
    assert profile.sum() == pytest.approx(1.0) and np.allclose(profile, profile[::-1])
    middle = len(profile) // 2
    inside = profile[middle - SUBSLICES // 2: middle + SUBSLICES // 2 + 1]
    assert inside.sum() > 0.85 and 0 < profile[0] < inside.min()  # most of the slab, a little of its neighbours
    fine = np.zeros((2, 2, 4 * SUBSLICES))
    fine[:, :, : 2 * SUBSLICES + 2] = 1.0  # an edge two sub-slices into slice 2
    acquired = integrate_slices(fine, Acquisition("ax-thick", (0.6, 0.6, 3.5), 2))
    assert acquired.shape == (2, 2, 4)
    assert acquired[0, 0, 0] == pytest.approx(1.0) and acquired[0, 0, 3] == pytest.approx(0.0, abs=1e-6)
    assert 0.2 < acquired[0, 0, 2] < 0.6  # partial volume, where picking a thin slice would give 0 or 1


def test_the_mix_can_be_chosen(tmp_path):
    ds = generate_dataset(tmp_path / "ds", n_healthy=1, n_lesion=2, seed=2, field_of_view=SMALL_FOV,
                          lesion_types=("sci",), acquisitions=("ax-thick",))
    assert set(ds.acquisitions.values()) == {"ax-thick"}
    assert [ds.lesion_types[p] for p, _ in ds.participants] == [None, "sci", "sci"]
    assert [path for _, path in ds.participants] == ["HC", "SCI", "SCI"]
    proc = _cli(str(tmp_path / "cli"), "--n-healthy", "0", "--n-lesion", "1", "--lesion-types", "ms",
                "--acquisitions", "sag-thick", "--field-of-view", *map(str, SMALL_FOV))
    assert proc.returncode == 0, proc.stderr
    row = (tmp_path / "cli" / "participants.tsv").read_text().splitlines()[1].split("\t")
    assert row[3:] == ["MS", "ms", "sag-thick"]
    assert _cli(str(tmp_path / "bad"), "--lesion-types", "tumour").returncode == ExitCode.USAGE


def test_painting_follows_the_cord_frame_of_a_mask():
    from bids_app.synthetic.paint import cord_frame, paint_lesions

    x, y = np.meshgrid(np.arange(40) * 0.5, np.arange(30) * 0.5, indexing="ij")
    ellipse = ((x - 10.0) / 5.0) ** 2 + ((y - 7.0) / 3.0) ** 2 <= 1.0  # semi-axes 5 mm and 3 mm
    cord = np.repeat(ellipse[:, :, None], 20, axis=2)
    cord[:, :, :3] = False  # slices without cord take the nearest slice's frame
    frame = cord_frame(cord, (0.5, 0.5, 1.0))
    assert frame.semi_lr[10] == pytest.approx(5.0, rel=0.08) and frame.semi_ap[10] == pytest.approx(3.0, rel=0.08)
    assert frame.semi_lr[0] == frame.semi_lr[3]
    image = np.where(cord, 100.0, 300.0)
    painted, lesion = paint_lesions(image, cord, (0.5, 0.5, 1.0), "ms", "T2w", np.random.default_rng(0))
    assert lesion.any() and not (lesion & ~cord).any()
    assert (painted[lesion] > 100.0).all() and np.array_equal(painted[~lesion], image[~lesion])
    depth = ndimage.distance_transform_edt(cord, sampling=(0.5, 0.5, 1.0))
    assert depth[lesion].min() <= 1.5
    with pytest.raises(ValueError, match="empty"):
        cord_frame(np.zeros((4, 4, 4), bool), (1, 1, 1))


def _tube_frame():
    """A straight elliptical cord (semi-axes 5 x 3.5 mm) on a 0.5 mm grid, 40 mm long."""
    from bids_app.synthetic.lesions import CordFrame

    x = (np.arange(32) - 15.5) * 0.5
    y = (np.arange(24) - 11.5) * 0.5
    z = np.arange(80) * 0.5
    dx = np.broadcast_to(x[:, None, None], (32, 1, 80))
    dy = np.broadcast_to(y[None, :, None], (1, 24, 80))
    cord = np.broadcast_to((dx / 5.0) ** 2 + (dy / 3.5) ** 2 <= 1.0, (32, 24, 80)).copy()
    return CordFrame(dx, dy, z, np.full(80, 5.0), np.full(80, 3.5), cord)


def test_sci_plan_swells_the_cord_at_its_level_and_varies_in_brightness():
    from bids_app.synthetic.lesions import draw_lesions, plan_sci

    rng = np.random.default_rng(0)
    z = np.arange(0, 64.0, 0.5)
    plans = [plan_sci(z, rng) for _ in range(200)]
    assert all(8.0 <= p.length <= 30.0 and 1.5 <= p.radius <= 3.0 for p in plans)  # 3-6 mm across
    swollen = [p for p in plans if p.swelling > 0]
    assert 0.3 < len(swollen) / len(plans) < 0.7 and all(0.05 <= p.swelling <= 0.2 for p in swollen)
    plan = swollen[0]
    assert plan.swell(np.array([plan.z0]))[0] == pytest.approx(1.0 + plan.swelling)
    assert plan.swell(np.array([plan.z0 + 3 * plan.length]))[0] == pytest.approx(1.0, abs=1e-3)
    frame = _tube_frame()
    field = ndimage.gaussian_filter(rng.standard_normal(frame.cord.shape), 2.0)
    field /= field.std()
    contrast = draw_lesions("sci", frame, (0.5, 0.5, 0.5), rng, lambda m: bool(m.any()),
                            plan_sci(frame.z, rng), field)
    inside = contrast[contrast > 0]
    assert inside.size and inside.std() > 0.1 * inside.mean()  # heterogeneous, not one value


def test_ms_contrasts_run_from_faint_to_csf_like():
    from bids_app.synthetic.lesions import CSF_LIKE_CONTRAST, draw_lesions

    frame = _tube_frame()
    rng = np.random.default_rng(1)
    values = np.concatenate([np.unique(draw_lesions("ms", frame, (0.5, 0.5, 0.5), rng, lambda m: bool(m.any())))[1:]
                             for _ in range(12)])
    assert values.min() < 0.6 and values.max() > 0.8 * CSF_LIKE_CONTRAST
    assert values.max() <= CSF_LIKE_CONTRAST
