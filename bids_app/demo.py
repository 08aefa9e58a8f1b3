"""``run.py --demo OUTDIR``: the whole job on a generated phantom dataset, within 15 minutes on 2 CPU cores.

The tiny preset's own step counts are sized for tests; the demo trains it for longer (the budget
below, measured to fit the 15 minutes with the participant level) so that its segmentations mean
something. A ``--config`` file given with ``--demo`` is merged over this budget (tests shrink it).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from bids_app.errors import ExitCode
from bids_app.settings import load_config_file, merge_overrides

log = logging.getLogger(__name__)

#: Healthy participants train (and, held out, calibrate) the models; lesion ones are segmented.
#: The generator's default mix gives the 3 lesion participants a ``central`` sag-iso, an ``ms``
#: ax-thick and an ``sci`` sag-thick phantom, and the healthy ones every acquisition.
#: 14 healthy: 6 train, 8 are held out for calibration (DEMO_SETTINGS' validation_fraction), enough
#: for the image-level rule to predict a 10 % healthy false-positive rate (a training image costs
#: training time per step only through its cache; a held-out one costs ~3 s of calibration).
DEMO_DATASET = {"n_healthy": 14, "n_lesion": 3}

#: Training budget of the demo (tiny preset), sized to fit the demo's 15 minutes on 2 cores with the
#: participant level (README, "Quick start", has the measured time).
DEMO_SETTINGS: dict[str, Any] = {
    "preprocessing": {"validation_fraction": 0.57},  # 8 of the 14 healthy participants
    "training": {
        "vqgan": {"max_steps": 400, "disc_start": 250, "checkpoint_every": 100, "log_every": 50, "figure_every": 200},
        "diffusion": {"max_steps": 1000, "batch_size": 4, "ema_decay": 0.99, "checkpoint_every": 250,
                      "log_every": 100, "figure_every": 600},
        "adapter": {"max_steps": 200, "checkpoint_every": 100, "log_every": 50, "figure_every": 0},
    },
}

CONFIG_NAME = "demo_config.json"


def demo_config(user_config: Path | None) -> dict[str, Any]:
    """The demo budget with the user's config file (if any) merged over it."""
    return merge_overrides(DEMO_SETTINGS, load_config_file(user_config) if user_config is not None else {})


def run_demo(outdir: Path, args: argparse.Namespace, run_level: Callable[[Sequence[str]], int]) -> int:
    """Generate (or reuse) the phantom dataset, then run the group and participant levels."""
    from bids_app.io import atomic_write_json
    from bids_app.synthetic import generate_dataset

    outdir = Path(outdir).absolute()
    bids_dir, out = outdir / "bids", outdir / "out"
    if (bids_dir / "dataset_description.json").is_file():
        log.info("demo: reusing the synthetic dataset in %s", bids_dir)
    else:
        log.info("demo: generating the synthetic dataset in %s", bids_dir)
        generate_dataset(bids_dir, seed=getattr(args, "seed", 0), **DEMO_DATASET)
    config = atomic_write_json(outdir / CONFIG_NAME, demo_config(getattr(args, "config", None)))
    common = ["--preset", "tiny", "--config", str(config)]
    for name in ("device", "seed", "nprocs", "omp_nthreads"):
        if name in args:
            common += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    common += ["-v"] * getattr(args, "verbosity", 0) + (["-q"] if getattr(args, "quiet", False) else [])
    for level in ("group", "participant"):
        code = run_level([str(bids_dir), str(out), level, *common])
        if code != ExitCode.OK:
            return code
    log.info("demo finished: outputs in %s", out)
    summary = out / "evaluation_summary.tsv"
    if summary.is_file():
        log.info("evaluation summary (lesion participants against the phantom's ground truth): %s", summary)
    for report in sorted(out.glob("*.html")):
        log.info("report: %s", report)
    return ExitCode.OK

