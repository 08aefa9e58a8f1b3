"""Does the image-level calibration hold its nominal healthy false-positive rate? Rules compared.

    python benchmarks/calibration_rule.py BIDS_DIR MODEL_DIR --extra-healthy DIR [--extra-lesion DIR]
        [--draws 2000] [--image-fpr 0.05] [--out calibration_rule.json]

The app's maps (:func:`bids_app.pipelines.segment.native_residual`, the app's settings) of every
healthy image the model never trained on (its held-out validation images and those of
``--extra-healthy``) give each image's lesion-free threshold: a healthy image gets a false positive
exactly when the calibrated threshold is below it. Each rule turns the lesion-free thresholds of a
calibration set into a threshold; the calibration is repeated on ``--draws`` random sets of as many
images as the model's validation split, drawn from all those healthy images, and the false
positives are counted on the others (mean rate; the share of draws whose rate exceeds twice the
nominal one). Lesion images (``--extra-lesion`` and BIDS_DIR's) give the median Dice at each draw's
threshold.

Rules (:data:`RULES`): ``normal``, the app's Student-t prediction bound on the values; ``lognormal``,
the same bound on their logarithms (right-skewed values: the largest healthy image's maximum is
further above the mean than below); ``max``, the calibration images' maximum. The values are also
listed per acquisition (participants.tsv ``acquisition``) to show how the acquisitions differ.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bids_app.bids.layout import collect_images, find_derivative_datasets, load_layout, read_participants  # noqa: E402
from bids_app.model_store import load_trained_models  # noqa: E402
from bids_app.pipelines.counterfactual import CounterfactualPipeline  # noqa: E402
from bids_app.pipelines.segment import ImageInput, native_residual  # noqa: E402
from bids_app.segmentation.calibration import calibrate, grow_threshold, image_bound  # noqa: E402
from bids_app.segmentation.lesions import lesion_free_threshold, lesion_mask  # noqa: E402
from bids_app.segmentation.metrics import dice  # noqa: E402
from bids_app.settings import ComputeSettings, SelectionSettings  # noqa: E402
from bids_app.settings.segmentation import SegmentationSettings  # noqa: E402


def lognormal_bound(values: Sequence[float], image_fpr: float) -> float:
    """The Student-t prediction bound of :func:`image_bound` on the logarithms (values floored at
    a hundredth of their median, so that an image without any residual does not give -inf)."""
    v = np.asarray(values, dtype=np.float64)
    floor = max(float(np.median(v)) / 100.0, 1e-12)
    logs = np.log(np.maximum(v, floor))
    n = logs.size
    spread = float(logs.std(ddof=1)) * math.sqrt(1.0 + 1.0 / n)
    return float(math.exp(logs.mean() + stats.t.ppf(1.0 - image_fpr, n - 1) * spread))


def positive_part(bound: Callable[[Sequence[float], float], float]) -> Callable[[Sequence[float], float], float]:
    """A rule on the images that have any residual at all (lesion-free threshold above 0).

    An image whose residual is nowhere positive can never get a lesion: it is a point mass at 0,
    not a small draw of the continuous part. A new image exceeds the threshold with probability
    (share of positive images) x P(positive value above it), so the positive part's bound is taken
    at ``fpr / share``.
    """
    def rule(values: Sequence[float], fpr: float) -> float:
        v = np.asarray(values, dtype=np.float64)
        positive = v[v > 0]
        if positive.size < 2:
            return float(v.max())
        return bound(positive, min(fpr * v.size / positive.size, 0.5))
    return rule


RULES: dict[str, Callable[[Sequence[float], float], float]] = {
    "normal": lambda v, fpr: image_bound(v, fpr),
    "lognormal": lognormal_bound,
    "normal, positive part": positive_part(lambda v, fpr: image_bound(v, fpr)),
    "lognormal, positive part": positive_part(lognormal_bound),
    "max": lambda v, fpr: float(np.max(v)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--extra-healthy", type=Path, nargs="*", default=[])
    parser.add_argument("--extra-lesion", type=Path, nargs="*", default=[])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--image-fpr", type=float, default=SegmentationSettings().calibration.image_fpr)
    parser.add_argument("--seed", type=int, default=ComputeSettings().seed)
    parser.add_argument("--out", type=Path, default=Path("calibration_rule.json"))
    args = parser.parse_args()
    started = time.time()
    models = load_trained_models(args.model_dir)
    seg = SegmentationSettings()
    pipeline = CounterfactualPipeline.from_models(models, "cpu", ComputeSettings())
    validation = {p.removeprefix("sub-") for p in models.card["validation_participants"]}
    trained = {p.removeprefix("sub-") for p in models.card["training_participants"]}
    selection = SelectionSettings()

    def records(dataset: Path):
        table = read_participants(dataset)
        found = collect_images(dataset, selection, load_layout(dataset), find_derivative_datasets(dataset))
        return [(r, table.get(r.subject, {}).get("acquisition", "n/a")) for r in found]

    own = records(args.bids_dir)
    healthy = [(r, a) for r, a in own if r.lesion_mask is None and r.subject in validation]
    healthy += [(r, a) for d in args.extra_healthy for r, a in records(d) if r.lesion_mask is None]
    lesioned = [(r, a) for r, a in own if r.lesion_mask is not None and r.subject not in trained]
    lesioned += [(r, a) for d in args.extra_lesion for r, a in records(d) if r.lesion_mask is not None]

    def maps(record):
        item = ImageInput(str(record.image), record.image, record.cord_mask, record.control_mask)
        return native_residual(pipeline, models.plan, item, seg, args.seed)

    free, growth_maps, regions = [], [], []
    for record, acquisition in healthy:
        result = maps(record)
        free.append(lesion_free_threshold(result.residual, result.detection_region, result.spacing_mm,
                                          seg.lesions.min_lesion_mm3))
        growth_maps.append(result.growth)
        regions.append(result.detection_region)
    lesion_results = []
    for record, _ in lesioned:
        result = maps(record)
        truth = np.asanyarray(nib.load(record.lesion_mask).dataobj) > 0
        lesion_results.append((result, truth))
    # Lesions grow to the healthy grow quantile of the unsmoothed maps, as in the app.
    grow = grow_threshold(calibrate(growth_maps, regions, seg.calibration.quantile), seg.lesions.grow_quantile)

    def median_dice(threshold: float) -> float:
        return float(np.median([dice(lesion_mask(r.residual, r.region, threshold, r.spacing_mm,
                                                 seg.lesions.min_lesion_mm3, grow, r.growth,
                                                 detection_region=r.detection_region).astype(bool), truth)
                                for r, truth in lesion_results])) if lesion_results else float("nan")

    values = np.asarray(free)
    size = len(validation)
    rng = np.random.default_rng(args.seed)
    draws = [np.sort(rng.choice(values.size, size, replace=False)) for _ in range(args.draws)]
    dice_cache: dict[float, float] = {}
    report = {"model": str(args.model_dir), "image_fpr": args.image_fpr, "calibration_images": size,
              "healthy_images": int(values.size), "draws": args.draws, "rules": {},
              "lesion_free": [{"image": Path(r.image).name, "acquisition": a, "value": float(v)}
                              for (r, a), v in zip(healthy, values)]}
    for name, rule in RULES.items():
        rates, thresholds = [], []
        for chosen in draws:
            threshold = rule(values[chosen], args.image_fpr)
            rest = np.setdiff1d(np.arange(values.size), chosen)
            rates.append(float(np.mean(values[rest] > threshold)))
            thresholds.append(threshold)
        sampled = [thresholds[i] for i in range(0, len(thresholds), max(1, len(thresholds) // 40))]
        dices = [dice_cache.setdefault(round(t, 6), median_dice(t)) for t in sampled]
        report["rules"][name] = {"fp_rate": float(np.mean(rates)),
                                 "share_over_twice_nominal": float(np.mean(np.asarray(rates) > 2 * args.image_fpr)),
                                 "median_threshold": float(np.median(thresholds)),
                                 "median_dice_mean": float(np.mean(dices))}
    by_acq: dict[str, list[float]] = {}
    for entry in report["lesion_free"]:
        by_acq.setdefault(entry["acquisition"], []).append(entry["value"])
    report["lesion_free_by_acquisition"] = {a: {"n": len(v), "median": float(np.median(v)), "max": float(np.max(v))}
                                            for a, v in sorted(by_acq.items())}
    skew = float(stats.skew(values))
    report["skewness"] = skew
    report["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"lesion-free thresholds of {values.size} healthy images: skewness {skew:.2f}; by acquisition "
          + ", ".join(f"{a} median {v['median']:.4f} max {v['max']:.4f} (n={v['n']})"
                      for a, v in report["lesion_free_by_acquisition"].items()))
    print(f"| rule | healthy FP rate (nominal {args.image_fpr:g}) | draws over twice nominal | median threshold | "
          "median Dice (mean over draws) |\n|---|---|---|---|---|")
    for name, r in report["rules"].items():
        print(f"| {name} | {r['fp_rate']:.3f} | {r['share_over_twice_nominal']:.2f} | {r['median_threshold']:.4f} | "
              f"{r['median_dice_mean']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
