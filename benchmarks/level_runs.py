"""What gpu_check.py and hardware_time.py share: a spine-generic-size phantom, a few-step training
budget, running the app's own levels, and reading back what the app recorded.

Both scripts time the app as a user runs it (``bids_app.cli``), never a re-implementation: the step
times are those the training loop itself writes to ``losses.jsonl`` (``time_s``: seconds since the
stage's loop started, after each step, data loading and augmentation included), and the seconds of
each image's counterfactual synthesis are those of its ``*_evaluation.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Field of view (mm; left-right, anterior-posterior, inferior-superior) that the phantom's 3D sagittal
#: acquisition samples at 0.8 mm into 64 x 320 x 320 voxels: a spine-generic sagittal T2w.
SPINE_GENERIC_FOV = (51.2, 256.0, 256.0)
#: The generator's sag-iso participants cycle through 0.8, 1.0 and 0.9 mm: the 1st, 4th, 7th ... are 0.8 mm.
ISOTROPIC_08_EVERY = 3
TRAINED_STAGES = ("vqgan", "diffusion", "adapter")
#: A step this long (seconds) is measured alone: its warm-up (allocations, kernel choice) is negligible.
LONG_STEP_S = 30.0


def make_dataset(root: Path, n_healthy: int, n_lesion: int, field_of_view: Sequence[float], seed: int = 0) -> Any:
    """A T2w phantom dataset of 3D sagittal isotropic images (reused when ``root`` already holds one)."""
    from bids_app.synthetic import generate_dataset

    if (root / "dataset_description.json").is_file():
        return None
    return generate_dataset(root, n_healthy=n_healthy, n_lesion=n_lesion, seed=seed,
                            field_of_view=tuple(field_of_view), acquisitions=("sag-iso",))


def few_steps(steps: Mapping[str, int], checkpoint_every: int = 1000) -> dict[str, Any]:
    """A ``--config`` training budget of ``steps[stage]`` steps per stage, logged at every step, no
    figures; the VQ-GAN's discriminators start halfway, so both of its phases are measured."""
    training: dict[str, Any] = {}
    for stage in TRAINED_STAGES:
        training[stage] = {"max_steps": steps[stage], "log_every": 1, "figure_every": 0,
                           "checkpoint_every": checkpoint_every}
    training["vqgan"]["disc_start"] = steps["vqgan"] // 2
    return {"training": training}


def checkpoint_folder(out: Path) -> Path:
    """The checkpoints (and ``losses.jsonl``) of the model in ``out/models``, with the default work dir."""
    from bids_app.workspace import checkpoints_dir

    return checkpoints_dir(out / "work", out / "models")


def step_seconds(losses: Path, restarts: Iterable[int] = ()) -> dict[int, float]:
    """Seconds of each step (1-based) from the loop's ``losses.jsonl``. ``time_s`` counts from the
    start of the loop that ran the step, so a step right after a (re)start (step 1, or ``k + 1`` for a
    loop resumed from step ``k``) took ``time_s`` itself, any other the difference to the step before."""
    starts = {0, *restarts}
    logged = [json.loads(line) for line in losses.read_text().splitlines() if line]
    entries = sorted((int(e["step"]), float(e["time_s"])) for e in logged)
    seconds, previous = {}, 0.0
    for step, elapsed in entries:
        seconds[step] = elapsed if step - 1 in starts else elapsed - previous
        previous = elapsed
    return seconds


@dataclass(frozen=True)
class StepTime:
    """The typical step of one phase of a stage: its median seconds over ``n`` steps."""

    phase: str
    median_s: float
    n: int
    source: str  # what the median is over

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "median_s": self.median_s, "n": self.n, "source": self.source}


def phase_times(stage: str, seconds: Mapping[int, float], disc_start: int | None = None,
                warm_up: Iterable[int] = ()) -> list[StepTime]:
    """Median step time of each phase of a stage: the VQ-GAN before and after ``disc_start`` (its
    discriminators then train too), every other stage in one phase. The warm-up steps (the first of
    each phase, and ``warm_up``) are left out where the phase has other steps and they are shorter
    than :data:`LONG_STEP_S`."""
    if stage == "vqgan" and disc_start is not None:
        phases = {"vqgan": [s for s in seconds if s <= disc_start],
                  "vqgan + discriminators": [s for s in seconds if s > disc_start]}
    else:
        phases = {stage: list(seconds)}
    times = []
    for phase, steps in phases.items():
        steps = sorted(steps)
        if not steps:
            continue
        skipped = {steps[0], *warm_up}
        kept = [s for s in steps if s not in skipped]
        if kept and max(seconds[s] for s in steps) < LONG_STEP_S:
            times.append(StepTime(phase, statistics.median(seconds[s] for s in kept), len(kept),
                                  "median of the steps after the warm-up"))
        else:
            times.append(StepTime(phase, statistics.median(seconds[s] for s in steps), len(steps),
                                  "median of all steps (warm-up included)"))
    return times


def image_seconds(out: Path) -> dict[str, float]:
    """Seconds of each image's counterfactual synthesis and residual, as its ``*_evaluation.json`` says."""
    return {path.name.removesuffix("_evaluation.json"): float(json.loads(path.read_text())["seconds"])
            for path in sorted(out.glob("sub-*/**/*_evaluation.json"))}


def participant_labels(dataset: Path) -> list[tuple[str, str]]:
    """(label, pathology) of every participant in participants.tsv, in order."""
    rows = [line.split("\t") for line in (dataset / "participants.tsv").read_text().splitlines()]
    header = rows[0]
    return [(row[0].removeprefix("sub-"), row[header.index("pathology")]) for row in rows[1:] if row]


@dataclass(frozen=True)
class ProcessRun:
    """One level run in its own interpreter: exit code, wall seconds, the process's peak resident set."""

    exit_code: int
    seconds: float
    peak_rss_bytes: int


def run_process(arguments: Sequence[str], env: Mapping[str, str] | None = None) -> ProcessRun:
    """``run.py ARGUMENTS`` in a fresh interpreter, timed from outside; its own peak RSS from ``wait4``
    (interpreter, torch and the data included: what a machine must hold)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *arguments], env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return ProcessRun(child.returncode, time.perf_counter() - started, int(usage.ru_maxrss) * 1024)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
