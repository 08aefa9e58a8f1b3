"""Runs that must not lose data or give a silently wrong result: a work dir shared by two trainings,
reruns of the group level on a finished model, output folders that are not the run's own, an edited
model card, output names that must not depend on the selection, and a contrast the model never saw.

Where data is at stake, the digest of every folder the run could touch is compared before and after.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids.derivatives import unique_output_names
from bids_app.levels import discover_inputs
from bids_app.model_card import MODEL_CARD
from bids_app.settings import build_settings
from bids_app.training.identity import IDENTITY_FILE, differences, file_sha256

from tests.conftest import participant_args, tree_digest
from tests.reliability.catalogue import case
from tests.reliability.harness import FAST, assert_one_error_line, fork_cli, kill_env, run_cli
from tests.reliability.test_interruptions import group_argv, training_config


def _changed_copy(dataset: Path, target: Path) -> Path:
    """The dataset with one healthy training image's content changed (the same names)."""
    shutil.copytree(dataset, target)
    image = target / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
    nifti = nib.load(str(image))
    data = np.asanyarray(nifti.dataobj).astype(np.float32) * 1.05
    nib.save(nib.Nifti1Image(data, nifti.affine, nifti.header), str(image))
    return target


def _model_copy(tiny_model: Path, out: Path) -> Path:
    target = out / "models"
    shutil.copytree(tiny_model, target)
    return target


def test_shared_work_dir_keeps_two_trainings_apart(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    config = training_config(tmp_path)
    out_a, out_b = tmp_path / "outA", tmp_path / "outB"
    assert run_cli(*group_argv(simple_dataset, out_a, config)) == 0
    other = _changed_copy(simple_dataset, tmp_path / "other")
    caplog.clear()
    code = run_cli(*group_argv(other, out_b, config), "-w", out_a / "work")
    item = case("shared-work-dir")
    assert code == item.exit_code, caplog.text[-2000:]
    assert all(f in caplog.text for f in item.fragments())
    assert "resuming from step" not in caplog.text
    for stage in ("vqgan", "diffusion"):
        weights_a, weights_b = (out / "models" / stage / "weights.pt" for out in (out_a, out_b))
        assert file_sha256(weights_a) != file_sha256(weights_b), stage
    card = json.loads((out_b / "models" / MODEL_CARD).read_text())
    assert "training file content differs: sub-01/anat/sub-01_T2w.nii.gz (image)" in differences(
        json.loads((out_a / "models" / MODEL_CARD).read_text())["training_identity"], card["training_identity"])


def test_resuming_another_trainings_checkpoint_is_refused(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    """Killed mid-training, then rerun on a dataset whose training image changed: exit 64, nothing changed."""
    out, config = tmp_path / "out", training_config(tmp_path)
    killed = fork_cli(group_argv(simple_dataset, out, config), kill_env("step:vqgan@3"))
    assert killed.signal is not None, killed
    other = _changed_copy(simple_dataset, tmp_path / "other")
    before = tree_digest(out / "models"), tree_digest(out / "work")
    code = run_cli(*group_argv(other, out, config))
    item = case("resume-other-data")
    assert code == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments(), "training file content differs: sub-01/anat/sub-01_T2w")
    assert str(out / "models") in line
    assert (tree_digest(out / "models"), tree_digest(out / "work")) == before


def test_rerun_with_other_settings_never_modifies_a_finished_model(simple_dataset: Path, tiny_model: Path,
                                                                   tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    models = _model_copy(tiny_model, out)
    before = tree_digest(models)
    code = run_cli(simple_dataset, out, "group", *FAST)  # the default preset, as a user who forgot --preset tiny
    assert code == case("group-rerun-same-settings").exit_code, caplog.text[-2000:]
    assert all(f in caplog.text for f in case("group-rerun-same-settings").fragments())
    assert "using the settings the model in" in caplog.text
    assert tree_digest(models) == before
    caplog.clear()
    code = run_cli(simple_dataset, out, "group", "--preset", "tiny", *FAST)  # tiny, without its --config
    item = case("group-rerun-other-settings")
    assert code == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments())
    assert "training.vqgan.max_steps: 4 -> 60" in line, line
    assert tree_digest(models) == before


def test_group_reports_only_trains_nothing(simple_dataset: Path, tiny_model: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    models = _model_copy(tiny_model, out)
    (models / MODEL_CARD).unlink()  # an unfinished model: a training run would start at once
    before = tree_digest(models)
    code = run_cli(simple_dataset, out, "group", "--preset", "tiny", "--reports-only", *FAST)
    item = case("group-reports-only")
    assert code == item.exit_code
    assert all(f in caplog.text for f in item.fragments())
    assert "training for up to" not in caplog.text
    assert tree_digest(models) == before
    assert (out / "group.html").is_file()


def test_retrain_replaces_a_finished_model(simple_dataset: Path, tiny_model: Path, tmp_path: Path, caplog) -> None:
    """--retrain is the one way to change a finished model; the identity file says what it is now."""
    out = tmp_path / "out"
    models = _model_copy(tiny_model, out)
    config = training_config(tmp_path)
    code = run_cli(simple_dataset, out, "group", "--preset", "tiny", "--config", config, "--retrain",
                   "--stages", "calibrate", *FAST)
    assert code == 0, caplog.text[-2000:]
    assert "is trained again and replaced" in caplog.text
    card = json.loads((models / MODEL_CARD).read_text())
    assert card["training_identity"] == json.loads((models / IDENTITY_FILE).read_text())
    assert card["training_identity"]["settings"]["training"]["vqgan"]["checkpoint_every"] == 2


@pytest.mark.parametrize("key", ["swapped-dirs", "output-other-derivative", "output-not-empty", "bids-inside-output"])
def test_output_dir_that_is_not_the_runs_own_is_refused(key: str, dataset_copy: Path, tiny_model: Path,
                                                        tmp_path: Path, caplog) -> None:
    labels = dataset_copy / "derivatives" / "labels"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("a user's file")
    bids, output = {
        "swapped-dirs": (tmp_path / "empty", dataset_copy),
        "output-other-derivative": (dataset_copy, labels),
        "output-not-empty": (dataset_copy, elsewhere),
        "bids-inside-output": (dataset_copy, tmp_path),
    }[key]
    Path(bids).mkdir(exist_ok=True)
    before = tree_digest(tmp_path)
    code = run_cli(bids, output, "participant", *participant_args(tiny_model), *FAST)
    item = case(key)
    assert code == item.exit_code
    assert_one_error_line(caplog, *item.fragments(), str(output))
    assert tree_digest(tmp_path) == before, "a refused run wrote something"


@pytest.mark.parametrize("flag", ["--model-dir", "-w"])
def test_model_or_work_dir_holding_a_dataset_is_refused(flag: str, dataset_copy: Path, tmp_path: Path,
                                                        caplog) -> None:
    labels = dataset_copy / "derivatives" / "labels"
    before = tree_digest(dataset_copy)
    code = run_cli(dataset_copy, tmp_path / "out", "group", "--preset", "tiny", flag, labels, *FAST)
    item = case("model-dir-is-a-dataset")
    assert code == item.exit_code
    assert_one_error_line(caplog, *item.fragments(), str(labels))
    assert tree_digest(dataset_copy) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["model-card-edited", "model-config-edited"])
def test_edited_model_card_or_config_is_refused(key: str, simple_dataset: Path, tiny_model: Path, tmp_path: Path,
                                                caplog) -> None:
    models = _model_copy(tiny_model, tmp_path / "copy")
    if key == "model-card-edited":
        culprit = models / MODEL_CARD
        card = json.loads(culprit.read_text())
        card["latent_scale"] = 0.5
        culprit.write_text(json.dumps(card, indent=2))
    else:
        culprit = models / "diffusion" / "config.json"
        config = json.loads(culprit.read_text())
        config["edited"] = True  # any change, even one that loading would not notice
        culprit.write_text(json.dumps(config))
    out = tmp_path / "out"
    code = run_cli(simple_dataset, out, "participant", "--model-dir", models, "--strength", "0.5",
                   "--participant-label", "05", *FAST)
    item = case(key)
    assert code == item.exit_code
    assert_one_error_line(caplog, *item.fragments(), str(culprit))
    assert not list(out.glob("sub-*"))


def test_output_names_do_not_depend_on_the_selection(rich_dataset: Path) -> None:
    """A T2w image beside a T1w one is named with its suffix whether the run selects one or both."""
    names = {}
    for contrasts in (["T2w"], ["T2w", "T1w"]):
        settings = build_settings({"bids_dir": rich_dataset, "output_dir": rich_dataset.parent / "unused",
                                   "analysis_level": "participant", "skip_bids_validation": True,
                                   "selection": {"contrasts": contrasts, "participant_labels": ["01"]}})
        inputs = discover_inputs(settings)
        names[tuple(contrasts)] = {r.relpath: inputs.disambiguate[r.relpath] for r in inputs.images}
    t2w = names[("T2w",)]
    assert t2w and all(t2w.values()), t2w
    assert {k: v for k, v in names[("T2w", "T1w")].items() if k in t2w} == t2w


def test_unique_output_names_count_every_dataset_image() -> None:
    t2w, t1w = "sub-01/anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz"
    assert unique_output_names([t2w]) == {t2w: False}
    assert unique_output_names([t2w], [t2w, t1w]) == {t2w: True}
    assert unique_output_names([t2w], [t2w, "sub-02/anat/sub-02_T1w.nii.gz"]) == {t2w: False}


def test_a_contrast_the_model_never_saw_is_refused_unless_allowed(rich_dataset: Path, tiny_model: Path,
                                                                   tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    argv = [rich_dataset, out, "participant", *participant_args(tiny_model), *FAST, "--contrast", "T1w",
            "--participant-label", "01", "--session-label", "1"]
    item = case("other-contrast")
    assert run_cli(*argv) == item.exit_code
    assert_one_error_line(caplog, *item.fragments(), "sub-01_ses-1_T1w.nii.gz")
    assert not list(out.glob("sub-*"))
    caplog.clear()
    allowed = case("other-contrast-allowed")
    assert run_cli(*argv, "--allow-other-contrast") == allowed.exit_code, caplog.text[-2000:]
    assert all(f in caplog.text for f in allowed.fragments())
    sidecar = json.loads(next(out.glob("sub-01/ses-1/anat/*label-lesion*mask.json")).read_text())
    assert sidecar["ModelContrasts"] == ["T2w"] and sidecar["SourceContrastTrained"] is False
    assert sidecar["ResidualPolarity"] == "dark" and sidecar["CalibratedPolarity"] == {"T2w": "bright"}


def test_checkpoint_folders_follow_the_model_not_the_mount_point(tmp_path: Path) -> None:
    from bids_app.workspace import checkpoints_dir

    a, b = tmp_path / "a", tmp_path / "moved" / "a"
    assert checkpoints_dir(a / "work", a / "models").name == checkpoints_dir(b / "work", b / "models").name
    assert checkpoints_dir(a / "work", a / "models") != checkpoints_dir(a / "work", tmp_path / "b" / "models")
