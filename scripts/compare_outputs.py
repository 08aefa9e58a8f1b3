#!/usr/bin/env python3
"""Compare two counterseg output directories made from the same data with the same seed.

    python scripts/compare_outputs.py REFERENCE CANDIDATE [--atol 1e-5]

They agree when they hold the same files (``logs/`` aside: its names carry a time and a process
id), every lesion mask is identical voxel for voxel (same affine too), every other NIfTI image
(anomaly maps, counterfactuals) agrees within ``--atol``, and the trained weights have the same
SHA-256 in both model cards. Prints one line per difference and exits 1 if there is any, else 0.
The container smoke test (``scripts/container_smoke.sh``) uses it to compare the image's outputs
with a run outside the container.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

#: Folders whose file names differ between two identical runs (time stamp and pid in the name).
UNCOMPARED_FOLDERS = ("logs",)
#: Outputs that must match exactly: thresholded, so a tolerance would hide a flipped voxel.
EXACT_SUFFIXES = ("_mask.nii.gz", "_mask.nii")


def output_files(root: Path) -> set[str]:
    """Relative paths of the files under root, without the uncompared folders."""
    files = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] not in UNCOMPARED_FOLDERS:
            files.add(relative.as_posix())
    return files


def compare_file_sets(reference: set[str], candidate: set[str]) -> list[str]:
    missing = [f"missing from the candidate: {name}" for name in sorted(reference - candidate)]
    extra = [f"only in the candidate: {name}" for name in sorted(candidate - reference)]
    return missing + extra


def compare_images(name: str, reference: Path, candidate: Path, atol: float) -> list[str]:
    """Geometry always exactly; data exactly for masks, within atol for continuous maps."""
    ref_img, cand_img = nib.load(reference), nib.load(candidate)
    if ref_img.shape != cand_img.shape:
        return [f"{name}: shape {cand_img.shape} != {ref_img.shape}"]
    if not np.array_equal(ref_img.affine, cand_img.affine):
        return [f"{name}: affines differ"]
    ref_data, cand_data = np.asanyarray(ref_img.dataobj), np.asanyarray(cand_img.dataobj)
    if name.endswith(EXACT_SUFFIXES):
        differing = int(np.count_nonzero(ref_data != cand_data))
        return [f"{name}: {differing} voxel(s) differ"] if differing else []
    gap = float(np.max(np.abs(ref_data.astype(np.float64) - cand_data.astype(np.float64)), initial=0.0))
    return [f"{name}: max |difference| {gap:.3g} > {atol:g}"] if not gap <= atol else []


def weight_checksums(model_card: Path) -> dict[str, str]:
    """Component name -> SHA-256 of its weights, as the model card records them."""
    card = json.loads(model_card.read_text(encoding="utf-8"))
    return {name: str(entry.get("sha256")) for name, entry in card.get("components", {}).items()}


def compare_model_cards(reference: Path, candidate: Path) -> list[str]:
    ref_sums, cand_sums = weight_checksums(reference), weight_checksums(candidate)
    if not ref_sums:
        return [f"{reference}: no component checksums in the model card"]
    return [
        f"models: {name} weights differ (SHA-256 {cand_sums.get(name)} != {ref_sums[name]})"
        for name in sorted(set(ref_sums) | set(cand_sums))
        if ref_sums.get(name) != cand_sums.get(name)
    ]


def compare_outputs(reference: Path, candidate: Path, atol: float) -> tuple[list[str], int]:
    """All differences between the two output directories, and how many images were compared."""
    ref_files, cand_files = output_files(reference), output_files(candidate)
    differences = compare_file_sets(ref_files, cand_files)
    images = sorted(name for name in ref_files & cand_files
                    if name.endswith((".nii", ".nii.gz")) and not name.startswith("work/"))
    for name in images:
        differences += compare_images(name, reference / name, candidate / name, atol)
    card = "models/model_card.json"
    if card in ref_files & cand_files:
        differences += compare_model_cards(reference / card, candidate / card)
    return differences, len(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="largest difference allowed in non-mask images (default 1e-5)")
    args = parser.parse_args(argv)
    for root in (args.reference, args.candidate):
        if not root.is_dir():
            parser.error(f"{root} is not a directory")
    differences, n_images = compare_outputs(args.reference, args.candidate, args.atol)
    if not n_images:
        differences.append("no NIfTI outputs to compare")
    for line in differences:
        print(line)
    if differences:
        print(f"{len(differences)} difference(s) between {args.reference} and {args.candidate}")
        return 1
    print(f"outputs agree: {len(output_files(args.reference))} files, {n_images} images "
          f"(masks identical, other images within {args.atol:g}), same model weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
