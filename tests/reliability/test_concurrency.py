"""Concurrency: the participant level refuses a model the group level is still training (the model
card, written last and atomically, marks a finished model). Parallel participant jobs sharing one
output folder are the scale-out issue's tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bids_app.errors import MissingInputError
from bids_app.model_store import load_trained_models

from tests.reliability.catalogue import case
from tests.reliability.harness import FAST, assert_one_error_line, finish_child, fork_cli, kill_env, run_cli
from tests.reliability.test_interruptions import group_argv, training_config


def test_participant_run_while_group_level_trains_is_refused(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    """A real training run, stopped (SIGSTOP, at its first vqgan step) while the participant level runs."""
    out = tmp_path / "out"
    training = fork_cli(group_argv(simple_dataset, out, training_config(tmp_path)), kill_env("step:vqgan@1", "STOP"),
                        until_stopped=True)
    try:
        assert training.stopped, training
        code = run_cli(simple_dataset, tmp_path / "seg", "participant", "--model-dir", out / "models", *FAST,
                       "--participant-label", "01")
    finally:
        finish_child(training)
    assert code == case("participant-while-training").exit_code
    assert_one_error_line(caplog, *case("participant-while-training").fragments(), str(out / "models"))
    assert not list((tmp_path / "seg").glob("sub-*"))


def test_missing_card_means_unfinished_or_untrained(tiny_model: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "models"
    shutil.copytree(tiny_model, unfinished)
    (unfinished / "model_card.json").unlink()
    with pytest.raises(MissingInputError, match="is not finished"):
        load_trained_models(unfinished)
    with pytest.raises(MissingInputError, match="run the group level first"):
        load_trained_models(tmp_path / "no-such-model")
