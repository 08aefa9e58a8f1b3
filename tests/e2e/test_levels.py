"""Both levels end to end on synthetic BIDS datasets: selection, records, outputs, dry runs."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bids_app.workspace import checkpoints_dir
from bids_app import cli
from bids_app.bids.validate import run_validator
from bids_app.errors import ExitCode

from tests.conftest import TINY_TRAINING, participant_args, tree_digest

FAST = ["--skip-bids-validation"]
PLAN = ["--stages", "plan"]


def run_cli(*args: object) -> int:
    return cli.main([str(a) for a in args])


def run_record(out: Path, level: str) -> dict:
    records = sorted((out / "logs").glob(f"run_{level}_*.json"))
    assert records, f"no run record for {level}"
    return json.loads(records[-1].read_text())


def test_group_level_selects_healthy_participants(simple_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "group", *FAST, *PLAN) == 0
    training = run_record(out, "group")["training"]
    assert training["participants"] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert training["excluded"] == {"sub-05": "pathology=MS", "sub-06": "pathology=MS"}
    assert training["images"] == [f"sub-0{i}/anat/sub-0{i}_T2w.nii.gz" for i in range(1, 5)]


def test_healthy_filter_changes_the_column_and_value(dataset_copy: Path, tmp_path: Path) -> None:
    tsv = dataset_copy / "participants.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    header = rows[0] + ["group"]
    body = [row + (["control"] if row[0] in ("sub-01", "sub-02") else ["patient"]) for row in rows[1:]]
    tsv.write_text("\n".join("\t".join(r) for r in [header, *body]) + "\n")
    out = tmp_path / "out"
    assert run_cli(dataset_copy, out, "group", "--healthy-filter", "group=control", *FAST, *PLAN) == 0
    assert run_record(out, "group")["training"]["participants"] == ["sub-01", "sub-02"]


def test_a_lesion_mask_excludes_a_participant_marked_healthy(dataset_copy: Path, tmp_path: Path) -> None:
    labels = dataset_copy / "derivatives" / "labels" / "sub-02" / "anat"
    shutil.copy(labels / "sub-02_T2w_label-SC_seg.nii.gz", labels / "sub-02_T2w_label-lesion_seg.nii.gz")
    out = tmp_path / "out"
    assert run_cli(dataset_copy, out, "group", *FAST, *PLAN) == 0
    training = run_record(out, "group")["training"]
    assert "sub-02" not in training["participants"]
    assert training["excluded"]["sub-02"] == "has a lesion mask"


def test_train_participants_overrides_the_table(simple_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "group", "--train-participants", "sub-03", "04", *FAST, *PLAN) == 0
    training = run_record(out, "group")["training"]
    assert training["participants"] == ["sub-03", "sub-04"]
    assert training["excluded"]["sub-01"] == "not in --train-participants"


def test_participant_level_lists_images_and_masks(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "participant", "--participant-label", "05", "sub-01", *FAST, *participant_args(tiny_model)) == 0
    images = run_record(out, "participant")["inputs"]["images"]
    assert [i["image"] for i in images] == ["sub-01/anat/sub-01_T2w.nii.gz", "sub-05/anat/sub-05_T2w.nii.gz"]
    assert images[0]["cord_mask"] == "derivatives/labels/sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    assert images[0]["lesion_mask"] is None
    assert images[1]["lesion_mask"] == "derivatives/labels/sub-05/anat/sub-05_T2w_label-lesion_seg.nii.gz"


def test_participant_labels_from_a_file(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("sub-02\n\n03\n")
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "participant", "--participant-label", f"@{labels}", *FAST, *participant_args(tiny_model)) == 0
    subjects = [i["subject"] for i in run_record(out, "participant")["inputs"]["images"]]
    assert subjects == ["02", "03"]


def test_output_is_a_valid_derivative_dataset(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "group", *PLAN) == 0
    assert run_cli(simple_dataset, out, "participant", *participant_args(tiny_model)) == 0
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "counterseg"
    ignored = (out / ".bidsignore").read_text().split()
    assert {"logs/", "work/", "models/", "figures/"} <= set(ignored)
    result = run_validator(out)
    assert not result.errors, result.errors


def test_bids_dir_is_byte_for_byte_unchanged(simple_dataset: Path, tmp_path: Path, capsys, tiny_model: Path) -> None:
    before = tree_digest(simple_dataset)
    out, db = tmp_path / "out", tmp_path / "db"
    assert run_cli(simple_dataset, out, "group", "--bids-database-dir", db, *PLAN) == 0
    assert run_cli(simple_dataset, out, "participant", "--bids-database-dir", db, *participant_args(tiny_model)) == 0
    assert run_cli(simple_dataset, out, "participant", "--dry-run") == 0
    assert run_cli(simple_dataset, out, "participant", "--participant-label", "77", *FAST) == ExitCode.NOTHING_SELECTED
    assert tree_digest(simple_dataset) == before


def test_database_dir_is_reused_until_reset(dataset_copy: Path, tmp_path: Path, tiny_model: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "db"
    assert run_cli(dataset_copy, out, "participant", "--bids-database-dir", db, *FAST, *participant_args(tiny_model)) == 0
    assert any(db.iterdir())
    new = dataset_copy / "sub-01" / "anat" / "sub-01_acq-extra_T2w.nii.gz"
    shutil.copy(dataset_copy / "sub-01" / "anat" / "sub-01_T2w.nii.gz", new)
    assert run_cli(dataset_copy, out, "participant", "--bids-database-dir", db, *FAST, *participant_args(tiny_model)) == 0
    cached = [i["image"] for i in run_record(out, "participant")["inputs"]["images"]]
    assert "sub-01/anat/sub-01_acq-extra_T2w.nii.gz" not in cached
    assert run_cli(dataset_copy, out, "participant", "--bids-database-dir", db, "--reset-database", *FAST, *participant_args(tiny_model)) == 0
    fresh = [i["image"] for i in run_record(out, "participant")["inputs"]["images"]]
    assert "sub-01/anat/sub-01_acq-extra_T2w.nii.gz" in fresh


def test_dry_run_lists_exactly_the_selected_images(rich_dataset: Path, tmp_path: Path, capsys) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"image": {"session": "2", "acquisition": None}}))
    out = tmp_path / "out"
    code = run_cli(rich_dataset, out, "participant", "--contrast", "T2w", "T1w",
                   "--bids-filter-file", filters, "--dry-run")
    assert code == 0
    text = capsys.readouterr().out
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  sub-")]
    expected = sorted(f"sub-0{s}/ses-2/anat/sub-0{s}_ses-2_{c}.nii.gz" for s in (1, 2, 3) for c in ("T1w", "T2w"))
    assert listed == expected
    cords = [line.split()[-1] for line in text.splitlines() if "cord mask:" in line]
    assert cords == [
        "derivatives/labels/" + p.replace(".nii.gz", "_label-SC_seg.nii.gz") for p in expected
    ]
    lesions = [line.split()[-1] for line in text.splitlines() if "lesion mask:" in line]
    assert lesions == ["none"] * 4 + [
        "derivatives/labels/" + p.replace(".nii.gz", "_label-lesion_seg.nii.gz") for p in expected[4:]
    ]
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run_group_shows_the_training_selection(rich_dataset: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(rich_dataset, tmp_path / "out", "group", "--session-label", "1", "--dry-run", *FAST) == 0
    text = capsys.readouterr().out
    assert "training participants: sub-01, sub-02" in text
    assert "excluded sub-03: pathology=MS" in text
    assert "ses-2" not in text


def test_explicit_derivatives_and_legacy_names(dataset_copy: Path, tmp_path: Path, tiny_model: Path) -> None:
    legacy = tmp_path / "manual"
    (legacy / "sub-01" / "anat").mkdir(parents=True)
    source = dataset_copy / "derivatives" / "labels" / "sub-01" / "anat"
    shutil.copy(source / "sub-01_T2w_label-SC_seg.nii.gz", legacy / "sub-01" / "anat" / "sub-01_T2w_seg-manual.nii.gz")
    out = tmp_path / "out"
    args = ["--participant-label", "01", "02", "--derivatives", legacy, *FAST]
    assert run_cli(dataset_copy, out, "participant", *args, *participant_args(tiny_model)) == 0
    images = run_record(out, "participant")["inputs"]["images"]
    assert images[0]["cord_mask"] == str(legacy / "sub-01" / "anat" / "sub-01_T2w_seg-manual.nii.gz")
    assert images[1]["cord_mask"] is None
    assert run_cli(dataset_copy, out, "participant", *args, "--require-derivative", "cord", *participant_args(tiny_model)) == 0
    kept = run_record(out, "participant")["inputs"]["images"]
    assert [i["subject"] for i in kept] == ["01"]
    assert run_cli(dataset_copy, out, "participant", *args, "--require-derivative", "seg-manual", *participant_args(tiny_model)) == 0
    assert [i["subject"] for i in run_record(out, "participant")["inputs"]["images"]] == ["01"]
    assert run_cli(dataset_copy, out, "participant", *args, "--require-derivative", "lesion") == ExitCode.MISSING_INPUT


def test_config_file_overrides_and_flags_win(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("preset: tiny\ncompute:\n  seed: 7\nselection:\n  participant_labels: ['01']\n")
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "participant", "--config", config, "--seed", "9", *FAST, *participant_args(tiny_model)) == 0
    settings = run_record(out, "participant")["settings"]
    assert settings["preset"] == "tiny"
    assert settings["compute"]["seed"] == 9
    assert settings["selection"]["participant_labels"] == ["01"]


@pytest.mark.parametrize("content", ["selection:\n  colour: red\n", "compute: [1, 2]\n", "{broken"])
def test_bad_config_file_is_usage_error(simple_dataset: Path, tmp_path: Path, content: str) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(content)
    assert run_cli(simple_dataset, tmp_path / "out", "participant", "--config", config, *FAST) == ExitCode.USAGE


def test_plain_folder_of_niftis_trains_at_group_level_only(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in sorted(simple_dataset.glob("sub-0[1-3]/anat/*_T2w.nii.gz")):
        shutil.copy(image, plain / image.name.replace("_T2w", "").replace("sub-", "scan"))
    out = tmp_path / "out"
    assert run_cli(plain, out, "group", *PLAN) == 0
    assert "un-formatted folder of 3 NIfTI" in caplog.text
    assert run_record(out, "group")["training"]["participants"] == ["sub-scan01", "sub-scan02", "sub-scan03"]
    assert run_cli(plain, out, "participant") == ExitCode.VALIDATION


@pytest.mark.slow
def test_demo_generates_and_runs_both_levels(tmp_path: Path, caplog) -> None:
    from bids_app.demo import CONFIG_NAME, DEMO_SETTINGS

    config = tmp_path / "short.json"  # the demo's own budget takes ~10 minutes: shrink it for CI
    config.write_text(json.dumps(TINY_TRAINING))
    assert run_cli("--demo", tmp_path / "demo", "--config", config) == 0
    used = json.loads((tmp_path / "demo" / CONFIG_NAME).read_text())
    assert used["training"]["vqgan"]["max_steps"] == TINY_TRAINING["training"]["vqgan"]["max_steps"]
    assert used["training"]["diffusion"]["log_every"] == DEMO_SETTINGS["training"]["diffusion"]["log_every"]
    assert (tmp_path / "demo" / "bids" / "dataset_description.json").is_file()
    with open(tmp_path / "demo" / "bids" / "participants.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    lesion_rows = [(r["lesion_type"], r["acquisition"]) for r in rows if r["pathology"] != "HC"]
    assert {"ms", "sci"} <= {t for t, _ in lesion_rows} and "ax-thick" in {a for _, a in lesion_rows}
    out = tmp_path / "demo" / "out"
    assert run_record(out, "group")["settings"]["preset"] == "tiny"
    assert run_record(out, "participant")["exit_code"] == 0
    models = out / "models"
    card = json.loads((models / "model_card.json").read_text())
    for name in ("vqgan", "diffusion"):
        component = card["components"][name]
        weights = models / component["weights"]
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == component["sha256"]
        assert component["steps"] == run_record(out, "group")["settings"]["training"][name]["max_steps"]
        losses = (checkpoints_dir(out / "work", out / "models") / name / "losses.jsonl").read_text().splitlines()
        assert len(losses) == component["steps"]
    assert card["latent_scale"] > 0
    assert card["training_participants"] == json.loads((models / "split.json").read_text())["train"]
    figures = sorted((models / "figures").glob("*.png"))
    assert any("vqgan_reconstruction" in f.name for f in figures) and any("diffusion_sample" in f.name for f in figures)
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    assert f"evaluation summary (lesion participants against the phantom's ground truth): {out / 'evaluation_summary.tsv'}" in caplog.text
    assert (out / "sub-15" / "anat" / "sub-15_label-lesion_mask.nii.gz").is_file()  # the lesion ones follow the 14 healthy
    split = json.loads((models / "split.json").read_text())
    assert (len(split["train"]), len(split["validation"])) == (6, 8)  # 8 held out for the image-level calibration
    assert json.loads((models / "calibration.json").read_text())["summary"]["n_images"] == 8
    caplog.clear()
    assert run_cli("--demo", tmp_path / "demo", "--config", config) == 0, "a second demo run reuses the dataset and the models"
    assert "is finished and was trained with these settings and data: nothing to train" in caplog.text


def test_group_level_writes_plan_fingerprint_split_and_cache(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "group", "--preset", "tiny", *FAST, *PLAN) == 0
    models = out / "models"
    plan = json.loads((models / "preprocessing_plan.json").read_text())
    fingerprint = json.loads((models / "dataset_fingerprint.json").read_text())
    split = json.loads((models / "split.json").read_text())
    assert plan["target_shape"] == [32, 32, 32], "the tiny preset caps the shape"
    assert plan["target_spacing"] == [round(s, 3) for s in fingerprint["median_spacing"]]
    assert sorted(split["train"] + split["validation"]) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert split["validation"] and not set(split["train"]) & set(split["validation"])
    trained_on = {Path(i["image"]).name.split("_")[0] for i in fingerprint["images"]}
    assert trained_on == set(split["train"]), "the fingerprint sees training images only"
    assert len(list((out / "work" / "cache").glob("*.npz"))) == 4
    record = run_record(out, "group")
    assert record["preprocessing"]["split"] == split

    assert run_cli(simple_dataset, out, "participant", "--participant-label", "05", *FAST, *participant_args(tiny_model)) == 0
    assert run_record(out, "participant")["segmentation"]["segmented"] == ["sub-05/anat/sub-05_T2w.nii.gz"]


def test_an_existing_plan_is_never_changed_by_a_rerun(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "group", "--preset", "tiny", *FAST, *PLAN) == 0
    first = (out / "models" / "preprocessing_plan.json").read_text()
    config = tmp_path / "c.yaml"
    config.write_text("preprocessing:\n  target_spacing: [2.0, 2.0, 2.0]\n")
    assert run_cli(simple_dataset, out, "group", "--preset", "tiny", "--config", config, *FAST, *PLAN) == 64
    assert "preprocessing.target_spacing: unset -> [2.0, 2.0, 2.0]" in caplog.text
    assert (out / "models" / "preprocessing_plan.json").read_text() == first
    fresh = tmp_path / "fresh"
    assert run_cli(simple_dataset, fresh, "group", "--preset", "tiny", "--config", config, *FAST, *PLAN) == 0
    assert json.loads((fresh / "models" / "preprocessing_plan.json").read_text())["target_spacing"] == [2.0, 2.0, 2.0]


def test_the_adapter_records_the_patched_objective_it_learned_under(tiny_model: Path) -> None:
    from bids_app.settings import DiffusionStageSettings

    stage = json.loads((tiny_model / "adapter" / "stage.json").read_text())
    assert stage["patch_fraction"] == DiffusionStageSettings().patch_fraction > 0
    assert stage["patch_max_size"] == list(DiffusionStageSettings().patch_max_size)
