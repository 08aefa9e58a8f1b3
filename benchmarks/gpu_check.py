"""GPU readiness: the default preset trained, interrupted, resumed and run on a spine-generic-size phantom.

    python benchmarks/gpu_check.py WORKDIR [--device cuda] [--steps 8] [--precision auto] [--out FILE]
    python benchmarks/gpu_check.py WORKDIR --tiny      # the same path on CPU, tiny preset and volumes

One process, through the app's own command line (``bids_app.cli.main``), as a user runs it:

1. generates a phantom BIDS dataset in WORKDIR/bids (reused when there): 3 healthy and 2 lesion
   participants, sagittal 3D T2w over a 51.2 x 256 x 256 mm field of view (64 x 320 x 320 voxels
   at 0.8 mm; the generator's later participants are at 1.0 and 0.9 mm);
2. runs the group level (default preset, ``--steps`` steps per stage, the VQ-GAN's discriminators from
   halfway, autocast per ``--precision``: ``auto`` is bf16 where the GPU supports it) with a kill
   point that sends SIGTERM after step ``--steps // 2`` of the diffusion stage: the run saves a
   checkpoint there and exits 143 (``bids_app.killpoints``, ``bids_app.interruption``);
3. reruns the same command, which must keep the finished VQ-GAN, resume the diffusion stage from that
   step, train the adapter, calibrate and write the model card;
4. runs the participant level on the two lesion participants.

It prints each stage's step time (median after the warm-up step, from the loop's own
``losses.jsonl``: data loading and augmentation included) and peak memory (CUDA
``max_memory_allocated`` over the stage; on CPU the resident set's increase), the participant
level's seconds per image (the synthesis, from each ``*_evaluation.json``, and the level's wall time
per image) and its peak memory, the checks, and ends with one summary line ``GPU CHECK PASS`` or
``GPU CHECK FAIL``. On a GPU the whole check must end within 8 minutes (a check; the dataset's
generation counts). Exit 0 when every check passed, 1 when one failed, 64 for a usage error (no
CUDA device without ``--tiny`` or ``--device cpu``; a WORKDIR/out left by an earlier run).

``--tiny``: the tiny preset on CPU, the generator's default (small) field of view, 16^3 model-space
volumes, 2 steps per stage and one denoising chain per window; what tests/benchmarks runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    participant_labels,
    phase_times,
    step_seconds,
)

#: Whole-check budget on one GPU (seconds): the issue's "under 8 minutes".
GPU_BUDGET_S = 8 * 60
INTERRUPTED_STAGE = "diffusion"


@dataclass(frozen=True)
class CheckSpec:
    """What one check runs: preset, data, budget and the app options that differ between the modes."""

    mode: str  # gpu or tiny
    preset: str
    field_of_view: tuple[float, ...]
    n_healthy: int
    n_lesion: int
    steps: int
    settings: dict[str, Any] = field(default_factory=dict)  # --config overrides beyond the step budget
    options: tuple[str, ...] = ()  # further run.py options


GPU_SPEC = CheckSpec("gpu", "default", SPINE_GENERIC_FOV, n_healthy=3, n_lesion=2, steps=8)
#: CPU path of the test: 16^3 volumes, and one chain per window (patches of every position noised at
#: once) instead of 54: the path is the same, the synthesis cheap.
TINY_SPEC = CheckSpec("tiny", "tiny", (32.0, 32.0, 64.0), n_healthy=2, n_lesion=2, steps=2,
                      settings={"preprocessing": {"max_shape": [16, 16, 16]},
                                "segmentation": {"counterfactual": {"patch_period": 1, "patch_offsets": 1}}},
                      options=("--omp-nthreads", "1"))


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


class StageProbe:
    """Peak memory and wall time of every ``run_stage`` call of the app's training loop (observed by
    wrapping ``bids_app.training.loop.run_stage``; the loop itself runs unchanged)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from benchmarks.measurement import PeakMemory
        from bids_app.training import loop

        original = loop.run_stage

        def probed(stage: Any, *args: Any, **kwargs: Any) -> Any:
            memory, started = PeakMemory(self.device), time.perf_counter()
            memory.start()
            entry: dict[str, Any] = {"stage": stage.name}
            try:
                result = original(stage, *args, **kwargs)
                entry["steps"] = result.steps
                return result
            finally:
                entry.update(seconds=time.perf_counter() - started, **memory.stop())
                self.records.append(entry)

        loop.run_stage = probed
        try:
            yield
        finally:
            loop.run_stage = original

    def peak_bytes(self, stage: str) -> int:
        """The stage's peak over its calls (CUDA: allocated; CPU: resident increase over the call's start)."""
        key = "peak_total_bytes" if self.device.startswith("cuda") else "peak_bytes"
        return max((r[key] for r in self.records if r["stage"] == stage), default=0)


class LogLines(logging.Handler):
    """The training's log lines (``bids_app.training``), kept to check what the app said it did."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @contextlib.contextmanager
    def attached(self) -> Iterator["LogLines"]:
        logger = logging.getLogger("bids_app.training")
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def run_level(argv: Sequence[str], kill_at: str | None = None) -> tuple[int, float]:
    """``cli.main(argv)`` in this process (optionally armed with a SIGTERM kill point): exit code, seconds."""
    from bids_app import cli, killpoints

    killpoints.reset()
    saved = {name: os.environ.get(name) for name in (killpoints.ENV_POINT, killpoints.ENV_SIGNAL)}
    if kill_at:
        os.environ.update({killpoints.ENV_POINT: kill_at, killpoints.ENV_SIGNAL: "TERM"})
    started = time.perf_counter()
    try:
        code = cli.main(list(argv))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return code, time.perf_counter() - started


def stage_table(out: Path, spec: CheckSpec, probe: StageProbe, resumed_at: int) -> dict[str, Any]:
    """Per trained stage: its step times per phase (from ``losses.jsonl``) and its peak memory."""
    table = {}
    for stage in TRAINED_STAGES:
        losses = checkpoint_folder(out) / stage / "losses.jsonl"
        if not losses.is_file():
            continue
        restarts = [resumed_at] if stage == INTERRUPTED_STAGE else []
        seconds = step_seconds(losses, restarts)
        phases = phase_times(stage, seconds, spec.steps // 2 if stage == "vqgan" else None,
                             warm_up=[r + 1 for r in restarts])
        table[stage] = {"steps_logged": sorted(seconds), "step_seconds": seconds,
                        "phases": [p.to_dict() for p in phases], "peak_bytes": probe.peak_bytes(stage)}
    return table


def checks_after_group(out: Path, spec: CheckSpec, first: int, second: int, lines: list[str],
                       stages: dict[str, Any], resumed_at: int) -> list[Check]:
    from bids_app.model_card import read_model_card

    steps = list(range(1, spec.steps + 1))
    resumed = f"{INTERRUPTED_STAGE}: resuming from step {resumed_at}"
    said_resumed = any(resumed in line for line in lines)
    kept = any(line.startswith("vqgan: already trained") for line in lines)
    checks = [Check("interrupted", first == 128 + signal.SIGTERM,
                    f"SIGTERM after {INTERRUPTED_STAGE} step {resumed_at}: exit {first}"),
              Check("resumed", second == 0 and said_resumed,
                    f"rerun exit {second}; the log {'says' if said_resumed else 'lacks'} '{resumed}'"),
              Check("kept the finished VQ-GAN", kept,
                    f"the rerun {'did not train' if kept else 'trained'} the VQ-GAN again")]
    for stage in TRAINED_STAGES:
        logged = stages.get(stage, {}).get("steps_logged")
        checks.append(Check(f"{stage} steps", logged == steps, f"steps logged {logged}"))
    try:
        card = read_model_card(out / "models")
        trained = {name: card["components"].get(name, {}).get("steps") for name in TRAINED_STAGES}
        checks.append(Check("model card", trained == {s: spec.steps for s in TRAINED_STAGES}
                            and card.get("calibration") is not None, f"components' steps {trained}, calibrated"))
    except Exception as exc:  # noqa: BLE001 - a check reports, it does not crash the report
        checks.append(Check("model card", False, str(exc)))
    return checks


def describe_device(device: str, precision: str) -> dict[str, Any]:
    import torch

    from bids_app.compute import amp_dtype

    dtype = amp_dtype(device, precision)
    info = {"device": device, "torch": torch.__version__, "autocast": str(dtype).replace("torch.", "") if dtype else
            "off", "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_check(workdir: Path, spec: CheckSpec, device: str, precision: str, budget_s: float | None) -> dict[str, Any]:
    """Generate, train with one interruption and resume, segment two images; the report as a dict."""
    from benchmarks.measurement import PeakMemory
    from bids_app.settings import merge_overrides

    started = time.perf_counter()
    bids, out = workdir / "bids", workdir / "out"
    make_dataset(bids, spec.n_healthy, spec.n_lesion, spec.field_of_view)
    generated = time.perf_counter() - started
    budget = few_steps({stage: spec.steps for stage in TRAINED_STAGES})
    for stage in TRAINED_STAGES:
        budget["training"][stage]["precision"] = precision
    config = workdir / "gpu_check_config.json"
    config.write_text(json.dumps(merge_overrides(budget, spec.settings), indent=2))
    common = ["--preset", spec.preset, "--config", str(config), "--device", device, "--precision", precision,
              "--skip-bids-validation", *spec.options]
    resumed_at = spec.steps // 2
    probe, lines = StageProbe(device), LogLines()
    with probe.installed(), lines.attached():
        group = [str(bids), str(out), "group", *common]
        first, first_s = run_level(group, kill_at=f"step:{INTERRUPTED_STAGE}@{resumed_at}")
        second, second_s = run_level(group)
    stages = stage_table(out, spec, probe, resumed_at)
    checks = checks_after_group(out, spec, first, second, lines.lines, stages, resumed_at)

    lesion = [label for label, pathology in participant_labels(bids) if pathology != "HC"][:2]
    memory = PeakMemory(device)
    memory.start()
    code, participant_s = run_level([str(bids), str(out), "participant", "--participant-label", *lesion, *common])
    participant_peak = memory.stop()
    per_image = image_seconds(out)
    checks.append(Check("participant level", code == 0 and len(per_image) == len(lesion),
                        f"exit {code}, {len(per_image)} of {len(lesion)} images segmented"))
    total = time.perf_counter() - started
    info = describe_device(device, precision)
    if device.startswith("cuda"):
        checks.append(Check("mixed precision", precision == "fp32" or info["autocast"] != "off",
                            f"autocast {info['autocast']}"))
    if budget_s is not None:
        checks.append(Check("time", total <= budget_s, f"{total:.0f} s of {budget_s:.0f} s"))
    peak_key = "peak_total_bytes" if device.startswith("cuda") else "peak_bytes"
    return {
        "mode": spec.mode, "preset": spec.preset, **info, "precision": precision,
        "dataset": {"root": str(bids), "n_healthy": spec.n_healthy, "n_lesion": spec.n_lesion,
                    "field_of_view_mm": list(spec.field_of_view), "generate_s": generated},
        "steps_per_stage": spec.steps, "interrupted_at": f"{INTERRUPTED_STAGE} step {resumed_at}",
        "group": {"interrupted_run_s": first_s, "resumed_run_s": second_s, "stages": stages,
                  "stage_calls": probe.records},
        "participant": {"images": per_image, "wall_s": participant_s,
                        "synthesis_s_per_image": statistics.median(per_image.values()) if per_image else None,
                        "wall_s_per_image": participant_s / max(len(lesion), 1),
                        "peak_bytes": participant_peak[peak_key], "memory": participant_peak},
        "checks": [vars(c) for c in checks], "passed": all(c.passed for c in checks), "total_s": total,
        "budget_s": budget_s,
    }


def print_report(report: dict[str, Any]) -> None:
    memory = "peak GPU memory" if report["device"].startswith("cuda") else "peak RSS increase"
    where = report.get("gpu", "CPU")
    print(f"\n{report['preset']} preset on {report['device']} ({where}), autocast {report['autocast']}, "
          f"torch {report['torch']}, {report['threads']} threads")
    print(f"\n| stage | phase | s/step | over | {memory} (MiB) |\n|---|---|---|---|---|")
    for stage, row in report["group"]["stages"].items():
        for phase in row["phases"]:
            print(f"| {stage} | {phase['phase']} | {phase['median_s']:.3f} | {phase['n']} step(s) | "
                  f"{mib(row['peak_bytes']):.0f} |")
    group = report["group"]
    print(f"\ngroup level: interrupted at {report['interrupted_at']} after {group['interrupted_run_s']:.1f} s, "
          f"resumed and finished in {group['resumed_run_s']:.1f} s")
    part = report["participant"]
    if part["synthesis_s_per_image"] is not None:
        print(f"participant level: {len(part['images'])} images, synthesis {part['synthesis_s_per_image']:.2f} "
              f"s/image (median), wall {part['wall_s_per_image']:.1f} s/image, {memory} "
              f"{mib(part['peak_bytes']):.0f} MiB")
    for check in report["checks"]:
        print(f"  [{'ok' if check['passed'] else 'FAILED'}] {check['name']}: {check['detail']}")
    print(summary_line(report))


def summary_line(report: dict[str, Any]) -> str:
    """One line: verdict, where, each stage's step time (the VQ-GAN's without/with discriminators), the peak
    memory, seconds per image, total time."""
    verdict = "PASS" if report["passed"] else "FAIL"
    stages = report["group"]["stages"]
    steps = ", ".join(f"{stage} {'/'.join(format(p['median_s'], '.3f') for p in row['phases'])} s/step"
                      for stage, row in stages.items())
    peak = max([row["peak_bytes"] for row in stages.values()] + [report["participant"]["peak_bytes"]])
    per_image = report["participant"]["synthesis_s_per_image"]
    label = "GPU CHECK" if report["mode"] == "gpu" else "GPU CHECK (--tiny, CPU path)"
    memory = "peak GPU memory" if report["device"].startswith("cuda") else "peak RSS increase"
    budget = f" (budget {report['budget_s'] / 60:.0f} min)" if report["budget_s"] else ""
    images = "no image segmented" if per_image is None else f"{per_image:.2f} s/image"
    return (f"{label} {verdict}: {report['preset']} preset on {report.get('gpu', report['device'])} "
            f"(autocast {report['autocast']}): {steps}; {memory} {mib(peak) / 1024:.2f} GiB; {images}; "
            f"total {report['total_s'] / 60:.1f} min{budget}")


def main(argv: Sequence[str] | None = None) -> int:
    from bids_app.errors import ExitCode, UsageError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="dataset (reused) and outputs (WORKDIR/out must not exist)")
    parser.add_argument("--tiny", action="store_true", help="the same path on CPU: tiny preset, tiny volumes")
    parser.add_argument("--device", default=None, help="auto, cuda, cuda:N or cpu (default: cuda; cpu with --tiny)")
    parser.add_argument("--steps", type=int, help="steps per stage (default 8; 2 with --tiny)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast on CUDA, training and inference (auto: bf16 where supported)")
    parser.add_argument("--out", type=Path, help="the JSON report (default WORKDIR/gpu_check.json)")
    args = parser.parse_args(argv)
    spec = TINY_SPEC if args.tiny else GPU_SPEC
    try:
        from bids_app.compute import resolve_device

        if args.steps is not None:
            if args.steps < 2:
                raise UsageError(f"--steps {args.steps}: at least 2 (the run is interrupted halfway)")
            spec = dataclasses.replace(spec, steps=args.steps)
        device = resolve_device(args.device or ("cpu" if args.tiny else "cuda"))
        out = args.workdir / "out"
        if out.exists():
            raise UsageError(f"{out} exists (an earlier check): remove it, or choose another WORKDIR")
    except UsageError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    args.workdir.mkdir(parents=True, exist_ok=True)
    budget = None if args.tiny or not device.startswith("cuda") else GPU_BUDGET_S
    report = run_check(args.workdir.absolute(), spec, device, args.precision, budget)
    (args.out or args.workdir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
