"""benchmarks/level_runs.py: step times from the training loop's log, phases, warm-up, the training budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.level_runs import LONG_STEP_S, few_steps, phase_times, step_seconds


def write_losses(path: Path, entries: list[tuple[int, float]]) -> Path:
    path.write_text("".join(json.dumps({"step": s, "time_s": t, "loss": 1.0}) + "\n" for s, t in entries))
    return path


def test_step_seconds_restart_at_a_resume(tmp_path: Path) -> None:
    # Steps 1-3 in one loop; resumed from step 3, the clock starts again for steps 4-5.
    losses = write_losses(tmp_path / "losses.jsonl", [(1, 2.0), (2, 2.5), (3, 3.25), (4, 1.5), (5, 2.0)])
    assert step_seconds(losses, restarts=[3]) == pytest.approx({1: 2.0, 2: 0.5, 3: 0.75, 4: 1.5, 5: 0.5})


def test_phases_leave_out_the_warm_up_steps() -> None:
    seconds = {1: 9.0, 2: 1.0, 3: 1.2, 4: 8.0, 5: 2.0, 6: 2.2, 7: 2.4}
    before, after = phase_times("vqgan", seconds, disc_start=3)
    assert (before.phase, before.median_s, before.n) == ("vqgan", pytest.approx(1.1), 2)
    assert (after.phase, after.median_s, after.n) == ("vqgan + discriminators", pytest.approx(2.2), 3)
    (one,) = phase_times("diffusion", seconds, warm_up=[4])
    assert one.n == 5 and one.median_s == pytest.approx(2.0) and "after the warm-up" in one.source


def test_a_phase_of_one_step_or_of_long_steps_keeps_them_all() -> None:
    (single,) = phase_times("adapter", {1: 3.0})
    assert single.n == 1 and single.median_s == 3.0 and "warm-up included" in single.source
    long = {1: LONG_STEP_S + 10, 2: LONG_STEP_S, 3: LONG_STEP_S + 2}
    (phase,) = phase_times("diffusion", long)
    assert phase.n == 3 and phase.median_s == LONG_STEP_S + 2


def test_few_steps_budget() -> None:
    config = few_steps({"vqgan": 6, "diffusion": 4, "adapter": 2})["training"]
    assert config["vqgan"]["max_steps"] == 6 and config["vqgan"]["disc_start"] == 3
    assert config["adapter"] == {"max_steps": 2, "log_every": 1, "figure_every": 0, "checkpoint_every": 1000}
