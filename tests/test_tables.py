"""The per-image lesion tables' sidecars and the dataset-level lesions.tsv, built from what is on disk."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bids_app.bids import tables
from bids_app.bids.derivatives import BIDSIGNORE_ENTRIES
from bids_app.image_outputs import image_outputs
from bids_app.io import atomic_write_json
from bids_app.segmentation.lesions import write_lesion_tsv


def finished_image(out: Path, source: str, lesions: list[dict[str, Any]], evaluation: dict[str, Any],
                   threshold: float = 0.3, done: bool = True) -> None:
    """What the participant level leaves for one image: lesion table, evaluation, mask sidecar, mask last."""
    paths = image_outputs(out, source)
    write_lesion_tsv(paths.lesion_table, lesions)
    atomic_write_json(paths.evaluation, {"image": source, **evaluation})
    atomic_write_json(paths.mask.with_name(paths.mask.name.replace(".nii.gz", ".json")),
                      {"Sources": [f"bids:raw:{source}"], "Threshold": threshold, "ProbsegThreshold": 0.9987,
                       "ThresholdSource": "calibrated"})
    if done:
        paths.mask.write_bytes(b"mask")


def lesion(volume: float, n_voxels: int, max_score: float, mean_score: float) -> dict[str, Any]:
    return {"index": 1, "volume_mm3": volume, "n_voxels": n_voxels, "max_score": max_score, "mean_score": mean_score,
            "centroid_x_mm": 0.0, "centroid_y_mm": 0.0, "centroid_z_mm": 0.0}


HEALTHY = "sub-01/anat/sub-01_T2w.nii.gz"
LESION = "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz"
TRUTH = {"dice": 0.5, "auprc": 0.25, "lesion_precision": 1.0, "lesion_recall": 0.5, "lesion_f1": 2 / 3,
         "n_true_lesions": 2, "true_volume_mm3": 30.0, "volume_error_mm3": 2.0, "fp_volume_mm3": 4.0,
         "oracle_best_dice": 0.9, "any_lesion": True}


def test_one_row_per_finished_image_with_its_lesions_threshold_and_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished_image(out, HEALTHY, [], {"any_lesion": False, "fp_volume_mm3": 0.0})
    finished_image(out, LESION, [lesion(20.0, 10, 0.999, 0.99), lesion(8.0, 30, 0.995, 0.95)], TRUTH, threshold=0.25)
    finished_image(out, "sub-03/anat/sub-03_T2w.nii.gz", [], {}, done=False)  # a crash before its mask: not done
    path = tables.write_dataset_table(out)
    assert path == out / "lesions.tsv"
    header = path.read_text().splitlines()[0].split("\t")
    assert header == list(tables.DATASET_COLUMNS)
    healthy, sick = tables.read_tsv(path)
    assert healthy["participant_id"] == "sub-01" and healthy["session_id"] == "n/a" and healthy["image"] == HEALTHY
    assert healthy["lesion_mask"] == "sub-01/anat/sub-01_label-lesion_mask.nii.gz"
    assert healthy["n_lesions"] == "0" and healthy["any_lesion"] == "false" and float(healthy["lesion_volume_mm3"]) == 0
    assert healthy["max_score"] == healthy["mean_score"] == "n/a"
    assert healthy["ground_truth"] == "false"
    assert all(healthy[k] == "n/a" for k in tables.GROUND_TRUTH_METRICS), "no ground truth, no metrics"
    assert sick["participant_id"] == "sub-02" and sick["session_id"] == "ses-1"
    assert sick["n_lesions"] == "2" and sick["any_lesion"] == "true" and float(sick["lesion_volume_mm3"]) == 28.0
    assert float(sick["max_score"]) == 0.999
    assert float(sick["mean_score"]) == pytest.approx((10 * 0.99 + 30 * 0.95) / 40), "the mean over lesion voxels"
    assert float(sick["threshold"]) == 0.25 and float(sick["probseg_threshold"]) == 0.9987
    assert sick["threshold_source"] == "calibrated" and sick["ground_truth"] == "true"
    assert float(sick["dice"]) == 0.5 and float(sick["lesion_f1"]) == pytest.approx(2 / 3, rel=1e-5)
    assert "oracle_best_dice" not in sick, "the oracle is no result to report"


def test_the_dataset_sidecar_describes_every_column(tmp_path: Path) -> None:
    path = tables.write_dataset_table(tmp_path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    header = path.read_text().splitlines()[0].split("\t")
    assert list(sidecar) == header
    for column, meta in sidecar.items():
        assert meta["LongName"] and meta["Description"], column
    assert sidecar["lesion_volume_mm3"]["Units"] == "mm^3"
    assert set(sidecar["any_lesion"]["Levels"]) == {"true", "false"}
    assert {"/lesions.tsv", "/lesions.json", "*_lesions.json"} <= set(BIDSIGNORE_ENTRIES)


def test_every_ground_truth_column_is_a_metric_the_evaluation_writes() -> None:
    import numpy as np

    from bids_app.segmentation.metrics import evaluate

    truth = np.zeros((8, 8, 8), bool)
    truth[2:4, 2:4, 2:4] = True
    row = evaluate(truth, truth.astype(np.float32), truth, np.ones_like(truth), 1.0)
    assert set(tables.GROUND_TRUTH_METRICS) <= set(row)


def test_the_lesion_table_sidecar_describes_every_column_and_where_the_levels_come_from(tmp_path: Path) -> None:
    table = write_lesion_tsv(tmp_path / "sub-01_T2w_lesions.tsv", [])
    sidecar = json.loads((tmp_path / "sub-01_T2w_lesions.json").read_text())
    assert list(sidecar) == table.read_text().splitlines()[0].split("\t")
    assert all(meta["Description"] for meta in sidecar.values())
    assert "n/a" in sidecar["vertebral_level"]["Description"]
    uri = "bids:labels:sub-01/anat/sub-01_T2w_labels-disc-manual.nii.gz"
    write_lesion_tsv(table, [], levels_from=uri)
    sidecar = json.loads((tmp_path / "sub-01_T2w_lesions.json").read_text())
    assert uri in sidecar["vertebral_level"]["Description"]
    assert sidecar["vertebral_level"]["Levels"]["3"] == "C3" and sidecar["vertebral_level"]["Levels"]["8"] == "T1"
    assert sidecar["vertebral_level"]["Levels"]["24"] == "L5" and len(sidecar["vertebral_level"]["Levels"]) == 24


def test_the_lesion_sidecar_is_one_of_the_image_outputs(tmp_path: Path) -> None:
    paths = image_outputs(tmp_path, HEALTHY)
    assert tmp_path / "sub-01" / "anat" / "sub-01_T2w_lesions.json" in paths.files


def test_jobs_rebuilding_the_table_at_once_leave_every_image_in_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sources = [f"sub-{k:02d}/anat/sub-{k:02d}_T2w.nii.gz" for k in range(1, 13)]

    def job(source: str) -> None:
        finished_image(out, source, [lesion(5.0, 5, 0.99, 0.98)], {"any_lesion": True})
        tables.write_dataset_table(out)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(job, sources))
    assert [row["image"] for row in tables.read_tsv(out / "lesions.tsv")] == sources
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_tsv_cells() -> None:
    assert [tables.format_tsv_value(v) for v in (None, math.nan, True, 1.23456789, 3, "x")] == \
        ["n/a", "n/a", "true", "1.23457", "3", "x"]
