"""One bad image stops nothing (fMRIPrep's behaviour): the participant level segments every good
image, writes a crash report per failed image and exits at the end with the failure's code;
``--stop-on-first-crash`` stops at the first problem; an interruption stops the run at once; the
group level refuses bad training images before training, naming all of them."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bids_app import participant
from bids_app.errors import ExitCode
from bids_app.image_outputs import image_outputs
from bids_app.participant import failures_exit_code

from tests.conftest import participant_args, tree_digest

from tests.reliability.catalogue import case
from tests.reliability.harness import FAST, assert_no_partial_output, assert_one_error_line, error_lines, run_cli
from tests.reliability.test_interruptions import group_argv, training_config

GOOD = ("01", "04")
BAD = "05"


def relpath(subject: str) -> str:
    return f"sub-{subject}/anat/sub-{subject}_T2w.nii.gz"


def truncate(bids: Path, subject: str) -> Path:
    path = bids / relpath(subject)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def participant_argv(bids: Path, out: Path, model: Path, *labels: str) -> list[object]:
    return [bids, out, "participant", "--participant-label", *labels, *FAST, *participant_args(model)]


def image_files(out: Path, subject: str) -> list[Path]:
    return sorted(p for p in (out / f"sub-{subject}").rglob("*") if p.is_file())


def run_record(out: Path) -> dict:
    records = sorted((out / "logs").glob("run_participant_*.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def crash_reports(out: Path) -> list[Path]:
    return sorted((out / "logs").glob("crash_*.txt"))


def test_a_bad_image_among_good_ones_stops_nothing(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    item = case("continue-past-bad-image")
    bad = truncate(dataset_copy, BAD)
    out = tmp_path / "out"
    before = tree_digest(dataset_copy)
    assert run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD, BAD)) == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments(), str(bad), relpath(BAD))
    for subject in GOOD:
        outputs = image_outputs(out, relpath(subject))
        assert all(p.is_file() for p in outputs.files), f"sub-{subject} was not segmented"
    assert not image_files(out, BAD)
    assert_no_partial_output(out)
    assert tree_digest(dataset_copy) == before

    [report] = crash_reports(out)
    assert str(report) in line
    text = report.read_text()
    assert f"image: {relpath(BAD)}" in text and "file is truncated" in text
    assert "Traceback (most recent call last)" in text and "BadDataError" in text
    assert '"stop_on_first_crash": false' in text, "the report holds the run's settings"
    record = run_record(out)
    assert record["exit_code"] == item.exit_code
    assert sorted(record["segmentation"]["segmented"]) == [relpath(s) for s in GOOD]
    [failed] = record["segmentation"]["failed"]
    assert failed["image"] == relpath(BAD) and failed["exit_code"] == ExitCode.BAD_DATA
    assert "file is truncated" in failed["error"] and failed["crash_report"] == str(report)


def test_stop_on_first_crash_segments_nothing(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    item = case("stop-on-first-crash")
    bad = truncate(dataset_copy, BAD)
    out = tmp_path / "out"
    code = run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD, BAD), "--stop-on-first-crash")
    assert code == item.exit_code
    line = assert_one_error_line(caplog, *item.fragments(), str(bad))
    assert "images failed" not in line, "the run stopped: there is no list of the others"
    assert not [p for p in out.glob("sub-*/**/*") if p.is_file()]
    assert not crash_reports(out)
    assert run_record(out)["exit_code"] == item.exit_code


def test_stop_on_first_crash_stops_at_a_failure_mid_run(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The first image crashes while it is segmented: the second is never started."""
    started = []

    def crash(settings, models, pipeline, calibration, record, disambiguate):
        started.append(record.relpath)
        raise RuntimeError("segmentation exploded")

    monkeypatch.setattr(participant, "segment_one", crash)
    out = tmp_path / "out"
    code = run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD), "--stop-on-first-crash")
    assert code == ExitCode.UNEXPECTED
    assert started == [relpath(GOOD[0])]
    [line] = error_lines(caplog)
    assert "RuntimeError: segmentation exploded" in line
    assert "images failed" not in line


def test_an_image_failing_mid_run_is_discarded_and_the_others_go_on(dataset_copy: Path, tiny_model: Path,
                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """sub-01 crashes after its counterfactual and anomaly map are written (they are removed); sub-04 is
    segmented after it; sub-05 fails the input checks. A crash makes the exit code 1 (the rule)."""
    item = case("continue-past-crash")
    truncate(dataset_copy, BAD)
    crashing, good = GOOD
    real_table = participant.write_lesion_tsv

    def table_or_crash(path: Path, rows, **kwargs) -> None:
        if path.name.startswith(f"sub-{crashing}_"):
            assert any(p.is_file() for p in image_outputs(path.parents[2], relpath(crashing)).files), "partial outputs"
            raise RuntimeError("lesion table exploded")
        real_table(path, rows, **kwargs)

    monkeypatch.setattr(participant, "write_lesion_tsv", table_or_crash)
    out = tmp_path / "out"
    assert run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD, BAD)) == item.exit_code
    head, *details = error_lines(caplog)
    assert all(fragment in head for fragment in item.fragments())
    assert f"failed: {relpath(crashing)}, {relpath(BAD)} (exit 1)" in head, "in the order of the selection"
    assert [d.strip().split(": ", 1)[0] for d in details] == [relpath(crashing), relpath(BAD)]
    assert "RuntimeError: lesion table exploded (exit 1; crash report: " in details[0]
    assert "file is truncated" in details[1] and "(exit 65; crash report: " in details[1]

    assert not image_files(out, crashing), "the failed image's partial outputs are removed"
    assert all(p.is_file() for p in image_outputs(out, relpath(good)).files)
    assert_no_partial_output(out)
    assert len(crash_reports(out)) == 2
    record = run_record(out)
    assert record["segmentation"]["segmented"] == [relpath(good)]
    assert [f["image"] for f in record["segmentation"]["failed"]] == [relpath(crashing), relpath(BAD)]


def test_an_interruption_stops_the_run_and_is_no_failed_image(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """SIGTERM (the signal handler's RunInterrupted) while the first image is segmented stops the run:
    the second image is never started, and no crash report is written."""
    item = case("interrupted-not-failed")
    started = []

    def terminated(*args, **kwargs):
        started.append(args[2].name)  # the ImageInput's name: the image's relpath
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal handler raises before this line")

    monkeypatch.setattr(participant, "native_residual", terminated)
    out = tmp_path / "out"
    assert run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD)) == item.exit_code
    assert_one_error_line(caplog, *item.fragments())
    assert started == [relpath(GOOD[0])]
    assert not crash_reports(out)
    assert not [p for p in out.glob("sub-*/**/*") if p.is_file()]


def test_keyboard_interrupt_is_no_failed_image(dataset_copy: Path, tiny_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    started = []

    def interrupted(settings, models, pipeline, calibration, record, disambiguate):
        started.append(record.relpath)
        raise KeyboardInterrupt

    monkeypatch.setattr(participant, "segment_one", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_cli(*participant_argv(dataset_copy, out, tiny_model, *GOOD))
    assert started == [relpath(GOOD[0])]
    assert not crash_reports(out)


def test_group_level_refuses_every_bad_training_image_before_training(dataset_copy: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    item = case("group-bad-training-images")
    truncated = truncate(dataset_copy, "01")
    empty = dataset_copy / relpath("03")
    empty.write_bytes(b"")
    out = tmp_path / "out"
    assert run_cli(*group_argv(dataset_copy, out, training_config(tmp_path))) == item.exit_code
    head, *details = error_lines(caplog)
    assert all(fragment in head for fragment in item.fragments()), head
    assert f"failed: {relpath('01')}, {relpath('03')} (exit 65)" in head, head
    assert str(truncated) in details[0] and "file is truncated" in details[0]
    assert str(empty) in details[1] and "file is empty (0 bytes)" in details[1]
    assert not (out / "models" / "model_card.json").exists()
    assert not (out / "work" / "checkpoints").exists(), "nothing was trained"


@pytest.mark.parametrize(("codes", "expected"), [
    ([65], 65), ([74, 65], 74), ([65, 1, 74], 1), ([1], 1), ([66, 65], 66),
])
def test_exit_code_rule(codes: list[int], expected: int) -> None:
    """1 if any image crashed, else the code of the first failed image."""
    assert failures_exit_code([{"exit_code": c} for c in codes]) == expected
