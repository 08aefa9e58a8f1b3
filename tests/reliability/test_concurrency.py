"""Concurrency: the participant level refuses a model the group level is still training (the model
card, written last and atomically, marks a finished model); two jobs on one participant never delete
each other's files (a per-image lock; a job removes only temporary files proven abandoned). Parallel
participant jobs on different participants are tests/e2e/test_concurrent_participants.py."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from bids_app.errors import MissingInputError
from bids_app.image_outputs import image_outputs
from bids_app.io import remove_leftover_temp_files, temp_file_owner, try_exclusive_lock
from bids_app.model_store import load_trained_models

from tests.conftest import participant_args
from tests.reliability.catalogue import case
from tests.reliability.harness import (
    CHILD_TIMEOUT_S,
    FAST,
    ChildResult,
    assert_no_partial_output,
    assert_one_error_line,
    finish_child,
    fork_cli,
    kill_env,
    log_of,
    run_cli,
    temp_files,
)
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


def resume_child(stopped: ChildResult) -> ChildResult:
    """SIGCONT a child that stopped itself and wait for it to end (a watchdog kills a hung one)."""
    def expire(signum: int, frame: object) -> None:
        os.kill(stopped.pid, signal.SIGKILL)
        raise TimeoutError(f"resumed run {stopped.pid} still running after {CHILD_TIMEOUT_S} s: killed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CHILD_TIMEOUT_S)
    try:
        os.kill(stopped.pid, signal.SIGCONT)
        _, status = os.waitpid(stopped.pid, 0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if os.WIFSIGNALED(status):
        return ChildResult(stopped.pid, None, os.WTERMSIG(status))
    return ChildResult(stopped.pid, os.WEXITSTATUS(status), None)


def test_two_jobs_on_one_participant_keep_each_others_outputs(simple_dataset: Path, tiny_model: Path, tmp_path: Path,
                                                               caplog) -> None:
    """The first job stops (SIGSTOP) with its lesion mask written to a temporary file, not yet renamed;
    a second job on the same participant skips the image and removes nothing of it; the first, resumed,
    finishes the image."""
    item = case("image-being-segmented")
    out = tmp_path / "out"
    argv = [simple_dataset, out, "participant", "--participant-label", "02", *FAST, *participant_args(tiny_model)]
    first = fork_cli(argv, kill_env("write:anat/sub-02_label-lesion_mask.nii.gz", "STOP"), until_stopped=True)
    try:
        assert first.stopped, first
        pending = temp_files(out)
        assert [temp_file_owner(p.name) for p in pending] == [first.pid], pending
        second = run_cli(*argv)
        assert pending == temp_files(out), "the second job removed the first one's temporary file"
    except BaseException:
        finish_child(first)
        raise
    resumed = resume_child(first)
    assert second == item.exit_code
    assert item.message.replace("…", str(first.pid)) in caplog.text
    assert resumed.exit_code == 0, log_of(out, first.pid)[-3000:]
    outputs = image_outputs(out, "sub-02/anat/sub-02_T2w.nii.gz")
    assert all(p.is_file() for p in outputs.files)
    assert_no_partial_output(out)


def test_a_lock_is_exclusive_and_released_when_its_holder_dies(tmp_path: Path) -> None:
    lock = tmp_path / "logs" / "locks" / "sub-01_T2w.lock"
    pid = os.fork()
    if pid == 0:  # the child: take the lock, stop, and die when killed; never return into pytest
        try:
            with try_exclusive_lock(lock) as attempt:
                if attempt.held:
                    os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        with try_exclusive_lock(lock) as attempt:
            assert attempt.busy and not attempt.held and attempt.holder == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with try_exclusive_lock(lock) as attempt:
        assert attempt.held and not attempt.busy, "the kernel released the dead holder's lock"
        with try_exclusive_lock(lock) as again:
            assert again.busy and again.holder == os.getpid(), "a second open of the file is another holder"


def test_without_a_lock_only_dead_processes_temporary_files_are_removed(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: nothing runs under this id (unless reused at once: then the file is kept)
    dead = tmp_path / f".sub-01_T2w_lesions.tsv.{pid}.0123abcd.tmp"
    live = tmp_path / f".sub-01_T2w_evaluation.json.{os.getpid()}.0123abcd.tmp"
    for path in (dead, live):
        path.write_text("half")
    assert remove_leftover_temp_files(tmp_path, keep_live_owners=True) == [dead]
    assert live.is_file()
    assert remove_leftover_temp_files(tmp_path) == [live], "with the lock held, every leftover is abandoned"
