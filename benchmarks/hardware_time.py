"""Hardware and time on CPU: the participant level on one spine-generic-size image, and the group
level's time per stage per 1000 steps, for each preset.

    python benchmarks/hardware_time.py WORKDIR [--preset tiny default] [--steps tiny=10 default=4]
        [--omp-nthreads N] [--out hardware_time.json]
    python benchmarks/hardware_time.py WORKDIR --tiny      # the fast mode the test runs

The image: one healthy phantom participant, sagittal 3D T2w at 0.8 mm isotropic over a 51.2 x 256 x
256 mm field of view (64 x 320 x 320 voxels), in WORKDIR/bids. For each preset, in WORKDIR/<preset>:

1. the group level with ``--steps`` steps per stage (the VQ-GAN's discriminators from halfway) on
   that participant: a model that is as good as random weights, which is all that time and memory
   need; it calibrates on the same image (no held-out participant). Each step's time is the one the
   training loop writes to ``losses.jsonl`` (data loading and augmentation included); per stage
   (the VQ-GAN per phase, without and with discriminators) the median step after the warm-up step
   is **extrapolated** linearly to 1000 steps and to the preset's own step budget;
2. the participant level on the image, with the preset's segmentation settings.

Each level runs as a user runs it (``run.py``, in its own interpreter, timed from outside, BIDS
validation skipped); peak RSS is the process's own high-water mark (``wait4``: interpreter, torch,
data and models). The synthesis seconds are the image's ``*_evaluation.json`` ``seconds`` (the
counterfactual and residual, without reading, writing and reports). Prints markdown tables and
writes the JSON report, with the machine, the date and the commit. Exit 0; 64 for a usage error (a
WORKDIR/<preset> left by an earlier measurement, a bad ``--steps``); 1 when a level fails.

``--tiny``: the tiny preset only, on the generator's small default field of view, 16^3 model-space
volumes, 2 steps per stage and one denoising chain per window: seconds, for the test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.level_runs import (  # noqa: E402
    SPINE_GENERIC_FOV,
    TRAINED_STAGES,
    checkpoint_folder,
    few_steps,
    image_seconds,
    make_dataset,
    mib,
    phase_times,
    run_process,
    step_seconds,
)
from bids_app.errors import UsageError  # noqa: E402

PRESETS = ("tiny", "default")
DEFAULT_STEPS = {"tiny": 10, "default": 4}
EXTRAPOLATED_TO = 1000
#: --tiny: a small image (40 x 40 x 80 at 0.8 mm), 16^3 model-space volumes, one chain per window.
TINY_FOV = (32.0, 32.0, 64.0)
TINY_SETTINGS = {"preprocessing": {"max_shape": [16, 16, 16]},
                 "segmentation": {"counterfactual": {"patch_period": 1, "patch_offsets": 1}}}


def budget_steps(preset: str) -> dict[str, int]:
    """The preset's own step budget per phase: VQ-GAN before and after ``disc_start``, then the others."""
    from benchmarks.measurement import preset_settings

    training = preset_settings(preset).training
    vqgan = training.vqgan
    return {"vqgan": min(vqgan.disc_start, vqgan.max_steps),
            "vqgan + discriminators": max(vqgan.max_steps - vqgan.disc_start, 0),
            "diffusion": training.diffusion.max_steps, "adapter": training.adapter.max_steps}


def measure_preset(bids: Path, folder: Path, preset: str, steps: int, settings: Mapping[str, Any],
                   options: Sequence[str]) -> dict[str, Any]:
    """Group level (few steps), then the participant level on the one image, each in its own process."""
    from bids_app.settings import merge_overrides

    folder.mkdir(parents=True)
    out = folder / "out"
    config = folder / "config.json"
    config.write_text(json.dumps(merge_overrides(few_steps({s: steps for s in TRAINED_STAGES}), settings), indent=2))
    common = ["--preset", preset, "--config", str(config), "--device", "cpu", "--skip-bids-validation", *options]
    print(f"{preset}: group level, {steps} steps per stage ...", flush=True)
    group = run_process([str(bids), str(out), "group", *common])
    if group.exit_code != 0:
        raise SystemExit(f"{preset}: the group level failed (exit {group.exit_code}); see {out / 'logs'}")
    budget = budget_steps(preset)
    stages = {}
    for stage in TRAINED_STAGES:
        seconds = step_seconds(checkpoint_folder(out) / stage / "losses.jsonl")
        for phase in phase_times(stage, seconds, steps // 2 if stage == "vqgan" else None):
            stages[phase.phase] = {**phase.to_dict(), "stage": stage,
                                   "per_1000_steps_s": phase.median_s * EXTRAPOLATED_TO,
                                   "budget_steps": budget[phase.phase],
                                   "at_budget_s": phase.median_s * budget[phase.phase]}
    print(f"{preset}: participant level on one image ...", flush=True)
    participant = run_process([str(bids), str(out), "participant", *common])
    synthesis = image_seconds(out)
    if participant.exit_code != 0 or len(synthesis) != 1:
        raise SystemExit(f"{preset}: the participant level failed (exit {participant.exit_code}); see {out / 'logs'}")
    return {"group": {"wall_s": group.seconds, "peak_rss_bytes": group.peak_rss_bytes, "steps_per_stage": steps,
                      "stages": stages},
            "participant": {"wall_s": participant.seconds, "peak_rss_bytes": participant.peak_rss_bytes,
                            "synthesis_s": next(iter(synthesis.values())), "image": next(iter(synthesis))}}


def commit() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD") or None,
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "uncommitted_changes": None}


def markdown(report: Mapping[str, Any]) -> str:
    """The participant-level and group-level tables, headed by what was measured where and when."""
    machine = report["machine"]
    image = report["image"]
    lines = [f"Measured {report['date']} at commit {report['commit'] or 'unknown'}"
             f"{' (with uncommitted changes)' if report['uncommitted_changes'] else ''} on {machine['cpu']} "
             f"({machine['cpu_count']} CPUs, torch {machine['torch']}), CPU only.", "",
             f"Participant level, one image ({'x'.join(map(str, image['shape']))} voxels at "
             f"{image['spacing_mm']} mm, sagittal T2w), weights trained for a few steps (as random):", "",
             "| preset | wall time (s) | synthesis (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    for preset, row in report["presets"].items():
        part = row["participant"]
        lines.append(f"| {preset} | {part['wall_s']:.1f} | {part['synthesis_s']:.1f} | "
                     f"{mib(part['peak_rss_bytes']):.0f} |")
    lines += ["", f"Group level per stage, **extrapolated** from the median step time of a few measured steps "
              f"to {EXTRAPOLATED_TO} steps and to the preset's own budget:", "",
              "| preset | stage | s/step | measured steps | per 1000 steps | preset's steps | at the preset's budget |",
              "|---|---|---|---|---|---|---|"]
    for preset, row in report["presets"].items():
        for phase, stage in row["group"]["stages"].items():
            lines.append(f"| {preset} | {phase} | {stage['median_s']:.2f} | {stage['n']} | "
                         f"{duration(stage['per_1000_steps_s'])} | {stage['budget_steps']} | "
                         f"{duration(stage['at_budget_s'])} |")
    lines.append("")
    for preset, row in report["presets"].items():
        group = row["group"]
        lines.append(f"{preset}: the {group['steps_per_stage']}-step group run (preprocessing and calibration "
                     f"included) took {duration(group['wall_s'])}, peak RSS {mib(group['peak_rss_bytes']):.0f} MiB.")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """Seconds, minutes or hours, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def parse_steps(values: Sequence[str], presets: Sequence[str]) -> dict[str, int]:
    """``["default=4"]`` -> that preset's steps; the others keep :data:`DEFAULT_STEPS`."""
    steps = {p: DEFAULT_STEPS[p] for p in presets}
    for value in values:
        name, _, number = value.partition("=")
        if name not in PRESETS or not number.isdigit() or int(number) < 2:
            raise UsageError(f"--steps {value}: expected PRESET=N with PRESET in {', '.join(PRESETS)} and N >= 2")
        steps[name] = int(number)
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.measurement import machine_info
    from bids_app.errors import ExitCode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="dataset (reused) and one folder per preset (must not exist)")
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--steps", nargs="*", default=[], metavar="PRESET=N",
                        help=f"steps per stage (default {' '.join(f'{k}={v}' for k, v in DEFAULT_STEPS.items())})")
    parser.add_argument("--omp-nthreads", type=int, help="threads of each run (default: the CPUs allowed)")
    parser.add_argument("--tiny", action="store_true", help="tiny preset on a small image: the test's mode")
    parser.add_argument("--out", type=Path, help="the JSON report (default WORKDIR/hardware_time.json)")
    args = parser.parse_args(argv)
    presets = ["tiny"] if args.tiny else args.preset
    try:
        steps = {"tiny": 2} if args.tiny else parse_steps(args.steps, presets)
        for preset in presets:
            if (args.workdir / preset).exists():
                raise UsageError(f"{args.workdir / preset} exists (an earlier measurement): remove it first")
    except UsageError as exc:
        print(f"hardware_time: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    fov = TINY_FOV if args.tiny else SPINE_GENERIC_FOV
    bids = args.workdir.absolute() / "bids"
    make_dataset(bids, n_healthy=1, n_lesion=0, field_of_view=fov)
    options = ["--omp-nthreads", str(args.omp_nthreads)] if args.omp_nthreads else []
    settings = TINY_SETTINGS if args.tiny else {}
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), **commit(), "machine": machine_info("cpu"),
        "omp_nthreads": args.omp_nthreads, "mode": "tiny" if args.tiny else "full",
        "image": {"shape": [round(f / 0.8) for f in fov], "spacing_mm": 0.8, "field_of_view_mm": list(fov)},
        "extrapolation": f"median step time (after the warm-up step) x {EXTRAPOLATED_TO} and x the preset's steps",
        "presets": {},
    }
    for preset in presets:
        report["presets"][preset] = measure_preset(bids, args.workdir.absolute() / preset, preset, steps[preset],
                                                   settings, options)
    (args.out or args.workdir / "hardware_time.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
