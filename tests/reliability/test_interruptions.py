"""Interruptions: SIGKILL at seeded kill points in every group stage and mid-image at the
participant level, then a rerun; SIGTERM and SIGINT stop cleanly with a checkpoint.

Kill points (``bids_app.killpoints``) make the process signal itself at a named place, so every
kill lands exactly where the test chose; the "random" points are seeded choices among them.
"""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

from bids_app.workspace import checkpoints_dir
from bids_app import killpoints
from bids_app.image_outputs import image_outputs
from bids_app.model_store import load_trained_models
from bids_app.training.checkpoint import load_checkpoint
from bids_app.weights import load_weights

from tests.conftest import participant_args, tree_digest

from tests.reliability.catalogue import case
from tests.reliability.harness import (
    FAST,
    assert_no_partial_output,
    assert_one_error_line,
    file_times,
    fork_cli,
    kill_env,
    log_of,
    run_cli,
    temp_files,
)

SEED = 11
STEPS = {"vqgan": 4, "diffusion": 4, "adapter": 2}
KILL_TRAINING = {
    "training": {"vqgan": {"max_steps": 4, "disc_start": 2, "figure_every": 100, "checkpoint_every": 2},
                 "diffusion": {"max_steps": 4, "figure_every": 100, "checkpoint_every": 2},
                 "adapter": {"max_steps": 2, "checkpoint_every": 1}},
    "segmentation": {"counterfactual": {"strengths": [0.5]}},
}
#: Where each stage may be killed: after a training step, halfway through a checkpoint, weights,
#: plan or cache write, mid-calibration, or while the model card itself is written.
KILL_POINTS = {
    "plan": ["write:cache/*.npz@1", "write:cache/*.npz@3", "write:models/preprocessing_plan.json"],
    "vqgan": ["step:vqgan@1", "step:vqgan@3", "write:vqgan/latest.pt@1", "write:vqgan/weights.pt",
              "write:vqgan/stage.json"],
    "diffusion": ["step:diffusion@1", "step:diffusion@3", "write:diffusion/latest.pt@2", "write:diffusion/weights.pt"],
    "adapter": ["step:adapter@1", "write:adapter/latest.pt@1", "write:adapter/weights.pt"],
    "calibrate": ["calibrate:image@1", "write:models/calibration.json", "write:models/model_card.json"],
}


def group_argv(bids: Path, out: Path, config: Path) -> list[object]:
    return [bids, out, "group", "--preset", "tiny", "--config", config, *FAST]


def training_config(tmp_path: Path, checkpoint_every: int | None = None, vqgan_steps: int | None = None) -> Path:
    settings = json.loads(json.dumps(KILL_TRAINING))
    if checkpoint_every:
        for stage in settings["training"].values():
            stage["checkpoint_every"] = checkpoint_every
    if vqgan_steps:
        settings["training"]["vqgan"].update(max_steps=vqgan_steps, disc_start=1)
    path = tmp_path / "training.json"
    path.write_text(json.dumps(settings))
    return path


def assert_nothing_half_written(out: Path) -> dict[str, int]:
    """Every file under a final name is whole: checkpoints load, weights match their stage record,
    JSON parses. Returns the step each unfinished stage must resume from."""
    resume = {}
    for stage in STEPS:
        checkpoint = checkpoints_dir(out / "work", out / "models") / stage / "latest.pt"
        record = out / "models" / stage / "stage.json"
        if record.is_file():
            load_weights(out / "models" / stage / "weights.pt", json.loads(record.read_text())["sha256"])
        elif checkpoint.is_file():
            resume[stage] = int(load_checkpoint(checkpoint)["step"])
    for path in (out / "models").rglob("*.json"):
        json.loads(path.read_text())
    return resume


def test_group_level_survives_sigkill_in_every_stage(simple_dataset: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    points = [rng.choice(options) for options in KILL_POINTS.values()]
    out, config = tmp_path / "out", training_config(tmp_path)
    argv = group_argv(simple_dataset, out, config)
    expected_resume: dict[str, int] = {}
    logs = []
    for point in [*points, None]:
        result = fork_cli(argv, kill_env(point) if point else None)
        logs.append(log_of(out, result.pid))
        if point is None:
            assert result.exit_code == case("group-sigkill").exit_code, logs[-1][-3000:]
        else:
            assert result.signal == signal.SIGKILL, f"{point}: the run was not killed there ({result})"
        for stage, step in expected_resume.items():
            assert f"{stage}: resuming from step {step}" in logs[-1], (point, stage)
        expected_resume = assert_nothing_half_written(out)
    assert case("group-sigkill").message in "".join(logs), f"the seed {SEED} must interrupt a stage past a checkpoint"
    models = load_trained_models(out / "models")
    assert {name: models.card["components"][name]["steps"] for name in STEPS} == STEPS
    assert models.card["calibration"] is not None
    assert_no_partial_output(out)


def test_group_sigterm_then_sigint_checkpoint_and_exit(simple_dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    out, config = tmp_path / "out", training_config(tmp_path, checkpoint_every=100, vqgan_steps=2)
    argv = [*group_argv(simple_dataset, out, config), "--omp-nthreads", "1"]  # tiny models: threads only contend
    for item, signal_name, point, stage, step in ((case("group-sigterm"), "TERM", "step:vqgan@1", "vqgan", 1),
                                                  (case("group-sigint"), "INT", "step:diffusion@1", "diffusion", 1)):
        caplog.clear()
        killpoints.reset()
        monkeypatch.setenv(killpoints.ENV_POINT, point)
        monkeypatch.setenv(killpoints.ENV_SIGNAL, signal_name)
        assert run_cli(*argv) == item.exit_code
        assert_one_error_line(caplog, *item.fragments(), "rerun the same command to resume")
        assert load_checkpoint(checkpoints_dir(out / "work", out / "models") / stage / "latest.pt")["step"] == step
        assert not (out / "models" / "model_card.json").exists()
        assert not temp_files(out)
    assert "vqgan: resuming from step 1" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the run restores the signal handlers"


def test_participant_level_survives_sigkill_mid_image(simple_dataset: Path, tiny_model: Path, tmp_path: Path,
                                                      caplog) -> None:
    names = ["desc-counterfactual_T2w.json", "desc-counterfactual_T2w.nii.gz", "label-lesion_probseg.nii.gz",
             "T2w_lesions.tsv", "T2w_evaluation.json", "label-lesion_mask.nii.gz"]
    point = f"write:anat/sub-02_{random.Random(SEED).choice(names)}"
    out = tmp_path / "out"
    argv = [simple_dataset, out, "participant", "--participant-label", "01", "02", *FAST, *participant_args(tiny_model)]
    killed = fork_cli(argv, kill_env(point))
    assert killed.signal == signal.SIGKILL, point
    assert temp_files(out), "the kill landed halfway through a write"
    first = image_outputs(out, "sub-01/anat/sub-01_T2w.nii.gz")
    second = image_outputs(out, "sub-02/anat/sub-02_T2w.nii.gz")
    assert first.done and not second.done
    finished = file_times(first.files)
    assert run_cli(*argv) == case("participant-sigkill").exit_code
    assert case("participant-sigkill").message in caplog.text
    assert file_times(first.files) == finished, "finished images are kept, untouched"
    assert second.done and all(p.is_file() for p in second.files)
    assert_no_partial_output(out)


def test_participant_sigterm_leaves_no_partial_image(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                                     monkeypatch, caplog) -> None:
    out = tmp_path / "out"
    before = tree_digest(dataset_copy)
    monkeypatch.setenv(killpoints.ENV_POINT, "write:anat/sub-01_label-lesion_probseg.nii.gz")
    monkeypatch.setenv(killpoints.ENV_SIGNAL, "TERM")
    killpoints.reset()
    code = run_cli(dataset_copy, out, "participant", "--participant-label", "01", *FAST, *participant_args(tiny_model))
    assert code == case("participant-sigterm").exit_code
    assert_one_error_line(caplog, *case("participant-sigterm").fragments())
    assert not [p for p in out.glob("sub-*/**/*") if p.is_file()]
    assert_no_partial_output(out)
    assert tree_digest(dataset_copy) == before
