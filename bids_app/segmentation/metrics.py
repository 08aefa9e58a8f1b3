"""Evaluation against ground-truth lesion masks (synthetic data, labelled test sets).

Undefined values are NaN, never a silent 0 or 1, and :func:`summarise` skips them, so healthy
participants do not distort lesion metrics and vice versa. Conventions:

* Dice of two empty masks is 1.0 (a healthy image correctly left empty is a perfect answer).
* AUPRC is NaN when the region has no lesion voxel (precision-recall is undefined).
* Lesion-wise: precision is NaN with no predicted lesion, recall NaN with no true lesion;
  F1 = 2PR/(P+R), 0 when exactly one of the two masks is empty, NaN when both are.
* The "oracle" best Dice picks the threshold using the ground truth: an upper bound for what
  thresholding could achieve, never a result to report as performance.

Lesions are 26-connected components, as in :mod:`bids_app.segmentation.lesions`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.io import atomic_write_text
from bids_app.segmentation.lesions import format_tsv_value, label_components

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("metric", "mean", "median", "n")
N_ORACLE_THRESHOLDS = 64


def _binary(a: np.ndarray) -> np.ndarray:
    return np.asarray(a) > 0


def _same_shape(*arrays: np.ndarray) -> None:
    shapes = {np.shape(a) for a in arrays if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"arrays differ in shape: {sorted(shapes)}")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|P & T| / (|P| + |T|); 1.0 when both are empty (see module doc)."""
    _same_shape(pred, truth)
    p, t = _binary(pred), _binary(truth)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / total


def _region_values(
    scores: np.ndarray, truth: np.ndarray, region: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    _same_shape(scores, truth, region)
    scores = np.asarray(scores, dtype=np.float64)
    inside = np.ones(scores.shape, dtype=bool) if region is None else np.asarray(region, dtype=bool)
    return scores[inside], _binary(truth)[inside]


def auprc(scores: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> float:
    """Average precision of the voxel ranking by ``scores`` inside ``region`` (NaN without a lesion voxel).

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score values taken as thresholds
    (descending; tied voxels enter together): the step-wise area under the precision-recall curve
    without interpolation. scikit-learn's ``average_precision_score`` computes exactly this (the
    trapezoidal ``auc(recall, precision)`` would interpolate linearly, which overestimates AP), so
    the maintained implementation is used (scikit-learn, a dependency). Imported here: only evaluation
    against ground truth needs it, and it takes seconds to import.
    """
    from sklearn.metrics import average_precision_score

    s, y = _region_values(scores, truth, region)
    if not y.any():
        return math.nan
    return float(average_precision_score(y, s))


def lesion_wise(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """Lesion detection: precision, recall, f1, n_pred, n_truth (26-connected lesions).

    A predicted lesion is a true positive when it overlaps any true lesion; a true lesion is
    detected when any predicted voxel overlaps it. (So one big prediction covering two true
    lesions detects both, and counts once as a true positive.)
    """
    _same_shape(pred, truth)
    p, t = _binary(pred), _binary(truth)
    pred_labels, n_pred = label_components(p)
    truth_labels, n_truth = label_components(t)
    hit_pred = np.unique(pred_labels[p & t]).size  # labels of predicted lesions touching truth
    hit_truth = np.unique(truth_labels[p & t]).size
    precision = hit_pred / n_pred if n_pred else math.nan
    recall = hit_truth / n_truth if n_truth else math.nan
    if n_pred == 0 and n_truth == 0:
        f1 = math.nan
    elif n_pred == 0 or n_truth == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1,
            "n_pred_lesions": n_pred, "n_true_lesions": n_truth}


def volume_error_mm3(pred: np.ndarray, truth: np.ndarray, voxel_volume: float) -> float:
    """Absolute difference of total lesion volumes (mm^3)."""
    _same_shape(pred, truth)
    return abs(int(_binary(pred).sum()) - int(_binary(truth).sum())) * float(voxel_volume)


def best_dice_over_thresholds(
    scores: np.ndarray,
    truth: np.ndarray,
    region: np.ndarray | None,
    thresholds: Sequence[float] | None = None,
) -> dict[str, float]:
    """Oracle: the best Dice of ``(scores > t) & region`` over ``thresholds``, and its ``t``.

    No component filtering. ``thresholds=None`` takes ``N_ORACLE_THRESHOLDS`` values evenly
    spaced over the in-region score range. NaN when the truth has no lesion (any threshold
    above the maximum would trivially win). Keys say "oracle" so nobody reports it as a result.
    """
    _same_shape(scores, truth, region)
    t = _binary(truth)
    nan = {"oracle_best_dice": math.nan, "oracle_best_threshold": math.nan}
    if not t.any():
        return nan
    inside = np.ones(t.shape, dtype=bool) if region is None else np.asarray(region, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if thresholds is None:
        values = s[inside]
        if values.size == 0:
            return nan
        thresholds = np.linspace(values.min(), values.max(), N_ORACLE_THRESHOLDS, endpoint=False)
    best, best_t = -1.0, math.nan
    n_truth = int(t.sum())
    for thr in thresholds:
        p = (s > thr) & inside
        d = 2.0 * int((p & t).sum()) / (int(p.sum()) + n_truth)
        if d > best:
            best, best_t = d, float(thr)
    return {"oracle_best_dice": best, "oracle_best_threshold": best_t} if best >= 0 else nan


def healthy_false_positive(pred: np.ndarray, voxel_volume: float) -> dict[str, Any]:
    """For a healthy image every predicted voxel is false: whether any, and their volume."""
    p = _binary(pred)
    return {"any_lesion": bool(p.any()), "fp_volume_mm3": float(p.sum()) * float(voxel_volume)}


def evaluate(
    pred_mask: np.ndarray,
    scores: np.ndarray | None,
    truth: np.ndarray,
    region: np.ndarray | None,
    voxel_volume_mm3: float,
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """All metrics of one image. ``fp_volume_mm3`` is the predicted volume outside the truth
    (for a healthy image: the whole prediction); score metrics are NaN without ``scores``."""
    _same_shape(pred_mask, scores, truth, region)
    p, t = _binary(pred_mask), _binary(truth)
    row: dict[str, Any] = {
        "dice": dice(p, t),
        "auprc": auprc(scores, t, region) if scores is not None else math.nan,
        **lesion_wise(p, t),
        "volume_error_mm3": volume_error_mm3(p, t, voxel_volume_mm3),
        "pred_volume_mm3": float(p.sum()) * voxel_volume_mm3,
        "true_volume_mm3": float(t.sum()) * voxel_volume_mm3,
    }
    if scores is not None:
        row.update(best_dice_over_thresholds(scores, t, region, thresholds))
    else:
        row.update({"oracle_best_dice": math.nan, "oracle_best_threshold": math.nan})
    row["any_lesion"] = bool(p.any())
    row["fp_volume_mm3"] = healthy_false_positive(p & ~t, voxel_volume_mm3)["fp_volume_mm3"]
    return row


def _as_number(value: Any) -> float | None:
    """A float for numeric/bool cells (bools become 0/1: their mean is a rate), else None."""
    if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
        return float(value)
    return None


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per numeric metric: mean, median and n over participants, ignoring NaN.

    Non-numeric columns (participant ids, ...) are skipped; a metric that is NaN everywhere
    gets NaN mean/median and n = 0. Boolean metrics give rates (e.g. any_lesion).
    """
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            number = _as_number(value)
            if number is not None:
                columns.setdefault(key, []).append(number)
    summary = {}
    for key, values in columns.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        summary[key] = {"mean": float(arr.mean()) if arr.size else math.nan,
                        "median": float(np.median(arr)) if arr.size else math.nan,
                        "n": int(arr.size)}
    return summary


def write_metrics_tsv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """The per-participant table: one row each, columns in first-seen order, ``n/a`` for NaN."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["\t".join(columns)] + ["\t".join(format_tsv_value(r.get(c)) for c in columns) for r in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_summary_tsv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """The summary of per-participant ``rows`` (:func:`summarise`): metric, mean, median, n."""
    lines = ["\t".join(SUMMARY_COLUMNS)]
    for metric, stats in summarise(rows).items():
        lines.append("\t".join([metric, format_tsv_value(stats["mean"]),
                                format_tsv_value(stats["median"]), str(stats["n"])]))
    return atomic_write_text(path, "\n".join(lines) + "\n")
