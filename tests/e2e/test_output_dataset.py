"""The participant level's output as a user gets it: valid BIDS with no warning, no host path in any
file, tables for statistics, vertebral levels from disc labels, and a probseg that gives the mask back."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app import cli, participant
from bids_app.bids.links import resolve_bids_uri
from bids_app.bids.tables import DATASET_COLUMNS, read_tsv
from bids_app.bids.validate import find_validator, run_validator
from bids_app.segmentation.lesions import label_components
from bids_app.segmentation.vertebrae import level_at, read_vertebral_labels

from tests.conftest import LESION_THRESHOLD, participant_args

SUBJECTS = ("01", "05")  # a healthy participant, and one with lesions and a ground-truth mask
DISCS = "sub-05_T2w_labels-disc-manual.nii.gz"


@dataclass
class Run:
    root: Path  # the folder holding both the input and the output: no output file may name it
    bids: Path
    out: Path
    candidates: list[np.ndarray] = field(default_factory=list)  # per image: residual > threshold, where sought
    regions: list[np.ndarray] = field(default_factory=list)


def add_disc_labels(bids: Path) -> Path:
    """Five disc labels (3 = C2/C3 ... 7 = C6/C7) spread along sub-05's cord mask, top to bottom."""
    anat = bids / "derivatives" / "labels" / "sub-05" / "anat"
    cord = nib.load(anat / "sub-05_T2w_label-SC_seg.nii.gz")
    ijk = np.argwhere(np.asanyarray(cord.dataobj) > 0)
    world = ijk @ cord.affine[:3, :3].T + cord.affine[:3, 3]
    axis = np.linalg.svd(world - world.mean(axis=0), full_matrices=False)[2][0]
    along = (world - world.mean(axis=0)) @ axis
    labels = np.zeros(cord.shape, np.uint8)
    for value, quantile in zip(range(3, 8), (0.95, 0.75, 0.5, 0.25, 0.05)):
        nearest = np.argmin(np.abs(along - np.quantile(along, quantile)))
        labels[tuple(ijk[nearest])] = value
    path = anat / DISCS
    nib.save(nib.Nifti1Image(labels, cord.affine), path)
    return path


@pytest.fixture(scope="module")
def run(simple_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("output_dataset")
    bids = root / "bids"
    shutil.copytree(simple_dataset, bids)
    add_disc_labels(bids)
    result = Run(root, bids, root / "out")
    real = participant.lesion_mask

    def spy(residual, region, threshold, *args, detection_region=None, **kwargs):
        sought = np.asarray(region, bool) & (np.asarray(detection_region, bool) if detection_region is not None else True)
        result.candidates.append((np.asarray(residual) > threshold) & sought)
        result.regions.append(np.asarray(region, bool))
        return real(residual, region, threshold, *args, detection_region=detection_region, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(participant, "lesion_mask", spy)
        assert cli.main([str(bids), str(result.out), "participant", "--participant-label", *SUBJECTS,
                         "--skip-bids-validation", "--threshold", str(LESION_THRESHOLD),
                         *participant_args(tiny_model)]) == 0
    assert len(result.candidates) == len(SUBJECTS)
    return result


def anat(run: Run, subject: str) -> Path:
    return run.out / f"sub-{subject}" / "anat"


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def test_thresholding_the_probseg_gives_the_mask_before_size_filter_and_growth(run: Run) -> None:
    """What the sidecars promise, on the files written: ``probseg > ProbsegThreshold``, deeper than
    DetectionInsetMM inside the region where the probseg is above 0, is exactly the run's lesion candidates."""
    found = 0
    for subject, candidates, region in zip(SUBJECTS, run.candidates, run.regions):
        probseg_path = anat(run, subject) / f"sub-{subject}_label-lesion_probseg.nii.gz"
        mask_path = anat(run, subject) / f"sub-{subject}_label-lesion_mask.nii.gz"
        probseg_img = nib.load(probseg_path)
        probseg = np.asanyarray(probseg_img.dataobj)
        meta = sidecar(mask_path)
        assert sidecar(probseg_path)["ProbsegThreshold"] == meta["ProbsegThreshold"]
        np.testing.assert_array_equal(probseg > 0, region, err_msg="probseg > 0 is the analysis region")
        # The detection region by hand, as a user would: depth below the region's surface in mm.
        zooms = probseg_img.header.get_zooms()[:3]
        inside = np.pad(probseg > 0, 1)
        depth = ndimage.distance_transform_edt(inside, sampling=zooms)[1:-1, 1:-1, 1:-1]
        deep = (probseg > 0) & (depth > meta["DetectionInsetMM"] + 1e-6)
        deep = deep if deep.any() else probseg > 0
        np.testing.assert_array_equal((probseg > meta["ProbsegThreshold"]) & deep, candidates)
        # ... and the mask grew from them: every lesion holds a candidate, and none lies outside the region.
        mask = np.asanyarray(nib.load(mask_path).dataobj) > 0
        labels, count = label_components(mask)
        assert all((candidates & (labels == k)).any() for k in range(1, count + 1))
        assert not (mask & ~region).any()
        found += int(candidates.sum())
    assert found > 0, "a lesion image with no candidate would make this test vacuous"


def test_no_output_names_a_host_path(run: Run) -> None:
    """Every JSON, TSV and text file of the output dataset (logs/ is the run's own record, kept apart)."""
    needles = {str(run.root), str(run.root.resolve())}
    checked = []
    for path in sorted(run.out.rglob("*")):
        if not path.is_file() or path.relative_to(run.out).parts[0] == "logs":
            continue
        if path.suffix in (".json", ".tsv", ".md") or path.name == ".bidsignore":
            text = path.read_text(encoding="utf-8")
            assert not [n for n in needles if n in text], f"{path.relative_to(run.out)} names {run.root}"
            checked.append(path.relative_to(run.out).as_posix())
    assert {"dataset_description.json", "lesions.tsv", "lesions.json", "README.md",
            "sub-05/anat/sub-05_label-lesion_mask.json", "sub-05/anat/sub-05_T2w_lesions.tsv",
            "sub-05/anat/sub-05_T2w_lesions.json", "sub-05/anat/sub-05_T2w_evaluation.json"} <= set(checked)


def test_inputs_are_bids_uris_of_linked_datasets(run: Run) -> None:
    description = json.loads((run.out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../bids", "labels": "../bids/derivatives/labels"}
    assert [entry["URL"] for entry in description["SourceDatasets"]] == ["../bids", "../bids/derivatives/labels"]
    assert description["License"] and len(description["Authors"]) >= 2 and description["HowToAcknowledge"]
    assert "CodeURL" not in description["GeneratedBy"][0]
    meta = sidecar(anat(run, "05") / "sub-05_label-lesion_mask.nii.gz")
    cord = "bids:labels:sub-05/anat/sub-05_T2w_label-SC_seg.nii.gz"
    assert meta["CordMask"] == cord and meta["Sources"] == ["bids:raw:sub-05/anat/sub-05_T2w.nii.gz", cord]
    assert resolve_bids_uri(meta["CordMask"], run.out) == (run.bids / "derivatives" / "labels" / cord[12:]).resolve()
    assert (run.out / "README.md").read_text().startswith("# counterseg derivatives")


@pytest.mark.skipif(find_validator() is None, reason="bids-validator-deno not installed")
def test_the_output_passes_the_validator_without_a_warning(run: Run) -> None:
    result = run_validator(run.out)
    assert result.errors == () and result.warnings == (), (result.errors, result.warnings)


def test_the_dataset_table_has_a_row_per_image(run: Run) -> None:
    rows = read_tsv(run.out / "lesions.tsv")
    assert [row["image"] for row in rows] == [f"sub-{s}/anat/sub-{s}_T2w.nii.gz" for s in SUBJECTS]
    assert list(rows[0]) == list(DATASET_COLUMNS)
    assert list(json.loads((run.out / "lesions.json").read_text())) == list(DATASET_COLUMNS)
    for subject, row in zip(SUBJECTS, rows):
        lesions = read_tsv(anat(run, subject) / f"sub-{subject}_T2w_lesions.tsv")
        meta = sidecar(anat(run, subject) / f"sub-{subject}_label-lesion_mask.nii.gz")
        evaluation = json.loads((anat(run, subject) / f"sub-{subject}_T2w_evaluation.json").read_text())
        assert row["participant_id"] == f"sub-{subject}" and row["session_id"] == "n/a"
        assert int(row["n_lesions"]) == len(lesions) == evaluation["n_lesions"]
        assert float(row["lesion_volume_mm3"]) == pytest.approx(evaluation["lesion_volume_mm3"], rel=1e-4, abs=1e-3)
        assert row["any_lesion"] == ("true" if lesions else "false")
        assert float(row["threshold"]) == pytest.approx(meta["Threshold"], rel=1e-5)
        assert float(row["probseg_threshold"]) == pytest.approx(meta["ProbsegThreshold"], rel=1e-5)
    healthy, lesion = rows
    assert healthy["ground_truth"] == "false" and healthy["dice"] == "n/a"
    assert lesion["ground_truth"] == "true"
    evaluation = json.loads((anat(run, "05") / "sub-05_T2w_evaluation.json").read_text())
    assert float(lesion["dice"]) == pytest.approx(evaluation["dice"], rel=1e-5, abs=1e-6)


def test_lesions_get_their_vertebral_level_where_disc_labels_exist(run: Run) -> None:
    uri = f"bids:labels:sub-05/anat/{DISCS}"
    meta = json.loads((anat(run, "05") / "sub-05_T2w_lesions.json").read_text())
    assert uri in meta["vertebral_level"]["Description"] and meta["vertebral_level"]["Levels"]["3"] == "C3"
    assert "no disc labels" in json.loads((anat(run, "01") / "sub-01_T2w_lesions.json").read_text())[
        "vertebral_level"]["Description"]
    labels = read_vertebral_labels(resolve_bids_uri(uri, run.out))
    rows = read_tsv(anat(run, "05") / "sub-05_T2w_lesions.tsv")
    assert rows, "the lesion image has lesions to place"
    for row in rows:
        expected = level_at(labels, [float(row[f"centroid_{a}_mm"]) for a in "xyz"])
        assert row["vertebral_level"] == ("n/a" if expected is None else str(expected))
    assert any(row["vertebral_level"] in {"3", "4", "5", "6"} for row in rows), "levels between the labelled discs"
