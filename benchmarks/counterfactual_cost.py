"""Cost of the counterfactual per image, and the lesion Dice it reaches, batched and unbatched.

    python benchmarks/counterfactual_cost.py BIDS_DIR MODEL_DIR [--methods ...] [--out counterfactual_cost.json]
    python benchmarks/counterfactual_cost.py --random-weights --preset default --shape 16 64 64

With a trained model (first form) every method runs the participant level's own procedure
(:func:`bids_app.pipelines.segment.native_residual` with the app's segmentation settings) on the
model's healthy validation images and on the lesion images of BIDS_DIR; each is calibrated like
the app and scored by the Dice of its lesions at that threshold (before they grow: the cost
comparison needs no more). Methods:

- ``batched``: the app (``compute.inference_batch_size`` chains per UNet forward);
- ``unbatched``: one chain per UNet forward (the same result, the path before batching).

The second form times the same methods on random weights (cost does not depend on training) for
one volume of ``--shape`` at a preset's model size.

Each method runs in a fresh subprocess; peak memory (``benchmarks.measurement.PeakMemory``) is
``cuda.max_memory_allocated`` on CUDA, on CPU the resident-set growth over the loaded models
during the timed images. Times are medians over the images after one warm-up image; UNet
evaluations count one per chain and step (a batched forward of 9 chains counts 9), forwards count
the calls. The step-count and sampler variants measured before the app settled on its one-step
read-out are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.measurement import PeakMemory, machine_info, synchronize  # noqa: E402

METHODS = ("batched", "unbatched")


def method_compute(method: str) -> Any:
    """The compute settings of ``method``: the app's, or one chain per UNet forward."""
    from bids_app.settings import ComputeSettings

    if method == "batched":
        return ComputeSettings()
    if method == "unbatched":
        return ComputeSettings(inference_batch_size=1)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


class CountingUNet:
    """Wraps the UNet to count forwards and per-chain evaluations (the batch size of each forward)."""

    def __init__(self, unet: Any) -> None:
        self.unet, self.forwards, self.evaluations = unet, 0, 0

    def __call__(self, z, t, *rest):
        self.forwards += 1
        # A single chain runs as two identical copies (pipelines.counterfactual.avoid_single_batch):
        # one evaluation.
        duplicated = z.shape[0] == 2 and torch.equal(z[0], z[1])
        self.evaluations += 1 if duplicated else int(z.shape[0])
        return self.unet(z, t, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)


def run_trained(args: argparse.Namespace) -> dict[str, Any]:
    """Child: one method over the validation and lesion images of a trained model."""
    import numpy as np

    from bids_app.bids.layout import collect_images, find_derivative_datasets, load_layout
    from bids_app.model_store import load_trained_models
    from bids_app.participant import _truth, image_input
    from bids_app.pipelines.counterfactual import CounterfactualPipeline
    from bids_app.pipelines.segment import native_residual
    from bids_app.segmentation.calibration import calibrate
    from bids_app.segmentation.lesions import lesion_free_threshold, lesion_mask
    from bids_app.segmentation.metrics import best_dice_over_thresholds, dice
    from bids_app.settings import SelectionSettings

    seg = strength_settings(args)
    models = load_trained_models(args.model_dir, args.device)
    counter = CountingUNet(models.unet)
    pipeline = CounterfactualPipeline.from_models(dataclasses.replace(models, unet=counter), args.device,
                                                  method_compute(args.child))
    validation = {p.removeprefix("sub-") for p in models.card["validation_participants"]}
    records = collect_images(args.bids_dir, SelectionSettings(), load_layout(args.bids_dir),
                             find_derivative_datasets(args.bids_dir))
    healthy = [r for r in records if r.subject in validation]
    lesioned = [r for r in records if r.lesion_mask is not None][: args.max_lesion_images]

    def residual(record) -> tuple[Any, float, int]:
        """The native residual (the participant level's procedure), seconds, evaluations."""
        before, started = counter.evaluations, time.perf_counter()
        result = native_residual(pipeline, models.plan, image_input(record), seg, args.seed)
        synchronize(args.device)
        return result, time.perf_counter() - started, counter.evaluations - before

    residual(healthy[0] if healthy else lesioned[0])  # warm-up
    memory = PeakMemory(args.device)
    memory.start()
    forwards_before = counter.forwards
    per_image = []
    for record in healthy + lesioned:
        result, seconds, evaluations = residual(record)
        per_image.append({"image": record.relpath, "seconds": seconds, "unet_evaluations": evaluations,
                          "result": result, "record": record})
    peak_bytes = memory.stop()["peak_bytes"]
    calibrating = [p["result"] for p in per_image[: len(healthy)]]
    min_volume = seg.lesions.min_lesion_mm3
    calibration = calibrate([r.residual for r in calibrating], [r.detection_region for r in calibrating],
                            seg.calibration.quantile, image_fpr=seg.calibration.image_fpr,
                            lesion_free=[lesion_free_threshold(r.residual, r.detection_region, r.spacing_mm,
                                                               min_volume) for r in calibrating])
    dices, oracles = [], []
    for p in per_image[len(healthy):]:
        result, record = p["result"], p["record"]
        mask = lesion_mask(result.residual, result.region, calibration.threshold, result.spacing_mm, min_volume,
                           detection_region=result.detection_region)
        truth = _truth(record, mask.shape)
        dices.append(dice(mask.astype(bool), truth))
        oracles.append(best_dice_over_thresholds(result.residual, truth, result.region)["oracle_best_dice"])
    return {
        "method": args.child, "strengths": list(seg.counterfactual.strengths), "threshold": calibration.threshold,
        "window_shape": list(models.plan.target_shape),
        "model_space_shapes": [list(p["result"].preprocessed.image.shape) for p in per_image],
        "median_seconds_per_image": statistics.median(p["seconds"] for p in per_image),
        "median_unet_evaluations_per_image": statistics.median(p["unet_evaluations"] for p in per_image),
        "forwards": counter.forwards - forwards_before,
        "peak_memory_bytes": peak_bytes,
        "median_dice": float(np.median(dices)) if dices else None, "dice": [round(d, 4) for d in dices],
        "median_oracle_dice": float(np.nanmedian(oracles)) if oracles else None,
        "images": [{"image": p["image"], "seconds": round(p["seconds"], 3), "unet_evaluations": p["unet_evaluations"]}
                   for p in per_image],
    }


def strength_settings(args: argparse.Namespace) -> Any:
    """The app's segmentation settings at ``--strength`` and ``--n-samples``."""
    from bids_app.settings.segmentation import SegmentationSettings

    seg = SegmentationSettings()
    return dataclasses.replace(seg, counterfactual=dataclasses.replace(
        seg.counterfactual, strengths=tuple(args.strength), n_samples=args.n_samples))


def run_random(args: argparse.Namespace) -> dict[str, Any]:
    """Child: one method on one random volume of ``--shape``, random weights of ``--preset``."""
    import numpy as np
    import torch

    from bids_app.models.unet3d import UNET_PRESETS, UNet3D
    from bids_app.models.vqgan import PRESETS, VQGAN
    from bids_app.pipelines.counterfactual import CounterfactualPipeline
    from bids_app.schedulers import SchedulerConfig

    torch.manual_seed(0)
    vqgan = VQGAN(PRESETS[args.preset]()).to(args.device)
    unet = UNet3D(UNET_PRESETS[args.preset](vqgan.config.embedding_dim)).to(args.device)
    counter = CountingUNet(unet)
    image = np.random.default_rng(0).uniform(-1, 1, size=tuple(args.shape)).astype(np.float32)
    compute = method_compute(args.child)
    pipeline = CounterfactualPipeline(vqgan, counter, SchedulerConfig(prediction_type="v_prediction"), 1.0,
                                      window_shape=image.shape, device=args.device, compute=compute)
    settings = strength_settings(args).counterfactual

    def once() -> tuple[float, int]:
        before, started = counter.evaluations, time.perf_counter()
        pipeline(image, settings, args.seed)
        synchronize(args.device)
        return time.perf_counter() - started, counter.evaluations - before

    once()
    memory = PeakMemory(args.device)
    memory.start()
    runs = [once() for _ in range(args.repeats)]
    peak_bytes = memory.stop()["peak_bytes"]
    return {"method": args.child, "preset": args.preset, "shape": list(args.shape), "strengths": list(args.strength),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "median_seconds_per_image": statistics.median(r[0] for r in runs),
            "unet_evaluations_per_image": runs[0][1],
            "peak_memory_bytes": peak_bytes}


def table(rows: list[dict[str, Any]], reference: str) -> str:
    ref = next((r for r in rows if r["method"] == reference), None)
    lines = ["| method | UNet evaluations / image | s / image | peak memory (MiB) | median Dice | oracle Dice "
             "| fewer evaluations | faster |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        evaluations = r.get("median_unet_evaluations_per_image", r.get("unet_evaluations_per_image"))
        ref_evaluations = ref and ref.get("median_unet_evaluations_per_image", ref.get("unet_evaluations_per_image"))
        fewer = f"{ref_evaluations / evaluations:.1f}x" if ref and evaluations else "-"
        faster = f"{ref['median_seconds_per_image'] / r['median_seconds_per_image']:.1f}x" if ref else "-"
        dice_ = f"{r['median_dice']:.3f}" if r.get("median_dice") is not None else "-"
        oracle = f"{r['median_oracle_dice']:.3f}" if r.get("median_oracle_dice") is not None else "-"
        lines.append(f"| {r['method']} | {evaluations:g} | {r['median_seconds_per_image']:.2f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {dice_} | {oracle} | {fewer} | {faster} |")
    return "\n".join(lines)


def main() -> int:
    from bids_app.settings import ComputeSettings
    from bids_app.settings.segmentation import CounterfactualSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path, nargs="?")
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--strength", type=float, nargs="+", default=None,
                        help="default: the app's strengths (trained model), 0.4 (random weights, the seed's)")
    parser.add_argument("--n-samples", type=int, default=CounterfactualSettings().n_samples,
                        help="noise draws per strength (averaged; default: the app's)")
    parser.add_argument("--random-weights", action="store_true", help="time one random volume instead")
    parser.add_argument("--preset", default="default", choices=("tiny", "default"))
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-lesion-images", type=int, default=10)
    parser.add_argument("--seed", type=int, default=ComputeSettings().seed)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("counterfactual_cost.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strength is None:
        args.strength = [0.4] if args.random_weights else list(CounterfactualSettings().strengths)
    if not args.random_weights and (args.bids_dir is None or args.model_dir is None):
        parser.error("BIDS_DIR and MODEL_DIR are needed unless --random-weights")
    if args.child:
        result = run_random(args) if args.random_weights else run_trained(args)
        print(json.dumps(result))
        return 0
    rows = []
    for method in args.methods:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", method]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"{method} failed (exit {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: {rows[-1]['median_seconds_per_image']:.2f} s/image", file=sys.stderr, flush=True)
    report = {"machine": machine_info(args.device), "random_weights": args.random_weights, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["machine"]))
    shapes = {key: rows[0][key] for key in ("window_shape", "model_space_shapes", "shape", "preset") if key in rows[0]}
    print(json.dumps(shapes))
    print(table(rows, "unbatched"))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
