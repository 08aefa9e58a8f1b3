"""Lesion segmentation quality of a trained model against two baselines that need no diffusion.

    python benchmarks/segmentation_quality.py BIDS_DIR MODEL_DIR [--extra-healthy DIR ...] [--extra-lesion DIR ...]
        [--strength S ...] [--steps N] [--noising patch region] [--polarity bright] [--resample DRAWS] [--out results.json]

Counterfactuals are made in model space (the preprocessed grid covering the whole cord, slid over
in model-sized windows); as the app does since session 7, the residual is then taken on each
image's own grid (the decodings resampled, the input at its own resolution), median-filtered
there, calibrated, thresholded inside the region less its surface layer (``--detection-inset``)
and compared with the ground-truth mask file. It
compares on every lesion image of BIDS_DIR:

- counterfactual (patch): the app's residual (``--reference both``: the agreement of x - x_hat, the
  edit transferred onto the input, and x - D(z), the raw decoding; only the cord regenerated, one
  latent patch at a time with the rest clean, polarity as given) at the
  app's strength(s), with and (when the model has one) without the T2I-Adapter steering it with
  the cord mask;
- counterfactual (region): the same with the whole cord noised at once (the method before patched
  noising), at its own best strengths (``--region-strength``, default 0.5 0.65 0.8);
- reconstruction: |x - D(E(x))|, the VQ-GAN alone (strength 0, raw decoding);
- zscore: in-region intensity z-score of the image itself (on its own grid).

Each method's threshold is calibrated the app's way, without lesion labels, on the healthy
validation images recorded in MODEL_DIR: the 0.999 quantile of its in-region scores, raised (rule
``images``, the default) to the bound at which a new healthy image has a lesion with probability
``--image-fpr`` (``segmentation.calibration.image_bound``).
Reported: median Dice over lesion images at that threshold, the oracle best Dice, AUPRC, and how
many healthy images the model never saw (neither trained nor calibrated on: the rest of BIDS_DIR's
healthy participants and those of ``--extra-healthy``) get any false-positive lesion (after
removing components below 5 mm3). Every method's lesions then grow to its own healthy
``--grow-quantile`` (the app's hysteresis, default the app's; 0 turns it off) of its map filtered
with ``--grow-median`` (the app's: unsmoothed), which leaves that false-positive count unchanged.
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
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bids_app.bids.layout import collect_images, find_derivative_datasets, load_layout, read_participants  # noqa: E402
from bids_app.model_store import load_trained_models  # noqa: E402
from bids_app.pipelines.counterfactual import CounterfactualSettings, windowed_counterfactuals  # noqa: E402
from bids_app.pipelines.segment import native_grid_residual  # noqa: E402
from bids_app.preprocessing.pipeline import preprocess  # noqa: E402
from bids_app.segmentation.calibration import calibrate, grow_threshold  # noqa: E402
from bids_app.segmentation.lesions import lesion_free_threshold, lesion_mask  # noqa: E402
from bids_app.segmentation.metrics import auprc, best_dice_over_thresholds, dice  # noqa: E402
from bids_app.segmentation.residuals import analysis_region, detection_region, restrict, smooth  # noqa: E402
from bids_app.settings import SegmentationSettings, SelectionSettings  # noqa: E402


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


def scores_for(models, pre, region, args):
    """Each method's smoothed score map over the whole covered volume (sliding windows)."""
    shape = models.plan.target_shape

    def residual(strengths, reference, features=None, noising="patch"):
        cf = CounterfactualSettings(strengths=tuple(strengths), steps=args.steps, seed=args.seed,
                                    n_samples=args.n_samples, reference=reference, noising=noising)
        editable = region if args.edit_region == "cord" and reference != "image" else None
        cfs = windowed_counterfactuals(models.vqgan, models.unet, models.scheduler_config, models.latent_scale,
                                       pre.image, cf, shape, "cpu", features, editable)
        return native_grid_residual(pre, cfs, reference, args.polarity)[0]

    features = None
    if models.adapter is not None and "cord" in pre.masks:
        cord = pre.masks["cord"].astype(np.float32)
        features = lambda w: models.adapter(torch.from_numpy(np.ascontiguousarray(cord[w]))[None, None])  # noqa: E731
    scores = {}
    for noising in args.noising:
        strengths = args.strength if noising == "patch" else args.region_strength
        scores[f"counterfactual ({noising})"] = residual(strengths, args.reference, noising=noising)
        if features is not None:
            scores[f"counterfactual ({noising}) + adapter"] = residual(strengths, args.reference, features, noising)
    scores["reconstruction"] = residual((0.0,), "image", noising="region")
    return scores


def on_native_grid(record, pre, region, raw, args):
    """Region, detection region, score and growth maps and ground truth on the image's own grid, as
    the app makes them: residuals taken there (``native_grid_residual``), median-filtered there for
    detection (``--median``) and growth (``--grow-median``), the truth read from its file."""
    trace = pre.trace
    native_region = trace.inverse(region.astype(np.float32), "mask").astype(bool)
    spacing = tuple(float(z) for z in trace.source.zooms[:3])

    def filtered(size):
        return {m: restrict(smooth(r, size, valid=native_region), native_region) for m, r in raw.items()}
    truth = None
    if record.lesion_mask is not None:
        truth = np.asanyarray(nib.load(record.lesion_mask).dataobj) > 0
    detect = detection_region(native_region, spacing, args.detection_inset)
    return record, native_region, filtered(args.median), truth, spacing, filtered(args.grow_median), detect


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("segmentation_quality.json"))
    parser.add_argument("--strength", type=float, nargs="+", default=list(SegmentationSettings().strengths))
    parser.add_argument("--region-strength", type=float, nargs="+", default=[0.5, 0.65, 0.8])
    parser.add_argument("--noising", nargs="+", default=["patch", "region"], choices=["patch", "region"])
    parser.add_argument("--steps", type=int, default=SegmentationSettings().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.0, help="cord dilation in mm")
    parser.add_argument("--detection-inset", type=float, default=SegmentationSettings().detection_inset_mm,
                        help="lesions are found only deeper than this (mm) in the region (default: the app's)")
    parser.add_argument("--n-samples", type=int, default=1)
    parser.add_argument("--extra-healthy", type=Path, nargs="*", default=[],
                        help="more BIDS datasets whose healthy images measure the false-positive rate")
    parser.add_argument("--extra-lesion", type=Path, nargs="*", default=[],
                        help="more BIDS datasets whose lesion images count in the Dice (unseen phantoms)")
    parser.add_argument("--median", type=int, default=SegmentationSettings().median_size,
                        help="median filter size (voxels) of the thresholded map")
    parser.add_argument("--grow-median", type=int, default=SegmentationSettings().grow_median_size,
                        help="median filter size of the map lesions grow over (default: the app's)")
    parser.add_argument("--grow-quantile", type=float, default=SegmentationSettings().grow_quantile,
                        help="hysteresis: lesions grow to this healthy quantile (default: the app's); 0 = off")
    parser.add_argument("--rule", default=SegmentationSettings().calibration_rule, choices=["images", "voxels"],
                        help="calibration rule (default: the app's)")
    parser.add_argument("--image-fpr", type=float, default=SegmentationSettings().calibration_image_fpr,
                        help="rule images: healthy image false-positive rate (default: the app's); 0 = maximum")
    parser.add_argument("--polarity", default="bright", choices=["bright", "dark", "both"])
    parser.add_argument("--edit-region", default="cord", choices=["cord", "all"])
    parser.add_argument("--resample", type=int, default=0, metavar="DRAWS",
                        help="also calibrate on DRAWS random sets (as many images as the validation split) of "
                             "every healthy image not trained on, counting false positives on the others")
    parser.add_argument("--reference", default="both", choices=["both", "reconstruction", "image"])
    args = parser.parse_args()
    started = time.time()
    models = load_trained_models(args.model_dir)
    validation = {p.removeprefix("sub-") for p in models.card["validation_participants"]}
    table = read_participants(args.bids_dir)
    selection = SelectionSettings()
    roots = find_derivative_datasets(args.bids_dir)
    records = collect_images(args.bids_dir, selection, load_layout(args.bids_dir), roots)
    healthy = [r for r in records if r.subject in validation]
    lesioned = [r for r in records if r.lesion_mask is not None]
    seen = validation | {p.removeprefix("sub-") for p in models.card["training_participants"]}
    # Healthy images neither trained nor calibrated on: the false-positive rate is measured on them.
    unseen = [r for r in records if r.lesion_mask is None and r.subject not in seen]
    for extra in args.extra_healthy:
        unseen += [r for r in collect_images(extra, selection, load_layout(extra), find_derivative_datasets(extra))
                   if r.lesion_mask is None]
    for extra in args.extra_lesion:
        lesioned += [r for r in collect_images(extra, selection, load_layout(extra), find_derivative_datasets(extra))
                     if r.lesion_mask is not None]
    spacing = models.plan.target_spacing
    prepared = {}
    for record in healthy + lesioned + unseen:
        masks = {"cord": record.cord_mask} if record.cord_mask else {}
        if record.lesion_mask:
            masks["lesion"] = record.lesion_mask
        pre = preprocess(record.image, models.plan, masks, cover=True)
        region, _ = analysis_region(pre.valid, pre.masks.get("cord"), spacing, args.margin, image=pre.image)
        raw = scores_for(models, pre, region, args)
        mean, std = pre.image[region].mean(), pre.image[region].std() + 1e-6
        raw["zscore"] = (pre.native - mean) / std  # the image itself, in its own grid
        prepared[str(record.image)] = on_native_grid(record, pre, region, raw, args)
    results = {}
    methods = next(iter(prepared.values()))[2].keys()
    separate = args.grow_median != args.median

    def mask_of(entry, method, threshold, grow):
        record, region, scores, truth, voxel_mm, growth, detect = entry
        return lesion_mask(np.where(region, scores[method], -np.inf), region, threshold, voxel_mm, 5.0,
                           grow_threshold=grow, grow_residual=growth[method] if separate else None,
                           detection_region=detect)

    for method in methods:
        free: dict[str, float] = {}  # an image's lesion-free threshold does not depend on the others

        def lesion_free(record):
            if str(record.image) not in free:
                entry = prepared[str(record.image)]
                free[str(record.image)] = lesion_free_threshold(entry[2][method], entry[6], entry[4], 5.0)
            return free[str(record.image)]

        def calibration_on(records):
            maps = [prepared[str(r.image)][2][method] for r in records]
            regions = [prepared[str(r.image)][6] for r in records]  # where a lesion could be found
            growth_maps = [prepared[str(r.image)][5][method] for r in records] if separate else None
            calibration = calibrate(maps, regions, 0.999,
                                    lesion_free=[lesion_free(r) for r in records] if args.rule == "images" else None,
                                    image_fpr=args.image_fpr or None, grow_residuals=growth_maps)
            return calibration.threshold, grow_threshold(calibration, args.grow_quantile or None)

        def dice_at(threshold, grow):
            return [dice(mask_of(entry, method, threshold, grow).astype(bool), entry[3])
                    for entry in prepared.values() if entry[3] is not None]

        threshold, grow = calibration_on(healthy)
        dices, oracles, aps, fp = [], [], [], []
        for entry in prepared.values():
            record, region, scores, truth = entry[:4]
            mask = mask_of(entry, method, threshold, grow)
            if truth is not None:
                dices.append(dice(mask.astype(bool), truth))
                oracles.append(best_dice_over_thresholds(scores[method], truth, region)["oracle_best_dice"])
                aps.append(auprc(scores[method], truth, region))
            elif record in unseen:
                fp.append(bool(mask.any()))
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
                           **({"resampled": resampled} if resampled else {})}
    report = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model_card": models.card.get("preset"), "strengths": args.strength, "steps": args.steps,
              "region_strengths": args.region_strength, "noising": args.noising,
              "n_samples": args.n_samples, "polarity": args.polarity, "reference": args.reference,
              "rule": args.rule, "image_fpr": args.image_fpr, "resample_draws": args.resample,
              "median_size": args.median, "grow_median_size": args.grow_median, "edit_region": args.edit_region,
              "cord_margin_mm": args.margin, "detection_inset_mm": args.detection_inset, "residual_grid": "native",
              "n_lesion_images": len(lesioned), "n_healthy_validation_images": len(healthy),
              "n_unseen_healthy_images": len(unseen),
              "lesion_images": [Path(r.image).name for r in lesioned],
              "seconds": round(time.time() - started, 1), "methods": results, "participants": len(table)}
    args.out.write_text(json.dumps(report, indent=2))
    print("| method | median Dice | oracle Dice | AUPRC | healthy with FP |\n|---|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['median_dice']:.3f} | {r['median_oracle_dice']:.3f} | {r['median_auprc']:.3f} | "
              f"{r['healthy_with_false_positive']} |")
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
