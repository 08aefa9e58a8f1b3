"""Settings and inputs that once crashed (exit 1 with a traceback), and mask discovery that once read
counterseg's own earlier output as ground truth (the catalogue's SETTINGS_AND_INPUTS).

Each case runs the CLI and checks the exit code, the one error line, and that the input dataset is
unchanged. Settings are refused where they are built, before anything is written, at both levels.
Bad data is run at the group level: it checks every training image before any work, whatever the
model directory holds, so these cases need no trained model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids.derivatives import write_dataset_description
from tests.conftest import tree_digest

from tests.reliability.catalogue import Case, case
from tests.reliability.harness import FAST, assert_one_error_line, run_cli

LEVELS = ("participant", "group")

#: Settings cases: (case, flags, config file text or None).
SETTINGS = [
    (case("threshold-nan"), ["--threshold", "nan"], None),
    (case("threshold-inf"), ["--threshold", "inf"], None),
    (case("adapter-scale-nan"), [], 'segmentation:\n  counterfactual:\n    adapter_scale: "nan"\n'),
    (case("seed-too-large"), ["--seed", str(2**64)], None),
    (case("seed-negative"), ["--seed", "-1"], None),
    (case("checkpoint-every-zero"), [], "training:\n  vqgan:\n    checkpoint_every: 0\n"),
    (case("log-every-zero"), [], "training:\n  diffusion:\n    log_every: 0\n"),
    (case("shape-multiple-zero"), [], "preprocessing:\n  shape_multiple: 0\n"),
    (case("target-spacing-zero"), [], "preprocessing:\n  target_spacing: [0, 1, 1]\n"),
    (case("percentiles-decreasing"), [], "preprocessing:\n  percentiles: [99.5, 0.5]\n"),
    (case("learning-rate-nan"), [], 'training:\n  adapter:\n    learning_rate: "nan"\n'),
    (case("max-steps-zero"), [], "training:\n  vqgan:\n    max_steps: 0\n"),
    (case("max-steps-negative"), [], "training:\n  diffusion:\n    max_steps: -1\n"),
    (case("max-nonfinite-negative"), [], "preprocessing:\n  max_nonfinite_fraction: -1\n"),
]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("item, flags, config", SETTINGS, ids=[row[0].key for row in SETTINGS])
def test_a_bad_setting_is_a_usage_error_at_either_level(item: Case, flags: list[str], config: str | None, level: str,
                                                        simple_dataset: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """One rule per setting for both levels: refused where the settings are built, nothing written."""
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
        flags = [*flags, "--config", tmp_path / "config.yaml"]
    out = tmp_path / "out"
    before = tree_digest(simple_dataset)
    assert run_cli(simple_dataset, out, level, *FAST, *flags) == item.exit_code
    assert_one_error_line(caplog, *item.fragments())
    assert not out.exists(), "a refused run created its output_dir"
    assert tree_digest(simple_dataset) == before


def test_the_largest_seed_is_accepted_at_both_levels(simple_dataset: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for level in LEVELS:
        assert run_cli(simple_dataset, tmp_path / "out", level, *FAST, "--seed", 2**32 - 1, "--dry-run") == 0
    assert "training participants: sub-01, sub-02, sub-03, sub-04" in capsys.readouterr().out


def test_a_list_flag_given_twice_keeps_both_lists(simple_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    item = case("participant-label-twice")
    assert run_cli(simple_dataset, tmp_path / "out", "participant", *FAST, "--participant-label", "01",
                   "--participant-label", "sub-05", "--dry-run") == item.exit_code
    listing = capsys.readouterr().out
    assert all(f in listing for f in item.fragments())
    assert "sub-01_T2w.nii.gz" in listing and "sub-05_T2w.nii.gz" in listing


def test_an_unknown_architecture_key_is_refused_before_training(simple_dataset: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text("models:\n  vqgan:\n    colour: 1\n")
    out = tmp_path / "out"
    item = case("model-override-unknown")
    assert run_cli(simple_dataset, out, "group", "--preset", "tiny", "--config", tmp_path / "config.yaml",
                   *FAST) == item.exit_code
    assert_one_error_line(caplog, *item.fragments())
    assert not (out / "models").exists(), "nothing of a model is written before the settings are known good"


# ----------------------------------------------------------------------------------- bad data


def _image(bids: Path, subject: str = "01", suffix: str = "T2w", ext: str = ".nii.gz") -> Path:
    return bids / f"sub-{subject}" / "anat" / f"sub-{subject}_{suffix}{ext}"


def _resave(path: Path, data: np.ndarray, target: Path | None = None, orient: bool = True) -> None:
    """``data`` on ``path``'s grid, saved to ``target`` (default: over ``path``) in data's own dtype."""
    img = nib.load(str(path))
    new = nib.Nifti1Image(data, img.affine)
    if not orient:
        new.set_qform(None, code=0)
        new.set_sform(None, code=0)
    nib.save(new, str(target or path))


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def rgb_image(bids: Path) -> Path:
    grey = _voxels(_image(bids))
    level = np.clip(grey / max(float(grey.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for channel in "RGB":
        rgb[channel] = level
    _resave(_image(bids), rgb)
    return _image(bids)


def nii_and_nii_gz(bids: Path) -> Path:
    _resave(_image(bids), _voxels(_image(bids)), target=_image(bids, ext=".nii"))
    return _image(bids, ext=".nii")


def float64_beyond_float32(bids: Path) -> Path:
    data = _voxels(_image(bids)).astype(np.float64)
    data.flat[data.size // 2] = 1e39
    _resave(_image(bids), data)
    return _image(bids)


BAD_DATA = [(case("rgb-image"), rgb_image), (case("nii-and-nii-gz"), nii_and_nii_gz),
            (case("float64-beyond-float32"), float64_beyond_float32)]


@pytest.mark.parametrize("item, damage", BAD_DATA, ids=[row[0].key for row in BAD_DATA])
def test_bad_data_is_refused_naming_the_file(item: Case, damage, dataset_copy: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    culprit = damage(dataset_copy)
    before = tree_digest(dataset_copy)
    assert run_cli(dataset_copy, tmp_path / "out", "group", *FAST, "--preset", "tiny") == item.exit_code, \
        caplog.text[-3000:]
    line = assert_one_error_line(caplog, *item.fragments(), str(culprit))
    if item.key == "nii-and-nii-gz":
        assert str(_image(dataset_copy)) in line, line  # both files are named
    assert tree_digest(dataset_copy) == before
    assert not (tmp_path / "out" / "models" / "model_card.json").exists()


def test_a_float64_image_within_float32_is_accepted(dataset_copy: Path) -> None:
    """The float32-range check refuses what does not fit, not float64 files as such."""
    from bids_app.bids.images import check_record
    from bids_app.bids.layout import ImageRecord

    _resave(_image(dataset_copy), _voxels(_image(dataset_copy)).astype(np.float64))
    check_record(ImageRecord(_image(dataset_copy), "sub-01/anat/sub-01_T2w.nii.gz", "01", None, "T2w"), 0.0)


def test_a_label_without_the_contrast_says_what_the_participant_has(dataset_copy: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    item = case("label-lacks-contrast")
    shutil.copy(_image(dataset_copy, "02"), _image(dataset_copy, "02", "T1w"))
    before = tree_digest(dataset_copy)
    code = run_cli(dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run", "--participant-label", "01",
                   "--contrast", "T1w")
    assert code == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments())
    assert "not found" not in line
    assert tree_digest(dataset_copy) == before


def test_a_label_that_does_not_exist_is_still_not_found(dataset_copy: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    code = run_cli(dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run", "--participant-label", "09")
    assert code == 18
    assert_one_error_line(caplog, "participant label(s) not found in the dataset: 09 (available: 01, 02")


def _add_participant(bids: Path, source: str, new: str) -> None:
    """A copy of one participant's images under a new label (as a newly acquired participant)."""
    folder = bids / f"sub-{new}" / "anat"
    folder.mkdir(parents=True)
    for path in (bids / f"sub-{source}" / "anat").iterdir():
        shutil.copy(path, folder / path.name.replace(f"sub-{source}", f"sub-{new}"))


def test_a_stale_database_is_not_trusted(dataset_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    item = case("stale-database")
    database = tmp_path / "pybids"
    argv = [dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run", "--bids-database-dir", database]
    assert run_cli(*argv) == 0
    assert "sub-07" not in capsys.readouterr().out
    _add_participant(dataset_copy, "01", "07")
    before = tree_digest(dataset_copy)
    assert run_cli(*argv) == item.exit_code
    assert "sub-07/anat/sub-07_T2w.nii.gz" in capsys.readouterr().out
    assert all(fragment in caplog.text for fragment in item.fragments()), caplog.text[-2000:]
    assert tree_digest(dataset_copy) == before
    caplog.clear()
    assert run_cli(*argv, "--reset-database") == 0  # rebuilt: up to date, no warning
    assert not [r for r in caplog.records if "is stale" in r.getMessage()]


def test_an_image_without_orientation_warns(dataset_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    item = case("no-orientation")
    _resave(_image(dataset_copy), _voxels(_image(dataset_copy)), orient=False)
    code = run_cli(dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run", "--participant-label", "01")
    assert code == item.exit_code
    warnings = [r.getMessage() for r in caplog.records if "qform_code" in r.getMessage()]
    assert len(warnings) == 1 and str(_image(dataset_copy)) in warnings[0], warnings
    assert all(fragment in warnings[0] for fragment in item.fragments()), warnings[0]


def test_an_oriented_image_does_not_warn(dataset_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert run_cli(dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run") == 0
    assert "qform_code" not in caplog.text


# ------------------------------------------------------------------- its own output is no ground truth


def _earlier_prediction(folder: Path, bids: Path) -> Path:
    """What an earlier participant-level run left: an empty lesion mask for healthy sub-01 and the
    dataset_description.json naming counterseg."""
    mask = folder / "sub-01" / "anat" / "sub-01_label-lesion_mask.nii.gz"
    mask.parent.mkdir(parents=True)
    img = nib.load(str(_image(bids)))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, dtype=np.uint8), img.affine), str(mask))
    write_dataset_description(folder, "0.0.0", bids)
    return mask


def _dry_run_group(bids: Path, out: Path, *flags: object) -> int:
    return run_cli(bids, out, "group", *FAST, "--dry-run", *flags)


def test_an_earlier_counterseg_output_in_derivatives_is_not_ground_truth(
        dataset_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The group dry run keeps healthy sub-01, although an earlier run predicted (an empty) lesion mask for it."""
    item = case("earlier-output-in-derivatives")
    earlier = dataset_copy / "derivatives" / "counterseg"
    _earlier_prediction(earlier, dataset_copy)
    before = tree_digest(dataset_copy)
    assert _dry_run_group(dataset_copy, tmp_path / "out") == item.exit_code
    listing = capsys.readouterr().out
    assert "training participants: sub-01, sub-02, sub-03, sub-04" in listing, listing
    assert "excluded sub-01" not in listing and "label-lesion_mask" not in listing
    assert all(fragment in caplog.text for fragment in item.fragments()), caplog.text[-2000:]
    assert str(earlier) in caplog.text
    assert tree_digest(dataset_copy) == before


def test_the_output_dir_through_a_symlink_is_not_ground_truth(dataset_copy: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The folder's resolved path is the output_dir's: skipped for that, whatever its description says."""
    item = case("output-dir-symlinked")
    out = tmp_path / "out"
    _earlier_prediction(out, dataset_copy)
    (dataset_copy / "derivatives" / "latest").symlink_to(out, target_is_directory=True)
    before = tree_digest(dataset_copy)
    assert _dry_run_group(dataset_copy, out) == item.exit_code
    assert "training participants: sub-01, sub-02, sub-03, sub-04" in capsys.readouterr().out
    assert all(fragment in caplog.text for fragment in item.fragments()), caplog.text[-2000:]
    assert tree_digest(dataset_copy) == before


@pytest.mark.parametrize("which", ["derivatives-earlier-output", "derivatives-output-dir"])
def test_derivatives_naming_a_counterseg_output_is_refused(which: str, dataset_copy: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Asked for by name, such a folder is refused rather than skipped: the user meant it to hold masks."""
    item = {"derivatives-earlier-output": case("derivatives-earlier-output"),
            "derivatives-output-dir": case("derivatives-output-dir")}[which]
    out = tmp_path / "out"
    earlier = tmp_path / "earlier" if which == "derivatives-earlier-output" else out
    _earlier_prediction(earlier, dataset_copy)
    labels = dataset_copy / "derivatives" / "labels"
    before = tree_digest(dataset_copy)
    assert _dry_run_group(dataset_copy, out, "--derivatives", labels, earlier) == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments())
    assert f"--derivatives {earlier}" in line, line
    assert tree_digest(dataset_copy) == before


def test_a_reference_dataset_is_still_searched(dataset_copy: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The masks' own dataset (not generated by counterseg) keeps being read, beside a skipped earlier output."""
    _earlier_prediction(dataset_copy / "derivatives" / "counterseg", dataset_copy)
    description = dataset_copy / "derivatives" / "labels" / "dataset_description.json"
    generated = json.loads(description.read_text()).get("GeneratedBy", [])
    assert all(g.get("Name") != "counterseg" for g in generated)
    assert run_cli(dataset_copy, tmp_path / "out", "participant", *FAST, "--dry-run", "--participant-label", "05") == 0
    assert "lesion mask: derivatives/labels/sub-05/anat/sub-05_T2w_label-lesion_seg.nii.gz" in capsys.readouterr().out
