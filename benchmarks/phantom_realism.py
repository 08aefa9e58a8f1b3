"""How close the phantom's contrasts and noise are to a real spinal-cord scan.

    python benchmarks/phantom_realism.py [--realdata ../shared/realdata] [--n-per-acquisition 3]
        [--out phantom_realism.json]

Real data: the spine-generic participant in ``../shared/realdata`` (Cohen-Adad et al., Scientific
Data 2021; 1 mm axial slab, T2w, T1w, T2star, manual cord masks). Phantoms: healthy participants of
every acquisition, rendered in the three contrasts. The same scale-free measures on both, all
relative to the cord's median so that scanner scaling drops out:

- ``csf_to_cord``: median of a ring 0.5-2 mm outside the cord mask (mostly CSF) over the cord's;
- ``core_to_rim``: median of the cord's core (deeper than 40 % of its maximal depth: mostly grey
  matter) over its outer 1 mm (white matter): the grey/white contrast as a voxel sees it;
- ``cord_cv``: coefficient of variation inside the cord (texture, noise, grey/white);
- ``noise_to_cord``: noise from differences of neighbouring voxels in the cord's interior (robust
  MAD of the difference along the first axis over sqrt 2), over the cord's median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bids_app.synthetic import generate_dataset  # noqa: E402

#: Real contrast suffix -> the phantom's name for it.
CONTRASTS = {"T2w": "T2w", "T1w": "T1w", "T2star": "T2starw"}
MEASURES = ("csf_to_cord", "core_to_rim", "cord_cv", "noise_to_cord")


def measures(image: np.ndarray, cord: np.ndarray, zooms: Sequence[float]) -> dict[str, float]:
    """The scale-free contrast and noise measures of one image and its cord mask."""
    cord = cord.astype(bool)
    outside = ndimage.distance_transform_edt(~cord, sampling=zooms)
    depth = ndimage.distance_transform_edt(cord, sampling=zooms)
    cord_median = float(np.median(image[cord]))
    ring = (outside > 0.5) & (outside <= 2.0)
    core = cord & (depth > 0.4 * depth.max())
    rim = cord & (depth <= 1.0 + 1e-6)
    interior = ndimage.binary_erosion(cord)
    pairs = interior[1:] & interior[:-1]
    diff = (image[1:] - image[:-1])[pairs]
    noise = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2.0)
    return {
        "csf_to_cord": float(np.median(image[ring])) / cord_median,
        "core_to_rim": float(np.median(image[core])) / float(np.median(image[rim])),
        "cord_cv": float(image[cord].std()) / cord_median,
        "noise_to_cord": noise / cord_median,
    }


def real_measures(realdata: Path) -> dict[str, dict[str, float]]:
    """Measures of each contrast of the real participant."""
    root = realdata / "spine-generic-unf01"
    out = {}
    for suffix in CONTRASTS:
        image = nib.load(root / "sub-unf01" / "anat" / f"sub-unf01_{suffix}.nii.gz")
        cord = nib.load(root / "derivatives" / "labels" / "sub-unf01" / "anat" / f"sub-unf01_{suffix}_seg-manual.nii.gz")
        out[suffix] = measures(image.get_fdata(), cord.get_fdata() > 0.5, image.header.get_zooms()[:3])
    return out


def phantom_measures(n_per_acquisition: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Median measures of healthy phantoms per contrast and acquisition."""
    with tempfile.TemporaryDirectory() as tmp:
        ds = generate_dataset(Path(tmp) / "ds", n_healthy=3 * n_per_acquisition, n_lesion=0, seed=seed,
                              contrasts=tuple(CONTRASTS.values()))
        collected: dict[str, dict[str, list[dict[str, float]]]] = {}
        for image in ds.images:
            label, contrast = image.name.split("_")[0][4:], image.name.split("_")[-1].split(".")[0]
            img = nib.load(image)
            cord = np.asanyarray(nib.load(ds.cord_masks[image]).dataobj) > 0
            collected.setdefault(contrast, {}).setdefault(ds.acquisitions[label], []).append(
                measures(img.get_fdata(), cord, img.header.get_zooms()[:3]))
    return {contrast: {acq: {m: statistics.median(r[m] for r in rows) for m in MEASURES}
                       for acq, rows in by_acq.items()} for contrast, by_acq in collected.items()}


def table(real: dict[str, Any], phantom: dict[str, Any]) -> str:
    """Markdown: one row per contrast and source."""
    lines = ["| contrast | source | " + " | ".join(MEASURES) + " |", "|---|---|" + "---:|" * len(MEASURES)]
    for suffix, name in CONTRASTS.items():
        lines.append(f"| {suffix} | real (spine-generic) | " + " | ".join(f"{real[suffix][m]:.2f}" for m in MEASURES) + " |")
        for acq, values in phantom[name].items():
            lines.append(f"| {suffix} | phantom {acq} | " + " | ".join(f"{values[m]:.2f}" for m in MEASURES) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realdata", type=Path, default=ROOT.parent / "shared" / "realdata")
    parser.add_argument("--n-per-acquisition", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("phantom_realism.json"))
    args = parser.parse_args(argv)
    real = real_measures(args.realdata)
    phantom = phantom_measures(args.n_per_acquisition, args.seed)
    args.out.write_text(json.dumps({"real": real, "phantom": phantom}, indent=2) + "\n")
    print(table(real, phantom))
    return 0


if __name__ == "__main__":
    sys.exit(main())
