"""End to end: group-level wall time of the demo and seconds per image at the participant level.

    python benchmarks/end_to_end.py WORKDIR [--participant-only] [--out end_to_end.json] [RUN.PY OPTIONS ...]

Generates the demo's phantom dataset in WORKDIR/bids (``bids_app.demo.DEMO_DATASET``), then runs
``run.py WORKDIR/bids WORKDIR/out group`` with the demo's budget (tiny preset,
``bids_app.demo.DEMO_SETTINGS``) and ``run.py ... participant --overwrite``, each in its own process
and timed from the outside (so interpreter start, data loading, calibration, reports and validation
all count). Per image, the participant level records the seconds of its counterfactual synthesis
(``*_evaluation.json``, field ``seconds``); the table gives their median and range next to the
participant level's wall time divided by the number of images (which adds I/O, the writers, the
reports and the BIDS validator). ``--participant-only`` reuses WORKDIR/out/models (no training);
options the script does not know go to both run.py calls.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_run(arguments: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), *arguments], check=True)
    return time.perf_counter() - started


def main() -> int:
    from bids_app.io import atomic_write_json
    from bids_app.demo import DEMO_DATASET, demo_config
    from bids_app.synthetic import generate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--participant-only", action="store_true", help="reuse WORKDIR/out/models")
    parser.add_argument("--out", type=Path, default=Path("end_to_end.json"))
    args, extra = parser.parse_known_args()  # anything else goes to run.py (e.g. --omp-nthreads 1)
    bids, out = args.workdir / "bids", args.workdir / "out"
    if not (bids / "dataset_description.json").is_file():
        generate_dataset(bids, seed=0, **DEMO_DATASET)
    config = atomic_write_json(args.workdir / "demo_config.json", demo_config(None))
    common = ["--preset", "tiny", "--config", str(config), *extra]
    report: dict = {"machine": platform.platform(), "python": sys.version.split()[0], "dataset": DEMO_DATASET,
                    "extra_arguments": extra}
    if not args.participant_only:
        report["group_seconds"] = timed_run([str(bids), str(out), "group", *common])
    report["participant_seconds"] = timed_run([str(bids), str(out), "participant", "--overwrite", *common])
    per_image = {}
    for path in sorted(out.glob("sub-*/**/*_evaluation.json")):
        per_image[path.name.removesuffix("_evaluation.json")] = json.loads(path.read_text())["seconds"]
    if not per_image:
        raise SystemExit(f"no evaluation records under {out}")
    seconds = list(per_image.values())
    report.update({"images": len(seconds), "per_image_seconds": per_image,
                   "median_counterfactual_seconds_per_image": statistics.median(seconds),
                   "participant_wall_seconds_per_image": report["participant_seconds"] / len(seconds)})
    import torch

    report["torch"], report["threads"] = torch.__version__, torch.get_num_threads()
    args.out.write_text(json.dumps(report, indent=2))
    print("| measure | value |\n|---|---|")
    if "group_seconds" in report:
        print(f"| group level (demo budget), wall | {report['group_seconds'] / 60:.1f} min |")
    print(f"| participant level, wall ({len(seconds)} images) | {report['participant_seconds']:.0f} s |")
    print(f"| participant level, wall per image | {report['participant_wall_seconds_per_image']:.1f} s |")
    print(f"| counterfactual + residual per image, median (range) | "
          f"{statistics.median(seconds):.1f} s ({min(seconds):.1f}-{max(seconds):.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
