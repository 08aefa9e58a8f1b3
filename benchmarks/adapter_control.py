"""Does the T2I-Adapter put the cord where the control mask says? And does it keep counterfactuals faithful?

    python benchmarks/adapter_control.py BIDS_DIR MODEL_DIR [--steps 20] [--out adapter_control.json]

1. Control: for each healthy image with a cord mask, sample from pure noise (DDIM) with the adapter
   fed that image's cord mask, and without it (same noise); segment the cord in the decoded sample
   by a simple threshold of the phantom intensities (the cord is the dark interior enclosed by the
   bright CSF ring on T2w: voxels below the CSF threshold inside the filled ring, slice by slice)
   and report its Dice with the control mask.
2. Fidelity: the mean healthy in-cord residual of the app's counterfactuals (its pipeline and
   counterfactual settings) on the held-out healthy participants, with and without the adapter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bids_app.bids.layout import collect_images, find_derivative_datasets, load_layout  # noqa: E402
from bids_app.model_store import load_trained_models  # noqa: E402
from bids_app.pipelines.batching import decode  # noqa: E402
from bids_app.pipelines.counterfactual import CounterfactualPipeline  # noqa: E402
from bids_app.preprocessing.pipeline import preprocess  # noqa: E402
from bids_app.schedulers import DDIMScheduler, denoise, draw_noise  # noqa: E402
from bids_app.segmentation.metrics import dice  # noqa: E402
from bids_app.settings import ComputeSettings, SelectionSettings  # noqa: E402
from bids_app.settings.segmentation import CounterfactualSettings  # noqa: E402


def cord_from_intensities(volume: np.ndarray) -> np.ndarray:
    """Cord = not-bright voxels enclosed by the bright CSF ring, per axial (S) slice."""
    csf = volume > np.quantile(volume, 0.9)
    cord = np.zeros_like(csf)
    for z in range(volume.shape[2]):
        filled = ndimage.binary_fill_holes(csf[:, :, z])
        cord[:, :, z] = filled & ~csf[:, :, z]
    return cord


@torch.no_grad()
def sample(models, shape, features, steps: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDIMScheduler(models.scheduler_config)
    scheduler.set_timesteps(steps)
    noise = draw_noise(torch.empty(shape), generator)
    fn = (lambda z, t: models.unet(z, t, features)) if features is not None else (lambda z, t: models.unet(z, t))
    latent = denoise(fn, scheduler, noise, scheduler.timesteps, generator)
    return decode(models.vqgan, latent, models.latent_scale, None)[0, 0].numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("adapter_control.json"))
    args = parser.parse_args()
    models = load_trained_models(args.model_dir)
    if models.adapter is None:
        raise SystemExit(f"{args.model_dir} has no adapter")
    records = collect_images(args.bids_dir, SelectionSettings(), load_layout(args.bids_dir),
                             find_derivative_datasets(args.bids_dir))
    healthy = [r for r in records if r.lesion_mask is None and r.cord_mask is not None]
    validation = {p.removeprefix("sub-") for p in models.card["validation_participants"]}
    pipeline = CounterfactualPipeline.from_models(models, "cpu", ComputeSettings())
    settings = {"with": CounterfactualSettings(), "without": CounterfactualSettings(adapter_scale=0.0)}
    control, fidelity = {"with": [], "without": []}, {"with": [], "without": []}
    for index, record in enumerate(healthy):
        pre = preprocess(record.image, models.plan, {"cord": record.cord_mask})  # the default control
        cord = pre.masks["cord"].astype(bool)
        mask = torch.from_numpy(cord.astype(np.float32))[None, None]
        features = models.adapter(mask)
        latent_shape = (1, models.vqgan.config.embedding_dim, *models.vqgan.latent_shape(pre.image.shape))
        for key, feats in (("with", features), ("without", None)):
            generated = sample(models, latent_shape, feats, args.steps, seed=index)
            control[key].append(dice(cord_from_intensities(generated), cord))
        if record.subject in validation:
            for key, cf_settings in settings.items():
                cf = pipeline(pre.image, cf_settings, index, editable=cord, control=cord)[0]
                fidelity[key].append(float(np.abs(pre.image - cf.image)[cord].mean()))
    report = {"control_dice": {k: [round(v, 4) for v in vals] for k, vals in control.items()},
              "median_control_dice": {k: float(np.median(v)) for k, v in control.items()},
              "healthy_in_cord_residual": {k: float(np.mean(v)) if v else None for k, v in fidelity.items()}}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_control_dice", "healthy_in_cord_residual")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
