"""Lesion segmentation quality of a trained model against two baselines that need no diffusion.

    python benchmarks/segmentation_quality.py BIDS_DIR MODEL_DIR [--extra-healthy DIR ...] [--extra-lesion DIR ...]
        [--strength S ...] [--resample DRAWS] [--out results.json]

Every method's map is made the app's way on each image's own grid (median-filtered for detection,
unsmoothed for growth, inside the cord, lesions found below its surface layer) and compared with
the ground-truth mask file, on every lesion image of BIDS_DIR:

- the app: :func:`bids_app.pipelines.segment.native_residual` with the app's segmentation settings
  (``--strength``, ``--n-samples``, ``--detection-inset`` override them), with and (when the model
  has an adapter) without the T2I-Adapter;
- reconstruction: the residual against the VQ-GAN's reconstruction D(E(x)) alone (strength 0);
- zscore: in-cord intensity z-score of the image itself.

Every result is also broken down by the participants' ``lesion_type`` and ``acquisition`` columns of
their dataset's participants.tsv (the phantom generator writes them): median Dice and lesion-wise
recall (true lesions that the mask touches, pooled) per lesion type and per acquisition, and the
healthy images with a false positive per acquisition.

Each method's threshold is calibrated the app's way, without lesion labels, on the healthy
validation images recorded in MODEL_DIR (``segmentation.calibration``: the healthy quantile,
raised to the bound at which a new healthy image has a lesion with probability ``--image-fpr``).
Reported: median Dice over lesion images at that threshold, the oracle best Dice, AUPRC, and how
many healthy images the model never saw (neither trained nor calibrated on: the rest of BIDS_DIR's
healthy participants and those of ``--extra-healthy``) get any false-positive lesion. Lesions grow
to the healthy ``--grow-quantile`` of each method's unsmoothed map (0: no growth).
``--resample DRAWS`` repeats the calibration on random sets of as many healthy images, drawn from
all those the model never trained on, and reports the false-positive rate on the rest and the
median Dice averaged over the draws (:func:`resampled_calibration`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bids_app.bids.layout import collect_images, find_derivative_datasets, load_layout, read_participants  # noqa: E402
from bids_app.model_store import load_trained_models  # noqa: E402
from bids_app.pipelines.counterfactual import CounterfactualPipeline  # noqa: E402
from bids_app.pipelines.segment import ImageInput, native_footprint, native_residual  # noqa: E402
from bids_app.segmentation.calibration import calibrate, grow_threshold  # noqa: E402
from bids_app.segmentation.lesions import lesion_free_threshold, lesion_mask  # noqa: E402
from bids_app.segmentation.metrics import auprc, best_dice_over_thresholds, dice, lesion_wise  # noqa: E402
from bids_app.segmentation.residuals import (GROW_MEDIAN_SIZE, analysis_region,  # noqa: E402
                                             restrict, signed_residual, smooth)
from bids_app.settings import ComputeSettings, SelectionSettings  # noqa: E402
from bids_app.settings.segmentation import SegmentationSettings  # noqa: E402


def resampled_calibration(lesion_free: Sequence[float], thresholds_for: Callable[[list[int]], tuple[float, float | None]],
                          dice_at: Callable[[float, float | None], Sequence[float]], size: int, draws: int,
                          seed: int = 0, target: float = 0.7) -> dict[str, float]:
    """How a calibration of ``size`` healthy images does on average over which images they are.

    One fixed calibration set is one draw: its threshold can land either side of a faint lesion's
    peak. Each draw calibrates on ``size`` of the healthy images the model never trained on
    (``thresholds_for(indices) -> (threshold, grow threshold)``) and counts a false positive for
    each of the others whose ``lesion_free`` threshold lies above it (the mask only shrinks as the
    threshold rises, so that is exactly "it gets a lesion"), and the median of ``dice_at`` over the
    lesion images. Returned: the mean false-positive rate, the mean of the median Dice, and the
    share of draws whose median Dice reaches ``target``.
    """
    values = np.asarray(lesion_free, dtype=np.float64)
    if not 0 < size < values.size:
        raise ValueError(f"calibration size must be in [1, {values.size - 1}], got {size}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    rng = np.random.default_rng(seed)
    rates, medians = [], []
    for _ in range(draws):
        chosen = np.sort(rng.choice(values.size, size, replace=False))
        threshold, grow = thresholds_for([int(i) for i in chosen])
        rest = np.setdiff1d(np.arange(values.size), chosen)
        rates.append(float(np.mean(values[rest] > threshold)))
        medians.append(float(np.median(dice_at(threshold, grow))))
    medians_array = np.asarray(medians)
    return {"draws": draws, "calibration_images": size, "healthy_fp_rate": float(np.mean(rates)),
            "median_dice_mean": float(medians_array.mean()),
            f"share_median_dice_at_least_{target:g}": float(np.mean(medians_array >= target))}


#: participants.tsv columns the results are broken down by.
GROUPS = ("lesion_type", "acquisition")


def breakdown(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Per value of each column in ``GROUPS``: median Dice and pooled lesion recall of the lesion
    images, and how many healthy images got a false positive.

    ``rows`` hold ``groups`` ({column: value}) and either ``dice``, ``detected``, ``n_lesions`` (a lesion
    image) or ``false_positive`` (a healthy image).
    """
    out: dict[str, dict[str, dict]] = {}
    for column in GROUPS:
        values = sorted({r["groups"].get(column, "n/a") for r in rows})
        for value in values:
            members = [r for r in rows if r["groups"].get(column, "n/a") == value]
            lesion = [r for r in members if "dice" in r]
            healthy = [r for r in members if "false_positive" in r]
            entry: dict = {}
            if lesion:
                n_lesions = sum(r["n_lesions"] for r in lesion)
                entry.update(n_images=len(lesion), median_dice=float(np.median([r["dice"] for r in lesion])),
                             lesion_recall=sum(r["detected"] for r in lesion) / n_lesions if n_lesions else None)
            if healthy:
                entry["healthy_with_false_positive"] = f"{sum(r['false_positive'] for r in healthy)} / {len(healthy)}"
            if entry:
                out.setdefault(column, {})[value] = entry
    return out


def add_no_inset(prepared: dict, detect_in: dict[str, int]) -> None:
    """Add "<app>, no inset": the app's maps with lesions searched in the whole cord (entry index 1)."""
    name = next(m for m in next(iter(prepared.values()))[2] if m.startswith("counterfactual") and "no adapter" not in m)
    plain = f"{name}, no inset"
    for entry in prepared.values():
        for kind in (2, 5):
            entry[kind][plain] = entry[kind][name]
    detect_in[plain] = 1


def without_adapter(seg: SegmentationSettings) -> SegmentationSettings:
    return replace(seg, counterfactual=replace(seg.counterfactual, adapter_scale=0.0))


def image_maps(pipeline, plan, record, seg, seed):
    """(record, region, {method: map}, truth, spacing, {method: growth map}, detection region) on the
    image's own grid: the app's maps from its own path, the baselines' filtered the app's way."""
    item = ImageInput(str(record.image), record.image, record.cord_mask, record.control_mask)
    app = native_residual(pipeline, plan, item, seg, seed)
    name = "counterfactual + adapter (the app)" if app.adapter_used else "counterfactual (the app)"
    scores, growth = {name: app.residual}, {name: app.growth}
    if app.adapter_used:
        plain = native_residual(pipeline, plan, item, without_adapter(seg), seed)
        scores["counterfactual, no adapter"], growth["counterfactual, no adapter"] = plain.residual, plain.growth
    pre, region = app.preprocessed, app.region
    reconstruction = pipeline(pre.image, replace(seg.counterfactual, strengths=(0.0,)), seed)[0].decoded
    model_region, _ = analysis_region(pre.valid, pre.masks.get("cord"), image=pre.image)
    raw = {"reconstruction": signed_residual(pre.native, pre.trace.inverse(reconstruction, "probability"),
                                             app.polarity),
           "zscore": (pre.native - pre.image[model_region].mean()) / (pre.image[model_region].std() + 1e-6)}
    for method, values in raw.items():
        scores[method] = restrict(smooth(values, native_footprint(pre.trace, plan), valid=region), region)
        growth[method] = restrict(smooth(values, GROW_MEDIAN_SIZE, valid=region), region)
    truth = np.asanyarray(nib.load(record.lesion_mask).dataobj) > 0 if record.lesion_mask is not None else None
    return record, region, scores, truth, app.spacing_mm, growth, app.detection_region


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("segmentation_quality.json"))
    defaults = SegmentationSettings()
    parser.add_argument("--strength", type=float, nargs="+", default=list(defaults.counterfactual.strengths))
    parser.add_argument("--n-samples", type=int, default=defaults.counterfactual.n_samples)
    parser.add_argument("--seed", type=int, default=ComputeSettings().seed)
    parser.add_argument("--detection-inset", type=float, default=defaults.residual.detection_inset_mm,
                        help="lesions are found only deeper than this (mm) in the region (default: the app's)")
    parser.add_argument("--extra-healthy", type=Path, nargs="*", default=[],
                        help="more BIDS datasets whose healthy images measure the false-positive rate")
    parser.add_argument("--extra-lesion", type=Path, nargs="*", default=[],
                        help="more BIDS datasets whose lesion images count in the Dice (unseen phantoms)")
    parser.add_argument("--grow-quantile", type=float, default=defaults.lesions.grow_quantile,
                        help="hysteresis: lesions grow to this healthy quantile (default: the app's); 0 = off")
    parser.add_argument("--image-fpr", type=float, default=defaults.calibration.image_fpr,
                        help="healthy image false-positive rate (default: the app's); 0 = maximum")
    parser.add_argument("--no-inset-variant", action="store_true",
                        help="also the app's maps with lesions searched in the whole cord (no detection inset)")
    parser.add_argument("--resample", type=int, default=0, metavar="DRAWS",
                        help="also calibrate on DRAWS random sets (as many images as the validation split) of "
                             "every healthy image not trained on, counting false positives on the others")
    args = parser.parse_args()
    started = time.time()
    models = load_trained_models(args.model_dir)
    validation = {p.removeprefix("sub-") for p in models.card["validation_participants"]}
    table = read_participants(args.bids_dir)
    groups: dict[str, dict[str, str]] = {}  # image -> its participant's lesion type and acquisition

    def remember(dataset: Path, records):
        rows = read_participants(dataset)
        for record in records:
            row = rows.get(record.subject, {})
            groups[str(record.image)] = {c: row[c] for c in GROUPS if c in row}
        return records

    selection = SelectionSettings()
    roots = find_derivative_datasets(args.bids_dir)
    records = remember(args.bids_dir, collect_images(args.bids_dir, selection, load_layout(args.bids_dir), roots))
    healthy = [r for r in records if r.subject in validation]
    lesioned = [r for r in records if r.lesion_mask is not None]
    seen = validation | {p.removeprefix("sub-") for p in models.card["training_participants"]}
    # Healthy images neither trained nor calibrated on: the false-positive rate is measured on them.
    unseen = [r for r in records if r.lesion_mask is None and r.subject not in seen]
    for extra in args.extra_healthy:
        unseen += [r for r in remember(extra, collect_images(extra, selection, load_layout(extra),
                                                             find_derivative_datasets(extra)))
                   if r.lesion_mask is None]
    for extra in args.extra_lesion:
        lesioned += [r for r in remember(extra, collect_images(extra, selection, load_layout(extra),
                                                               find_derivative_datasets(extra)))
                     if r.lesion_mask is not None]
    seg = replace(defaults, counterfactual=replace(defaults.counterfactual, strengths=tuple(args.strength),
                                                   n_samples=args.n_samples),
                  residual=replace(defaults.residual, detection_inset_mm=args.detection_inset))
    pipeline = CounterfactualPipeline.from_models(models, "cpu", ComputeSettings())
    prepared = {str(record.image): image_maps(pipeline, models.plan, record, seg, args.seed)
                for record in healthy + lesioned + unseen}
    results = {}
    detect_in: dict[str, int] = {}  # method -> index of its detection region in an entry (6: the inset one)
    if args.no_inset_variant:
        add_no_inset(prepared, detect_in)
    methods = list(next(iter(prepared.values()))[2].keys())

    def mask_of(entry, method, threshold, grow):
        record, region, scores, truth, voxel_mm, growth, detect = entry
        return lesion_mask(np.where(region, scores[method], -np.inf), region, threshold, voxel_mm, seg.lesions.min_lesion_mm3,
                           grow_threshold=grow, grow_residual=growth[method],
                           detection_region=entry[detect_in.get(method, 6)])

    for method in methods:
        free: dict[str, float] = {}  # an image's lesion-free threshold does not depend on the others

        def lesion_free(record):
            if str(record.image) not in free:
                entry = prepared[str(record.image)]
                free[str(record.image)] = lesion_free_threshold(entry[2][method], entry[detect_in.get(method, 6)], entry[4],
                                                                     seg.lesions.min_lesion_mm3)
            return free[str(record.image)]

        def calibration_on(records):
            maps = [prepared[str(r.image)][2][method] for r in records]
            regions = [prepared[str(r.image)][detect_in.get(method, 6)] for r in records]  # where a lesion could be found
            growth_maps = [prepared[str(r.image)][5][method] for r in records]
            calibration = calibrate(maps, regions, seg.calibration.quantile,
                                    lesion_free=[lesion_free(r) for r in records],
                                    image_fpr=args.image_fpr or None, grow_residuals=growth_maps)
            return calibration.threshold, grow_threshold(calibration, args.grow_quantile or None)

        def dice_at(threshold, grow):
            return [dice(mask_of(entry, method, threshold, grow).astype(bool), entry[3])
                    for entry in prepared.values() if entry[3] is not None]

        threshold, grow = calibration_on(healthy)
        dices, oracles, aps, fp, rows = [], [], [], [], []
        for entry in prepared.values():
            record, region, scores, truth = entry[:4]
            mask = mask_of(entry, method, threshold, grow)
            if truth is not None:
                dices.append(dice(mask.astype(bool), truth))
                oracles.append(best_dice_over_thresholds(scores[method], truth, region)["oracle_best_dice"])
                aps.append(auprc(scores[method], truth, region))
                found = lesion_wise(mask, truth)
                rows.append({"groups": groups[str(record.image)], "dice": dices[-1],
                             "detected": round(found["lesion_recall"] * found["n_true_lesions"]),
                             "n_lesions": found["n_true_lesions"]})
            elif record in unseen:
                fp.append(bool(mask.any()))
                rows.append({"groups": groups[str(record.image)], "false_positive": fp[-1]})
        resampled = None
        if args.resample:
            pool = healthy + unseen  # every healthy image the model never trained on
            resampled = resampled_calibration([lesion_free(r) for r in pool],
                                              lambda chosen: calibration_on([pool[i] for i in chosen]),
                                              dice_at, len(healthy), args.resample, args.seed)
        results[method] = {"threshold": threshold, "grow_threshold": grow, "median_dice": float(np.median(dices)),
                           "dice": [round(d, 4) for d in dices], "median_oracle_dice": float(np.nanmedian(oracles)),
                           "median_auprc": float(np.nanmedian(aps)),
                           "healthy_with_false_positive": f"{sum(fp)} / {len(fp)}" if fp else None,
                           "by": breakdown(rows),
                           **({"resampled": resampled} if resampled else {})}
    report = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model_card": models.card.get("preset"), "strengths": args.strength, "n_samples": args.n_samples,
              "image_fpr": args.image_fpr, "resample_draws": args.resample,
              "detection_inset_mm": args.detection_inset, "grow_quantile": args.grow_quantile,
              "n_lesion_images": len(lesioned), "n_healthy_validation_images": len(healthy),
              "n_unseen_healthy_images": len(unseen),
              "lesion_images": [Path(r.image).name for r in lesioned],
              "seconds": round(time.time() - started, 1), "methods": results, "participants": len(table)}
    args.out.write_text(json.dumps(report, indent=2))
    print("| method | median Dice | oracle Dice | AUPRC | healthy with FP |\n|---|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['median_dice']:.3f} | {r['median_oracle_dice']:.3f} | {r['median_auprc']:.3f} | "
              f"{r['healthy_with_false_positive']} |")
    print("\n| method | group | images | median Dice | lesion recall | healthy with FP |\n|---|---|---|---|---|---|")
    for method, r in results.items():
        for column, values in r["by"].items():
            for value, e in values.items():
                dice_cell = f"{e['median_dice']:.3f}" if "median_dice" in e else "-"
                recall_cell = f"{e['lesion_recall']:.2f}" if e.get("lesion_recall") is not None else "-"
                print(f"| {method} | {column} {value} | {e.get('n_images', 0)} | {dice_cell} | {recall_cell} | "
                      f"{e.get('healthy_with_false_positive', '-')} |")
    if args.resample:
        print(f"\nresampled over {args.resample} calibration sets of {len(healthy)}:\n"
              "| method | healthy FP rate | median Dice (mean) | share with median Dice >= 0.7 |\n|---|---|---|---|")
        for method, r in results.items():
            s = r["resampled"]
            print(f"| {method} | {s['healthy_fp_rate']:.3f} | {s['median_dice_mean']:.3f} | "
                  f"{s['share_median_dice_at_least_0.7']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
