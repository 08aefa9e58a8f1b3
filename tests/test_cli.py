"""The command line: flags, aliases, exit codes and messages (BIDS-Apps conventions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bids_app import __version__, cli
from bids_app.errors import ExitCode, UsageError
from bids_app.settings import PRECISIONS, RunSettings
from bids_app.settings.fields import field_at, help_text
from bids_app.settings.segmentation import POLARITIES

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


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_still_prints_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str) -> None:
    missing = tmp_path / "nowhere"
    assert run_cli(missing, tmp_path / "out", "group", flag) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"ERROR: bids_dir {missing} does not exist" in err and "INFO" not in err


def test_quiet_hides_info_that_the_default_console_shows(simple_dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run logs at INFO (the derivatives searched) and prints its listing: -q keeps the listing."""
    args = [simple_dataset, tmp_path / "out", "participant", "--dry-run", *FAST]
    assert run_cli(*args) == 0
    loud = capsys.readouterr()
    assert run_cli(*args, "-q") == 0
    quiet = capsys.readouterr()
    assert "INFO" in loud.err and "INFO" not in quiet.err
    assert quiet.out == loud.out and "sub-01" in quiet.out


def test_quiet_reaches_both_levels_of_the_demo(tmp_path: Path) -> None:
    from bids_app import demo

    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text("{}")  # an existing dataset is reused
    calls: list[list[str]] = []
    args = cli.parse_args(["--demo", str(tmp_path), "-q"])
    assert demo.run_demo(tmp_path, args, lambda argv: calls.append(list(argv)) or 0) == 0
    assert [argv[2] for argv in calls] == ["group", "participant"] and all("-q" in argv for argv in calls)


def test_verbose_and_quiet_exclude_each_other(tmp_path: Path, caplog) -> None:
    assert run_cli(tmp_path, tmp_path / "out", "group", "-v", "-q") == ExitCode.USAGE
    assert "not allowed with argument" in caplog.text


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


def settings_of(*flags: object):
    return cli.settings_from_args(cli.parse_args(["b", "o", "participant", *map(str, flags)]))


def test_segmentation_flags_reach_the_settings() -> None:
    seg = settings_of("--polarity", "dark", "--strength", "0.4", "0.6", "--n-samples", "3", "--no-adapter").segmentation
    assert seg.residual.polarity == "dark" and seg.counterfactual.strengths == (0.4, 0.6)
    assert seg.counterfactual.n_samples == 3 and seg.counterfactual.adapter_scale == 0.0
    default = settings_of().segmentation
    assert default.residual.polarity == "auto" and default.counterfactual.strengths == (0.8,)
    assert default.counterfactual.adapter_scale == 1.0
    assert settings_of("--adapter-scale", "0.5").segmentation.counterfactual.adapter_scale == 0.5
    assert settings_of("--threshold", "0.3").segmentation.lesions.threshold == 0.3
    assert settings_of("--strength-sweep", "0.2:0.6:0.2").segmentation.strength_sweep == (0.2, 0.4, 0.6)
    assert settings_of("--seed", "5").compute.seed == 5


def test_grow_flags_reach_the_settings() -> None:
    assert settings_of().segmentation.lesions.grow_quantile == 0.995
    assert settings_of("--grow-quantile", "0.95").segmentation.lesions.grow_quantile == 0.95
    with pytest.raises(UsageError, match="exclude each other"):
        settings_of("--no-grow", "--grow-quantile", "0.9")
    with pytest.raises(UsageError, match="segmentation.lesions.grow_quantile"):
        settings_of("--grow-quantile", "1.5")


def test_no_grow_switches_growth_off() -> None:
    assert settings_of("--no-grow").segmentation.lesions.grow_quantile is None


def test_fast_path_flags_reach_the_settings() -> None:
    default = settings_of().compute
    assert (default.inference_batch_size, default.precision, default.max_latent_voxels) == (16, "auto", None)
    compute = settings_of("--inference-batch-size", "4", "--precision", "fp16").compute
    assert (compute.inference_batch_size, compute.precision) == (4, "fp16")
    with pytest.raises(UsageError, match="compute.inference_batch_size"):
        settings_of("--inference-batch-size", "0")


def test_overwrite_sets_the_run_setting() -> None:
    assert settings_of().overwrite is False and settings_of("--overwrite").overwrite is True


def _action(flag: str):
    return next(a for a in cli.build_parser()._actions if flag in a.option_strings)


def test_flag_help_and_choices_come_from_the_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: the help text is not wrapped
    strengths = field_at(RunSettings, "segmentation.counterfactual.strengths")
    assert strengths.default == (0.8,) and help_text(strengths).endswith("(default: 0.8)")
    assert help_text(strengths) in cli.build_parser().format_help()
    assert _action("--strength").help == help_text(strengths)
    polarity = field_at(RunSettings, "segmentation.residual.polarity")
    assert tuple(_action("--polarity").choices) == polarity.metadata["choices"] == POLARITIES
    assert tuple(_action("--precision").choices) == PRECISIONS
    for flag, path, _ in cli.SETTING_FLAGS:
        declaration = field_at(RunSettings, path)
        assert _action(flag).help == help_text(declaration), flag
        assert _action(flag).choices == declaration.metadata.get("choices"), flag
    assert _action("--seed").help == help_text(field_at(RunSettings, "compute.seed"))


def test_a_polarity_outside_the_declared_choices_is_exit_64(tmp_path: Path, caplog) -> None:
    assert run_cli(tmp_path, tmp_path / "out", "participant", "--polarity", "up") == ExitCode.USAGE
    assert "--polarity" in caplog.text and "invalid choice" in caplog.text


def test_no_adapter_and_adapter_scale_exclude_each_other(tmp_path: Path, caplog) -> None:
    code = run_cli(tmp_path, tmp_path / "out", "participant", "--no-adapter", "--adapter-scale", "1")
    assert code == ExitCode.USAGE
    assert "exclude each other" in caplog.text


@pytest.mark.parametrize("flags", [["--steps", "1"], ["--sampler", "ddim"], ["--noising", "patch"], ["--compile"]],
                         ids=lambda flags: flags[0])
def test_removed_flags_are_exit_64(tmp_path: Path, flags: list[str], caplog) -> None:
    assert flags[0] not in option_strings()
    assert run_cli(tmp_path, tmp_path / "out", "participant", *flags) == ExitCode.USAGE
    assert flags[0] in caplog.text


def test_an_invalid_flag_value_names_the_setting(tmp_path: Path, caplog) -> None:
    assert run_cli(tmp_path, tmp_path / "out", "participant", "--n-samples", "0") == ExitCode.USAGE
    assert "segmentation.counterfactual.n_samples" in caplog.text


# --config files of 0.1.0 (flat segmentation keys).

def test_an_old_config_key_lands_on_its_new_path_with_a_warning(tmp_path: Path, caplog) -> None:
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"segmentation": {"strengths": [0.6], "polarity": "dark"}}))
    with caplog.at_level("WARNING"):
        seg = settings_of("--config", config).segmentation
    assert seg.counterfactual.strengths == (0.6,) and seg.residual.polarity == "dark"
    assert "segmentation.strengths is deprecated: it is now segmentation.counterfactual.strengths" in caplog.text
    assert "segmentation.polarity is deprecated: it is now segmentation.residual.polarity" in caplog.text


def test_an_old_config_key_with_the_kept_value_is_accepted_with_a_warning(tmp_path: Path, caplog) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("segmentation:\n  steps: 1\n  sampler: ddim\n")
    with caplog.at_level("WARNING"):
        settings = settings_of("--config", config)
    assert settings.segmentation == settings_of().segmentation
    assert "segmentation.steps was removed" in caplog.text and "segmentation.sampler was removed" in caplog.text


@pytest.mark.parametrize("content, key", [("segmentation:\n  noising: region\n", "segmentation.noising"),
                                          ("segmentation:\n  steps: 10\n", "segmentation.steps"),
                                          ("training:\n  vqgan:\n    cord_weight: 4\n", "training.vqgan.cord_weight")])
def test_an_old_config_key_with_a_removed_value_is_exit_64(tmp_path: Path, caplog, content: str, key: str) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(content)
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        settings_of("--config", config)
    assert run_cli(tmp_path, tmp_path / "out", "participant", "--config", config) == ExitCode.USAGE
    assert key in caplog.text


def test_an_old_config_key_given_under_both_names_must_agree(tmp_path: Path) -> None:
    config = tmp_path / "both.json"
    config.write_text(json.dumps({"segmentation": {"strengths": [0.6], "counterfactual": {"strengths": [0.4]}}}))
    with pytest.raises(UsageError, match="segmentation.counterfactual.strengths is given twice"):
        settings_of("--config", config)


def test_a_flag_overrides_an_old_config_key(tmp_path: Path) -> None:
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"segmentation": {"strengths": [0.6]}}))
    assert settings_of("--config", config, "--strength", "0.4").segmentation.counterfactual.strengths == (0.4,)


def test_a_flag_overrides_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "new.json"
    config.write_text(json.dumps({"segmentation": {"counterfactual": {"strengths": [0.6]}}}))
    assert settings_of("--config", config).segmentation.counterfactual.strengths == (0.6,)
    assert settings_of("--config", config, "--strength", "0.4").segmentation.counterfactual.strengths == (0.4,)
