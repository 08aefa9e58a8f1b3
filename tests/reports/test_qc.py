"""What the QC views and the index show, checked on arrays and on the report fixture's pages (no browser):
the score coloured only above the threshold, voxels as whole pixel blocks, outlines around exactly the
lesion, lesion crops numbered as the lesion table, flags, and no host path of the output dir."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.reports import render, viewer
from bids_app.reports.index import build_index
from bids_app.reports.outputs import ImageOutputs
from bids_app.reports.volumes import lesion_components, load_volumes
from bids_app.segmentation.lesions import lesion_table
from tests.reports.page import read_page

STEMS = {"01": "sub-01_T2w", "05": "sub-05_T2w"}


def cut(score: np.ndarray, mask: np.ndarray | None = None, truth: np.ndarray | None = None) -> render.Cut:
    background = np.linspace(0, 1, score.size, dtype=np.float32).reshape(score.shape)
    return render.Cut(background, background[::-1].copy(), score,
                      mask if mask is not None else np.zeros(score.shape, bool), truth)


def test_the_score_layer_colours_exactly_the_voxels_above_the_threshold() -> None:
    score = np.array([[0.5, 0.9, 0.95], [0.96, 1.0, 0.2]], np.float32)
    drawn = render.layers(cut(score), (0.0, 1.0), threshold=0.95, reps=(1, 1))
    coloured = np.any(drawn["score"] != drawn["original"], axis=2)
    assert coloured.tolist() == [[False, False, False], [True, True, False]], "strictly above 0.95 only"
    assert set(drawn) == {"original", "counterfactual", "score", "lesions"}
    grey = drawn["original"]
    assert np.array_equal(grey[..., 0], grey[..., 2]), "the image itself is drawn in grey"


@pytest.mark.parametrize("spacing, ppm, reps", [((1.0, 1.0), 8.0, (8, 8)), ((3.0, 0.5), 4.0, (12, 2)),
                                                 ((0.8, 0.8), 0.2, (1, 1))])
def test_every_voxel_is_a_block_of_whole_pixels(spacing, ppm, reps) -> None:
    assert render.repeats(spacing, ppm) == reps, "physical aspect kept, never fewer pixels than voxels"
    image = np.arange(6, dtype=np.uint8).reshape(2, 3)
    big = render.upscale(image, reps)
    assert big.shape == (2 * reps[0], 3 * reps[1])
    assert np.array_equal(big[:: reps[0], :: reps[1]], image) and set(np.unique(big)) == set(image.ravel()), \
        "no interpolated value"


def test_outlines_surround_the_lesion_and_leave_its_voxels_visible() -> None:
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True
    truth = mask.copy()
    drawn = render.layers(cut(np.zeros((7, 7), np.float32), mask, truth), (0.0, 1.0), 1.0, reps=(4, 4))["lesions"]
    original = render.upscale(render.grey(cut(np.zeros((7, 7)), mask).background, (0.0, 1.0)), (4, 4))
    block = (slice(12, 16), slice(12, 16))
    assert np.array_equal(drawn[block], original[block]), "the lesion voxel itself is not painted over"
    yellow = np.all(drawn == render.PREDICTION_RGB, axis=2)
    cyan = np.all(drawn == render.TRUTH_RGB, axis=2)
    assert yellow[11, 13] and yellow[13, 16] and not yellow[block].any()
    assert cyan[9, 13] and not cyan[11, 13], "the ground truth just outside the prediction's outline"
    empty = render.layers(cut(np.zeros((7, 7), np.float32)), (0.0, 1.0), 1.0, (4, 4))["lesions"]
    assert not np.all(empty == render.PREDICTION_RGB, axis=2).any(), "no lesion, no outline"


def test_the_score_threshold_comes_from_the_sidecar_or_is_stated() -> None:
    calibrated = viewer.score_threshold({"ProbsegThreshold": 0.9931, "ThresholdSource": "calibrated"})
    assert (calibrated.value, calibrated.source) == (0.9931, "ProbsegThreshold")
    assert "0.9931" in calibrated.text and "calibrated" in calibrated.text
    assert "--threshold" in viewer.score_threshold({"ProbsegThreshold": 0.9, "ThresholdSource": "user"}).text
    stated = viewer.score_threshold({"Threshold": 0.05})
    assert stated.value == viewer.FALLBACK_QUANTILE and "stated healthy quantile" in stated.text


def test_lesion_crops_are_numbered_as_the_lesion_table(tmp_path: Path) -> None:
    """Two lesions of equal size in an LPI-stored image: the tie goes to the first in the native voxel
    order, as in the lesion TSV, although the report reorients to RAS (which reverses that order)."""
    mask = np.zeros((12, 10, 16), np.float32)
    mask[2:4, 2:4, 2:4] = 1  # first in the native order
    mask[8:10, 6:8, 11:13] = 1
    mask[5, 5, 7] = 1  # smallest: last
    affine = np.diag([-1.0, -1.0, -2.0, 1.0])
    assert nib.aff2axcodes(affine) == ("L", "P", "I")
    paths = {}
    for name, data in (("mask", mask), ("probseg", mask * 0.99), ("image", mask * 100)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    image = ImageOutputs(source="sub-01/anat/sub-01_T2w.nii.gz", stem="sub-01_T2w", subject="01", session=None,
                         mask=paths["mask"], probseg=paths["probseg"], counterfactual=tmp_path / "none.nii.gz",
                         lesions_tsv=tmp_path / "none.tsv", evaluation_json=tmp_path / "none.json", sidecar={},
                         image=paths["image"], cord_mask=None, truth=None)
    volumes = load_volumes(image)
    lesions = lesion_components(volumes)
    rows = lesion_table(mask > 0, None, affine)
    assert [le.index for le in lesions] == [r["index"] for r in rows] == [1, 2, 3]
    assert [le.n_voxels for le in lesions] == [r["n_voxels"] for r in rows] == [8, 8, 1]
    native = nib.orientations.apply_orientation(
        np.indices(mask.shape).transpose(1, 2, 3, 0), volumes.ornt)[volumes.box]  # native index of each RAS voxel
    for lesion, row in zip(lesions, rows):
        centre = nib.affines.apply_affine(affine, native[lesion.centre])
        assert np.allclose(centre, [row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]], atol=2.0)


def test_every_image_gets_its_views_and_crops(report_run: Path) -> None:
    for label, stem in STEMS.items():
        views = viewer.read_views(report_run, stem)
        lesions = (report_run / f"sub-{label}" / "anat" / f"{stem}_lesions.tsv").read_text().splitlines()[1:]
        keys = [p.key for p in views.panels]
        assert keys == ["sagittal", "axial"] + [f"lesion-{k}" for k in range(1, min(len(lesions), 8) + 1)]
        for panel in views.panels:
            assert set(panel.layers) == {"original", "counterfactual", "score", "lesions"}
            sizes = set()
            for path in panel.layers.values():
                from PIL import Image

                with Image.open(report_run / path) as shown:
                    sizes.add(shown.size)
            assert sizes == {(panel.width, panel.height)}, "the layers of a view stack exactly"
        sidecar = json.loads((report_run / f"sub-{label}" / "anat" / f"sub-{label}_label-lesion_mask.json").read_text())
        assert views.threshold == viewer.score_threshold(sidecar)
        page = read_page(report_run / f"sub-{label}.html")
        assert {f"{stem}-{key}" for key in keys} <= page.ids


def test_the_participant_page_marks_training_participants_and_links_the_other_pages(report_run: Path) -> None:
    text = {label: (report_run / f"sub-{label}.html").read_text() for label in STEMS}
    split = json.loads((Path(read_record(report_run)["settings"]["model_dir"]) / "split.json").read_text())
    assert "sub-01" in split["train"] and "sub-05" not in split["train"] + split["validation"]
    badge = ">training participant</span>"
    assert badge in text["01"] and badge not in text["05"]
    for label, stem in STEMS.items():
        urls = read_page(report_run / f"sub-{label}.html").urls
        assert "group.html" in urls and f"index.html#{stem}" in urls


def read_record(out: Path) -> dict:
    return json.loads(next((out / "logs").glob("run_participant_*.json")).read_text())


def test_the_index_lists_every_image_with_its_numbers_and_flags(report_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(report_run, out)
    record = read_record(out)
    record["segmentation"]["failed"] = [{"image": "sub-03/ses-2/anat/sub-03_ses-2_T2w.nii.gz", "exit_code": 65,
                                         "error": "the cord mask is empty", "crash_report": str(out / "logs/c.txt")}]
    (out / "logs" / "run_participant_29990101-000000_x.json").write_text(json.dumps(record))
    page = read_page(build_index(out))
    rows = page.rows("qc-table")
    assert [r[1:4] for r in rows] == [["sub-01", "n/a", "sub-01_T2w"], ["sub-03", "ses-2", "sub-03_ses-2_T2w"],
                                      ["sub-05", "n/a", "sub-05_T2w"]]
    for row, label in ((rows[0], "01"), (rows[2], "05")):
        evaluation = json.loads((out / f"sub-{label}" / "anat" / f"{STEMS[label]}_evaluation.json").read_text())
        lesions = (out / f"sub-{label}" / "anat" / f"{STEMS[label]}_lesions.tsv").read_text().splitlines()
        header = lesions[0].split("\t")
        scores = [float(line.split("\t")[header.index("max_score")]) for line in lesions[1:]]
        assert int(row[4]) == evaluation["n_lesions"] and float(row[5]) == pytest.approx(
            evaluation["lesion_volume_mm3"], rel=1e-3)
        assert float(row[6]) == pytest.approx(max(scores), rel=1e-3)
    split = json.loads((Path(record["settings"]["model_dir"]) / "split.json").read_text())
    role = "calibration participant" if "sub-03" in split["validation"] else ""
    assert "training participant" in rows[0][7] and "ground truth" in rows[2][7] and rows[1][7] == f"{role}failed"
    text = (out / "index.html").read_text()
    assert "the cord mask is empty" in text and "Crash report: logs/c.txt" in text
    assert {"preview-sub-01_T2w", "preview-sub-03_ses-2_T2w", "preview-sub-05_T2w"} <= page.ids


def test_no_page_holds_the_output_dirs_absolute_path(report_run: Path) -> None:
    pages = [*report_run.glob("*.html"), *(report_run / "figures").glob("*.json")]
    assert {p.name for p in pages} >= {"index.html", "group.html", "sub-01.html", "sub-05.html"}
    for path in pages:
        assert str(report_run) not in path.read_text(), path.name
