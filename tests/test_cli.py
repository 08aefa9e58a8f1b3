"""The command line: flags, aliases, exit codes and messages (BIDS-Apps conventions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bids_app import __version__, cli
from bids_app.errors import ExitCode, UsageError

from tests.conftest import participant_args, tree_digest

FAST = ["--skip-bids-validation"]


def run_cli(*args: object) -> int:
    return cli.main([str(a) for a in args])


def option_strings() -> list[str]:
    parser = cli.build_parser()
    return [s for action in parser._actions for s in action.option_strings]


def test_version_prints_the_version_file(capsys: pytest.CaptureFixture[str]) -> None:
    version = (Path(__file__).parent.parent / "version").read_text().strip()
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"counterseg {version}"
    assert __version__ == version


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--help") == 0
    text = capsys.readouterr().out
    for flag in option_strings():
        assert flag in text, flag
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"


DASHED = sorted({s for s in option_strings() if s.startswith("--") and "-" in s[2:]})


@pytest.mark.parametrize("flag", DASHED)
def test_every_dashed_flag_has_an_underscore_alias(flag: str) -> None:
    assert "--" + flag[2:].replace("-", "_") in option_strings()


def test_underscore_spelling_parses_like_dashes() -> None:
    dashed = cli.parse_args(["b", "o", "group", "--participant-label", "01", "--omp-nthreads", "2"])
    underscored = cli.parse_args(["b", "o", "group", "--participant_label", "01", "--omp_nthreads", "2"])
    assert vars(dashed) == vars(underscored)


@pytest.mark.parametrize("alias", ["--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator"])
def test_skip_validation_aliases(alias: str) -> None:
    assert cli.parse_args(["b", "o", "group", alias]).skip_bids_validation is True


def test_unknown_level_is_exit_17(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "subject") == ExitCode.UNKNOWN_LEVEL
    assert "unknown analysis level 'subject'" in caplog.text


def test_unknown_flag_is_usage_error(simple_dataset: Path, tmp_path: Path) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "group", "--no-such-flag") == ExitCode.USAGE


def test_missing_positionals_is_usage_error() -> None:
    assert run_cli() == ExitCode.USAGE


def test_nonexistent_bids_dir(tmp_path: Path, caplog) -> None:
    missing = tmp_path / "nowhere"
    assert run_cli(missing, tmp_path / "out", "group") == ExitCode.USAGE
    assert f"bids_dir {missing} does not exist" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "where, code",
    [("same", ExitCode.USAGE), ("inside", ExitCode.USAGE), ("derivatives", ExitCode.OK)],
)
def test_output_dir_inside_bids_dir(dataset_copy: Path, where: str, code: int, tiny_model: Path, caplog) -> None:
    out = {
        "same": dataset_copy,
        "inside": dataset_copy / "sub-01" / "out",
        "derivatives": dataset_copy / "derivatives" / "counterseg",
    }[where]
    before = tree_digest(dataset_copy / "sub-01")
    assert run_cli(dataset_copy, out, "participant", *FAST, *participant_args(tiny_model)) == code
    assert tree_digest(dataset_copy / "sub-01") == before
    if code == ExitCode.USAGE:
        assert str(out) in caplog.text
    else:
        assert (out / "dataset_description.json").is_file()


def test_work_dir_inside_bids_dir_is_refused(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    code = run_cli(simple_dataset, tmp_path / "out", "group", "-w", simple_dataset / "work", *FAST)
    assert code == ExitCode.USAGE
    assert "--work-dir" in caplog.text


def test_directory_that_is_not_bids(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "notbids"
    (empty / "docs").mkdir(parents=True)
    (empty / "docs" / "notes.txt").write_text("hello")
    assert run_cli(empty, tmp_path / "out", "participant") == ExitCode.VALIDATION
    assert "not a BIDS dataset" in caplog.text


def test_validation_failure_is_exit_16(dataset_copy: Path, tmp_path: Path, tiny_model: Path, caplog) -> None:
    (dataset_copy / "sub-01" / "anat" / "sub-01_T2.nii.gz").write_bytes(
        (dataset_copy / "sub-01" / "anat" / "sub-01_T2w.nii.gz").read_bytes()
    )
    assert run_cli(dataset_copy, tmp_path / "out", "participant") == ExitCode.VALIDATION
    assert "BIDS validation failed" in caplog.text
    args = [*FAST, *participant_args(tiny_model), "--participant-label", "01"]
    assert run_cli(dataset_copy, tmp_path / "out2", "participant", *args) == ExitCode.OK


def test_unknown_participant_label_is_exit_18(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    code = run_cli(simple_dataset, tmp_path / "out", "participant", "--participant-label", "01", "sub-99", *FAST)
    assert code == ExitCode.NOTHING_SELECTED
    assert "99" in caplog.text and "available: 01" in caplog.text


def test_unknown_session_label_is_exit_18(rich_dataset: Path, tmp_path: Path) -> None:
    code = run_cli(rich_dataset, tmp_path / "out", "participant", "--session-label", "ses-3", *FAST)
    assert code == ExitCode.NOTHING_SELECTED


def test_filter_selecting_nothing_is_exit_18(simple_dataset: Path, tmp_path: Path) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"image": {"acquisition": "nosuchacq"}}))
    code = run_cli(simple_dataset, tmp_path / "out", "participant", "--bids-filter-file", filters, *FAST)
    assert code == ExitCode.NOTHING_SELECTED


@pytest.mark.parametrize(
    "content, fragment",
    [("{not json", "invalid JSON"), ('{"bold": {}}', "unknown key 'bold'"), ('{"image": {"color": "red"}}', "unknown entity")],
)
def test_bad_filter_file_is_usage_error(simple_dataset: Path, tmp_path: Path, content: str, fragment: str, caplog) -> None:
    filters = tmp_path / "filters.json"
    filters.write_text(content)
    code = run_cli(simple_dataset, tmp_path / "out", "participant", "--bids-filter-file", filters, *FAST)
    assert code == ExitCode.USAGE
    assert fragment in caplog.text and str(filters) in caplog.text if fragment != "unknown entity" else fragment in caplog.text


def test_missing_contrast_is_exit_66(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "participant", "--contrast", "FLAIR", *FAST) == ExitCode.MISSING_INPUT
    assert "no FLAIR image" in caplog.text


def test_no_healthy_participant_is_exit_66(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    code = run_cli(simple_dataset, tmp_path / "out", "group", "--healthy-filter", "pathology=nobody", *FAST)
    assert code == ExitCode.MISSING_INPUT
    assert "no healthy participant" in caplog.text


def test_crash_is_exit_1_with_a_crash_log(simple_dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    def explode(settings, device):
        raise RuntimeError("boom")

    monkeypatch.setattr("bids_app.levels.run_participant", explode)
    out = tmp_path / "out"
    assert run_cli(simple_dataset, out, "participant", *FAST) == ExitCode.UNEXPECTED
    crash_logs = list((out / "logs").glob("crash_*.txt"))
    assert len(crash_logs) == 1
    assert "RuntimeError: boom" in crash_logs[0].read_text()
    assert str(crash_logs[0]) in caplog.text
    assert (out / "dataset_description.json").is_file()


def test_participant_level_without_a_model_is_exit_66(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "participant", *FAST) == ExitCode.MISSING_INPUT
    assert "run the group level first" in caplog.text


def test_unavailable_cuda_is_usage_error(simple_dataset: Path, tmp_path: Path, caplog) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the unavailable-CUDA path cannot be exercised")
    assert run_cli(simple_dataset, tmp_path / "out", "participant", "--device", "cuda", *FAST) == ExitCode.USAGE
    assert "CUDA is not available" in caplog.text


@pytest.mark.parametrize("value", ["gpu", "cuda:x"])
def test_malformed_device_is_usage_error(simple_dataset: Path, tmp_path: Path, value: str) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "participant", "--device", value, *FAST) == ExitCode.USAGE


@pytest.mark.parametrize("flag", ["--nprocs", "--omp-nthreads"])
def test_thread_counts_must_be_positive(simple_dataset: Path, tmp_path: Path, flag: str) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "participant", flag, "0", *FAST) == ExitCode.USAGE


def test_omp_nthreads_sets_torch_threads(simple_dataset: Path, tmp_path: Path, tiny_model: Path) -> None:
    before = torch.get_num_threads()
    try:
        args = ["--omp-nthreads", "1", "--participant-label", "01", *FAST, *participant_args(tiny_model)]
        assert run_cli(simple_dataset, tmp_path / "out", "participant", *args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bad_healthy_filter_is_usage_error(simple_dataset: Path, tmp_path: Path) -> None:
    assert run_cli(simple_dataset, tmp_path / "out", "group", "--healthy-filter", "pathology", *FAST) == ExitCode.USAGE


def test_unreadable_label_file_is_usage_error(simple_dataset: Path, tmp_path: Path) -> None:
    code = run_cli(simple_dataset, tmp_path / "out", "participant", "--participant-label", f"@{tmp_path / 'none.txt'}", *FAST)
    assert code == ExitCode.USAGE


def test_segmentation_flags_reach_the_settings() -> None:
    args = cli.parse_args(["b", "o", "participant", "--polarity", "dark", "--strength", "0.4", "0.6",
                           "--n-samples", "3", "--no-adapter"])
    seg = cli.settings_from_args(args).segmentation
    assert seg.polarity == "dark" and seg.strengths == (0.4, 0.6) and seg.n_samples == 3 and not seg.use_adapter
    assert cli.settings_from_args(cli.parse_args(["b", "o", "participant"])).segmentation.polarity == "auto"


def test_grow_flags_reach_the_settings() -> None:
    def seg(*flags: str):
        return cli.settings_from_args(cli.parse_args(["b", "o", "participant", *flags])).segmentation
    assert seg().grow_quantile == 0.995 and seg().grow_median_size == 1
    assert seg("--grow-quantile", "0.95").grow_quantile == 0.95
    assert seg("--no-grow").grow_quantile is None
    with pytest.raises(UsageError, match="exclude each other"):
        seg("--no-grow", "--grow-quantile", "0.9")
    with pytest.raises(UsageError, match="grow_quantile"):
        seg("--grow-quantile", "1.5")


def test_noising_flag_reaches_the_settings() -> None:
    default = cli.settings_from_args(cli.parse_args(["b", "o", "participant"])).segmentation
    assert (default.noising, default.strengths) == ("patch", (0.8,))
    seg = cli.settings_from_args(cli.parse_args(["b", "o", "participant", "--noising", "region"])).segmentation
    assert seg.noising == "region"
    with pytest.raises(UsageError, match="--noising"):
        cli.parse_args(["b", "o", "participant", "--noising", "everything"])


def test_fast_path_flags_reach_the_settings() -> None:
    default = cli.settings_from_args(cli.parse_args(["b", "o", "participant"])).segmentation
    assert (default.batch_size, default.precision, default.compile) == (16, "auto", False)
    args = cli.parse_args(["b", "o", "participant", "--inference-batch-size", "4", "--precision", "fp16", "--compile"])
    seg = cli.settings_from_args(args).segmentation
    assert (seg.batch_size, seg.precision, seg.compile) == (4, "fp16", True)
    with pytest.raises(UsageError, match="--inference-batch-size"):
        cli.settings_from_args(cli.parse_args(["b", "o", "participant", "--inference-batch-size", "0"]))
