"""Participant level end to end: every output on the native grid, valid BIDS, reruns skip done work."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app import cli
from bids_app.bids.validate import run_validator

from tests.conftest import participant_args

FAST = ["--skip-bids-validation"]
KINDS = {
    "counterfactual": "desc-counterfactual_T2w",
    "probseg": "label-lesion_probseg",
    "mask": "label-lesion_mask",
}


def outputs(out: Path, subject: str) -> dict[str, Path]:
    folder = out / f"sub-{subject}" / "anat"
    return {kind: folder / f"sub-{subject}_{name}.nii.gz" for kind, name in KINDS.items()}


@pytest.fixture(scope="module")
def segmented(simple_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("segmented") / "out"
    assert cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "01", "02", "03", "05",
                     *FAST, *participant_args(tiny_model)]) == 0
    return out


#: The simple dataset's acquisitions (participants.tsv): thick-slice ones are segmented on their own grid too.
ACQUISITION = {"01": "sag-iso", "02": "ax-thick", "03": "sag-thick", "05": "sag-iso"}


@pytest.mark.parametrize("subject", sorted(ACQUISITION))
def test_outputs_are_on_the_source_grid(segmented: Path, simple_dataset: Path, subject: str) -> None:
    rows = (simple_dataset / "participants.tsv").read_text().splitlines()
    assert f"sub-{subject}" in next(r for r in rows if r.endswith(ACQUISITION[subject]) and r.startswith(f"sub-{subject}"))
    source = nib.load(simple_dataset / f"sub-{subject}" / "anat" / f"sub-{subject}_T2w.nii.gz")
    for kind, path in outputs(segmented, subject).items():
        img = nib.load(path)
        assert img.shape == source.shape[:3], kind
        assert np.allclose(img.affine, source.affine, atol=1e-5), kind
        assert int(img.header["sform_code"]) == int(source.header["sform_code"])
        data = np.asanyarray(img.dataobj)
        assert np.isfinite(data).all()
        if kind == "mask":
            assert img.get_data_dtype() == np.uint8 and set(np.unique(data)) <= {0, 1}
        if kind == "probseg":
            assert data.min() >= 0 and data.max() <= 1
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        cord = f"bids:labels:sub-{subject}/anat/sub-{subject}_T2w_label-SC_seg.nii.gz"
        assert sidecar["Sources"] == [f"bids:raw:sub-{subject}/anat/sub-{subject}_T2w.nii.gz", cord]
        assert sidecar["CordMask"] == sidecar["AdapterControl"] == cord
        assert sidecar["ThresholdSource"] == "calibrated" and sidecar["Strengths"] == [0.5]
        # The image-level rule: the threshold predicts a 5 % healthy image false-positive rate.
        assert sidecar["CalibrationRule"] == "images" and sidecar["CalibrationImageFPR"] == 0.05
        assert sidecar["DetectionInsetMM"] == 1.0 and sidecar["ResidualGrid"] == "native"
        assert sidecar["CalibrationImages"] >= 1
        # Hysteresis: lesions grow over the unsmoothed residual to its healthy 0.995 quantile.
        assert sidecar["GrowQuantile"] == 0.995 and sidecar["GrowThreshold"] > 0
        # T2w: only brighter residuals count (polarity auto, resolved by the suffix).
        assert sidecar["ResidualPolarity"] == "bright" and sidecar["WindowOverlap"] == 0.5
        # Patched noising: one 2x2x2-latent patch at a time, the rest clean, two shifted grids.
        assert sidecar["PatchSize"] == [2, 2, 2] and sidecar["PatchOffsets"] == 2 and sidecar["PatchPeriod"] == 3
        assert sidecar["MinLesionVolumeMM3"] == 5.0 and sidecar["Samples"] == 1 and sidecar["Seed"] == 0
        assert sidecar["AdapterUsed"] is True, "the tiny model has an adapter and every phantom a cord mask"
    mask_sidecar = json.loads(outputs(segmented, subject)["mask"].with_suffix("").with_suffix(".json").read_text())
    assert mask_sidecar["Type"] == "Lesion"


def test_tables_and_evaluation(segmented: Path) -> None:
    lesion = json.loads((segmented / "sub-05" / "anat" / "sub-05_T2w_evaluation.json").read_text())
    assert {"dice", "auprc", "lesion_f1", "oracle_best_dice"} <= set(lesion)
    healthy = json.loads((segmented / "sub-01" / "anat" / "sub-01_T2w_evaluation.json").read_text())
    assert {"any_lesion", "fp_volume_mm3"} <= set(healthy)
    header = (segmented / "sub-05" / "anat" / "sub-05_T2w_lesions.tsv").read_text().splitlines()[0].split("\t")
    assert header[:2] == ["index", "volume_mm3"]
    assert (segmented / "evaluation_summary.tsv").is_file()


def test_output_dataset_passes_the_validator(segmented: Path) -> None:
    result = run_validator(segmented)
    assert not result.errors, result.errors


def test_rerun_skips_done_images_and_overwrite_redoes_them(simple_dataset: Path, tiny_model: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    args = [str(simple_dataset), str(out), "participant", "--participant-label", "02", *FAST, *participant_args(tiny_model)]
    assert cli.main(args) == 0
    mask = outputs(out, "02")["mask"]
    first = mask.stat().st_mtime_ns
    caplog.clear()
    assert cli.main(args) == 0
    assert "outputs exist, skipped" in caplog.text and mask.stat().st_mtime_ns == first
    assert cli.main(args + ["--overwrite"]) == 0
    assert mask.stat().st_mtime_ns != first


def test_interrupted_image_is_redone(simple_dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Outputs but no mask (a crash before the last write): the rerun redoes the image."""
    out = tmp_path / "out"
    args = [str(simple_dataset), str(out), "participant", "--participant-label", "03", *FAST, *participant_args(tiny_model)]
    assert cli.main(args) == 0
    paths = outputs(out, "03")
    paths["mask"].unlink()
    before = paths["counterfactual"].stat().st_mtime_ns
    assert cli.main(args) == 0
    assert paths["mask"].is_file() and paths["counterfactual"].stat().st_mtime_ns != before


def test_segmentation_is_deterministic_given_the_seed(simple_dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "06", "--n-samples", "2",
                         "--seed", "3", *FAST, *participant_args(tiny_model)]) == 0
        results.append(np.asanyarray(nib.load(outputs(out, "06")["probseg"]).dataobj))
    assert np.array_equal(*results)


def test_user_threshold_and_strength_sweep(simple_dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "04", "--threshold", "1e9",
                     "--strength-sweep", "0.2:0.4:0.2", *FAST, *participant_args(tiny_model)]) == 0
    mask = outputs(out, "04")["mask"]
    assert np.asanyarray(nib.load(mask).dataobj).sum() == 0, "nothing exceeds an enormous threshold"
    sidecar = json.loads(mask.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["ThresholdSource"] == "user" and sidecar["Threshold"] == 1e9
    sweep = sorted(p.name for p in (out / "sweep" / "sub-04" / "anat").iterdir())
    assert sweep == [f"sub-04_T2w_strength-{s}_{k}.nii.gz" for s in ("020", "040") for k in ("counterfactual", "residual")]


def test_no_adapter_flag_is_recorded(simple_dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "02", "--no-adapter",
                     *FAST, *participant_args(tiny_model)]) == 0
    sidecar = json.loads(outputs(out, "02")["mask"].with_suffix("").with_suffix(".json").read_text())
    assert sidecar["AdapterUsed"] is False


def test_adapter_scale_zero_and_a_chosen_control_derivative(dataset_copy: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [str(dataset_copy), str(out), "participant", "--participant-label", "03", *FAST, *participant_args(tiny_model)]
    assert cli.main(base + ["--adapter-scale", "0"]) == 0
    sidecar = json.loads(outputs(out, "03")["mask"].with_suffix("").with_suffix(".json").read_text())
    assert sidecar["AdapterUsed"] is False
    labels = dataset_copy / "derivatives" / "labels" / "sub-03" / "anat"
    control = labels / "sub-03_T2w_label-canal_seg.nii.gz"
    control.write_bytes((labels / "sub-03_T2w_label-SC_seg.nii.gz").read_bytes())
    config = tmp_path / "control.yaml"
    config.write_text("selection:\n  control_names: ['{stem}_label-canal_seg']\n")
    assert cli.main(base + ["--config", str(config), "--overwrite"]) == 0
    sidecar = json.loads(outputs(out, "03")["mask"].with_suffix("").with_suffix(".json").read_text())
    assert sidecar["AdapterUsed"] is True and sidecar["AdapterControl"] == f"bids:labels:sub-03/anat/{control.name}"
    assert sidecar["Sources"][-1] == sidecar["AdapterControl"], "the control derivative is a source too"


def test_report_only_rebuilds_the_summary_without_a_model(segmented: Path, simple_dataset: Path, tmp_path: Path) -> None:
    summary = segmented / "evaluation_summary.tsv"
    before = summary.read_text()
    summary.unlink()
    args = [str(simple_dataset), str(segmented), "participant", "--participant-label", "01", "05", "--report-only",
            "--model-dir", str(tmp_path / "no-model"), *FAST]
    assert cli.main(args) == 0
    assert summary.read_text() == before
    assert not (tmp_path / "no-model").exists()
    assert cli.main([str(simple_dataset), str(tmp_path / "empty"), "participant", "--report-only", *FAST]) == 66
