"""benchmarks/hardware_time.py --tiny: both levels run as a user runs them, and the report says per stage
what was measured and what was extrapolated."""
from __future__ import annotations

import json

import pytest

from benchmarks import hardware_time
from benchmarks.hardware_time import budget_steps, duration, markdown, parse_steps
from bids_app.errors import UsageError

PHASES = ["vqgan", "vqgan + discriminators", "diffusion", "adapter"]

pytestmark = pytest.mark.slow  # runs both levels


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    workdir = tmp_path_factory.mktemp("hardware_time")
    out = workdir / "report.json"
    assert hardware_time.main([str(workdir), "--tiny", "--omp-nthreads", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text()), workdir


def test_participant_level_on_one_image(tiny_report) -> None:  # noqa: ANN001
    report, _ = tiny_report
    assert report["mode"] == "tiny" and list(report["presets"]) == ["tiny"] and report["omp_nthreads"] == 1
    assert report["image"] == {"shape": [40, 40, 80], "spacing_mm": 0.8, "field_of_view_mm": [32.0, 32.0, 64.0]}
    participant = report["presets"]["tiny"]["participant"]
    assert participant["image"] == "sub-01_T2w"
    assert participant["wall_s"] > participant["synthesis_s"] > 0
    assert participant["peak_rss_bytes"] > 50 * 2**20  # the whole process: interpreter, torch, models
    assert report["date"] and "commit" in report and report["machine"]["cpu_count"] >= 1


def test_group_level_per_stage_is_extrapolated_from_measured_steps(tiny_report) -> None:  # noqa: ANN001
    report, _ = tiny_report
    group = report["presets"]["tiny"]["group"]
    assert group["steps_per_stage"] == 2 and group["wall_s"] > 0 and group["peak_rss_bytes"] > 0
    assert list(group["stages"]) == PHASES
    budget = budget_steps("tiny")
    for phase, row in group["stages"].items():
        assert row["median_s"] > 0 and row["n"] == 1
        assert row["per_1000_steps_s"] == pytest.approx(1000 * row["median_s"])
        assert row["budget_steps"] == budget[phase]
        assert row["at_budget_s"] == pytest.approx(budget[phase] * row["median_s"])
    table = markdown(report)
    assert "**extrapolated**" in table and "| tiny | vqgan + discriminators |" in table
    assert "| preset | wall time (s) | synthesis (s) | peak RSS (MiB) |" in table


def test_a_second_measurement_in_the_same_workdir_is_refused(tiny_report, capsys) -> None:  # noqa: ANN001
    _, workdir = tiny_report
    assert hardware_time.main([str(workdir), "--tiny"]) == 64
    assert "exists" in capsys.readouterr().err


def test_budgets_steps_and_durations() -> None:
    assert budget_steps("default") == {"vqgan": 500, "vqgan + discriminators": 1500, "diffusion": 2000,
                                       "adapter": 2000}
    assert budget_steps("tiny") == {"vqgan": 40, "vqgan + discriminators": 20, "diffusion": 80, "adapter": 40}
    assert parse_steps(["default=3"], ["tiny", "default"]) == {"tiny": 10, "default": 3}
    with pytest.raises(UsageError, match="PRESET=N"):
        parse_steps(["default=1"], ["default"])
    assert [duration(s) for s in (4.25, 59, 600, 9000)] == ["4.2 s", "59 s", "10 min", "2.5 h"]
