"""The output dataset's tables: per-image lesion tables and the dataset-level ``lesions.tsv``, each
with a JSON sidecar describing every column (BIDS tabular style: LongName, Description, Units, Levels).

``lesions.tsv`` has one row per segmented image of the output dataset, for statistics. It is rebuilt
from what is on disk (the finished images: a lesion mask marks one done), never from one run's
memory, so the jobs of a job array that share an output dataset each rebuild it whole; they do so
under a lock and write it atomically, and the last one to finish lists every image.

Cells are ``n/a`` where a value does not apply (no lesion, no ground truth), booleans ``true``/``false``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.bids.derivatives import RAW_LINK
from bids_app.image_outputs import image_outputs
from bids_app.io import atomic_write_json, atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)

DATASET_TABLE = "lesions.tsv"
_TABLE_LOCK = ("logs", ".lesions_table.lock")
_MASK_GLOB = "sub-*/**/*_label-lesion*_mask.nii.gz"
_RAW_PREFIX = f"bids:{RAW_LINK}:"

_REGIONS = ("C",) * 7 + ("T",) * 12 + ("L",) * 5
#: Vertebral levels as the Spinal Cord Toolbox numbers them: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5.
VERTEBRAL_LEVELS = {str(n): f"{region}{n - _REGIONS.index(region)}" for n, region in enumerate(_REGIONS, 1)}

_SCORE = "the anomaly score (the _probseg image: where a voxel's residual lies among healthy residuals)"

#: The per-image lesion table (``<image stem>_lesions.tsv``): one row per 26-connected lesion of the mask.
LESION_COLUMNS: dict[str, dict[str, Any]] = {
    "index": {"LongName": "Lesion number", "Description": "Lesion number in this image, largest lesion first."},
    "volume_mm3": {"LongName": "Lesion volume", "Description": "Volume of the lesion (its voxel count times "
                   "the voxel volume of the source image).", "Units": "mm^3"},
    **{f"centroid_{axis}_mm": {"LongName": f"Lesion centroid, {axis}",
                               "Description": f"{axis} coordinate of the lesion's centroid in the scanner (world) "
                               "coordinates of the source image (its NIfTI affine; RAS+).", "Units": "mm"}
       for axis in "xyz"},
    "max_score": {"LongName": "Highest anomaly score", "Description": f"Highest value of {_SCORE} in the lesion."},
    "mean_score": {"LongName": "Mean anomaly score", "Description": f"Mean of {_SCORE} over the lesion's voxels."},
    "n_voxels": {"LongName": "Lesion voxels", "Description": "Number of voxels of the lesion."},
    "vertebral_level": {"LongName": "Vertebral level", "Description": "", "Levels": VERTEBRAL_LEVELS},
}

_GROUND_TRUTH = " Ground-truth metric: n/a when the image has no reference lesion mask (ground_truth false)."
#: ``lesions.tsv``: one row per segmented image; the ground-truth metrics come from each image's evaluation.
DATASET_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"LongName": "Participant", "Description": "Participant label, sub-<label>."},
    "session_id": {"LongName": "Session", "Description": "Session label, ses-<label>; n/a without sessions."},
    "image": {"LongName": "Source image", "Description": "The segmented image, relative to the raw dataset "
              "(DatasetLinks raw in dataset_description.json)."},
    "lesion_mask": {"LongName": "Lesion mask", "Description": "The image's lesion mask, relative to this dataset."},
    "n_lesions": {"LongName": "Number of lesions", "Description": "Number of 26-connected lesions in the mask."},
    "lesion_volume_mm3": {"LongName": "Total lesion volume", "Description": "Volume of all lesions together.",
                          "Units": "mm^3"},
    "max_score": {"LongName": "Highest lesion score", "Description": f"Highest value of {_SCORE} in any lesion; "
                  "n/a without a lesion."},
    "mean_score": {"LongName": "Mean lesion score", "Description": f"Mean of {_SCORE} over all lesion voxels; "
                   "n/a without a lesion."},
    "any_lesion": {"LongName": "Any lesion", "Description": "Whether the mask has a lesion.",
                   "Levels": {"true": "at least one lesion", "false": "no lesion"}},
    "threshold": {"LongName": "Residual threshold", "Description": "Threshold on the residual (normalised "
                  "intensity) the mask's lesion candidates exceed (Threshold in the mask's sidecar)."},
    "probseg_threshold": {"LongName": "Anomaly score threshold", "Description": "The same threshold in the "
                          "units of the _probseg image: thresholding the probseg there gives the mask's lesion "
                          "candidates (ProbsegThreshold in the mask's sidecar)."},
    "threshold_source": {"LongName": "Threshold source", "Description": "Where the threshold came from.",
                         "Levels": {"calibrated": "calibrated on held-out healthy images (group level)",
                                    "user": "given with --threshold"}},
    "ground_truth": {"LongName": "Ground truth", "Description": "Whether a reference lesion mask was found for the "
                     "image (the metrics that follow are computed against it).",
                     "Levels": {"true": "reference lesion mask found", "false": "no reference lesion mask"}},
    "dice": {"LongName": "Dice", "Description": "Dice overlap of the mask with the reference." + _GROUND_TRUTH},
    "auprc": {"LongName": "Voxel-wise AUPRC", "Description": "Area under the precision-recall curve of the "
              "anomaly score against the reference, inside the analysis region." + _GROUND_TRUTH},
    "lesion_precision": {"LongName": "Lesion-wise precision", "Description": "Fraction of the predicted lesions "
                         "that overlap a reference lesion." + _GROUND_TRUTH},
    "lesion_recall": {"LongName": "Lesion-wise recall", "Description": "Fraction of the reference lesions that "
                      "overlap a predicted lesion." + _GROUND_TRUTH},
    "lesion_f1": {"LongName": "Lesion-wise F1", "Description": "Harmonic mean of lesion_precision and "
                  "lesion_recall." + _GROUND_TRUTH},
    "n_true_lesions": {"LongName": "Reference lesions", "Description": "Number of lesions of the reference."
                       + _GROUND_TRUTH},
    "true_volume_mm3": {"LongName": "Reference lesion volume", "Description": "Volume of the reference lesions."
                        + _GROUND_TRUTH, "Units": "mm^3"},
    "volume_error_mm3": {"LongName": "Volume error", "Description": "Absolute difference between the predicted "
                         "and the reference lesion volume." + _GROUND_TRUTH, "Units": "mm^3"},
    "fp_volume_mm3": {"LongName": "False-positive volume", "Description": "Predicted lesion volume outside the "
                      "reference lesions." + _GROUND_TRUTH, "Units": "mm^3"},
}
#: The columns read from each image's evaluation (written by ``segmentation.metrics.evaluate``).
GROUND_TRUTH_METRICS = tuple(DATASET_COLUMNS)[list(DATASET_COLUMNS).index("dice"):]


def format_tsv_value(value: Any) -> str:
    """A TSV cell: ``n/a`` for None/NaN (BIDS), 6 significant digits for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return "n/a" if not np.isfinite(value) else f"{float(value):.6g}"
    return str(value)


def tsv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A tab-separated table: the header, then one line per row (``n/a`` for a missing cell)."""
    lines = ["\t".join(columns)] + ["\t".join(format_tsv_value(row.get(c)) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated table with a header line (empty when absent or unreadable)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def lesion_table_sidecar(levels_from: str | None = None) -> dict[str, Any]:
    """The sidecar of a per-image lesion table; ``levels_from``: the BIDS URI of the disc labels
    the vertebral levels come from (None: none were found, and the levels are n/a)."""
    sidecar = json.loads(json.dumps(LESION_COLUMNS))
    if levels_from:
        text = (f"Vertebral level of the lesion's centroid, from the labels {levels_from}, in the Spinal Cord "
                "Toolbox's numbering (see Levels). Disc labels (value n at the disc above vertebra n, 3 = C2/C3): "
                "level n when the centroid, projected onto the segment from disc n + 1 to disc n, falls within "
                "it. Labels with a level in every cord voxel: the level of the labelled voxel nearest the "
                "centroid. n/a when the centroid lies outside the labelled levels.")
    else:
        text = "Vertebral level of the lesion: n/a, as no disc labels were found for this image."
    sidecar["vertebral_level"]["Description"] = text
    return sidecar


def write_lesion_sidecar(table: str | Path, levels_from: str | None = None) -> Path:
    """Write the JSON sidecar next to a per-image lesion table (``x_lesions.tsv`` -> ``x_lesions.json``)."""
    return atomic_write_json(Path(table).with_suffix(".json"), lesion_table_sidecar(levels_from))


# --------------------------------------------------------------------------- lesions.tsv


def image_row(output_dir: Path, mask: Path) -> dict[str, Any] | None:
    """The ``lesions.tsv`` row of one finished image, from its mask's sidecar, its lesion table and
    its evaluation; None when the sidecar names no source image (not one of ours)."""
    sidecar = _read_json(mask.with_name(mask.name[: -len(".nii.gz")] + ".json"))
    source = next((s[len(_RAW_PREFIX):] for s in sidecar.get("Sources") or []
                   if isinstance(s, str) and s.startswith(_RAW_PREFIX)), None)
    if source is None:
        log.warning("%s: its sidecar names no source image; left out of %s", mask, DATASET_TABLE)
        return None
    try:
        paths = image_outputs(output_dir, source)
    except ValueError as exc:  # a source path no output of ours is named after
        log.warning("%s: %s; left out of %s", mask, exc, DATASET_TABLE)
        return None
    lesions = read_tsv(paths.lesion_table)
    evaluation = _read_json(paths.evaluation)
    parts = Path(source).parts
    volumes = [_number(r.get("volume_mm3")) for r in lesions]
    voxels = [_number(r.get("n_voxels")) for r in lesions]
    means = [_number(r.get("mean_score")) for r in lesions]
    maxima = [m for m in (_number(r.get("max_score")) for r in lesions) if m is not None]
    weighted = [(m, n) for m, n in zip(means, voxels) if m is not None and n]
    truth = "dice" in evaluation
    row = {
        "participant_id": parts[0],
        "session_id": parts[1] if len(parts) > 3 and parts[1].startswith("ses-") else None,
        "image": source,
        "lesion_mask": mask.relative_to(output_dir).as_posix(),
        "n_lesions": len(lesions),
        "lesion_volume_mm3": float(sum(v for v in volumes if v is not None)),
        "max_score": max(maxima) if maxima else None,
        "mean_score": sum(m * n for m, n in weighted) / sum(n for _, n in weighted) if weighted else None,
        "any_lesion": bool(lesions),
        "threshold": sidecar.get("Threshold"),
        "probseg_threshold": sidecar.get("ProbsegThreshold"),
        "threshold_source": sidecar.get("ThresholdSource"),
        "ground_truth": truth,
    }
    row.update({key: evaluation.get(key) if truth else None for key in GROUND_TRUTH_METRICS})
    return row


def dataset_rows(output_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished image of the output dataset, by source image path."""
    output_dir = Path(output_dir)
    masks = [p for p in output_dir.glob(_MASK_GLOB) if not p.name.startswith(".")]
    rows = [row for row in (image_row(output_dir, mask) for mask in masks) if row is not None]
    return sorted(rows, key=lambda row: row["image"])


def write_dataset_table(output_dir: str | Path) -> Path:
    """Rebuild ``lesions.tsv`` and its sidecar from every finished image on disk (see the module doc)."""
    output_dir = Path(output_dir)
    path = output_dir / DATASET_TABLE
    with exclusive_lock(output_dir.joinpath(*_TABLE_LOCK)):
        rows = dataset_rows(output_dir)
        atomic_write_json(path.with_suffix(".json"), DATASET_COLUMNS)
        atomic_write_text(path, tsv_text(tuple(DATASET_COLUMNS), rows))
    log.info("%s: %d image(s)", path, len(rows))
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell) if cell is not None else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) else None
