"""The participant QC report ``<output_dir>/sub-<label>.html``: every image of one participant.

Per image: what was found (lesion count, volumes, where), how (threshold and its origin, strengths,
steps, model), how well when a ground truth exists, and the figures a reader checks a segmentation
with by eye (sagittal and axial mosaics, the strength sweep). Built from the outputs on disk only.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_app.io import atomic_write_text
from bids_app.reports import figures, html
from bids_app.reports import outputs as out
from bids_app.reports.outputs import ImageOutputs

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"

#: Evaluation metrics shown, in this order, with the label a reader sees.
METRIC_LABELS = {
    "dice": "Dice",
    "auprc": "AUPRC (anomaly score vs ground truth)",
    "lesion_precision": "lesion-wise precision",
    "lesion_recall": "lesion-wise recall",
    "lesion_f1": "lesion-wise F1",
    "n_pred_lesions": "predicted lesions",
    "n_true_lesions": "true lesions",
    "pred_volume_mm3": "predicted volume (mm³)",
    "true_volume_mm3": "true volume (mm³)",
    "volume_error_mm3": "volume error (mm³)",
    "fp_volume_mm3": "false-positive volume (mm³)",
    "any_lesion": "any lesion found",
    "oracle_best_dice": "best Dice over thresholds (oracle)",
    "oracle_best_threshold": "oracle threshold (anomaly score)",
}
LESION_COLUMNS = {
    "index": "lesion", "volume_mm3": "volume (mm³)", "centroid_x_mm": "centroid x (mm)",
    "centroid_y_mm": "centroid y (mm)", "centroid_z_mm": "centroid z (mm)", "max_score": "max anomaly score",
    "mean_score": "mean anomaly score", "n_voxels": "voxels",
}
_THRESHOLD_ORIGINS = {
    "calibrated": "calibrated: a high quantile of healthy held-out residuals (group stage calibrate)",
    "user": "user: --threshold",
}


def build_participant_reports(output_dir: str | Path, labels: Sequence[str] | None = None,
                              run_record: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``sub-<label>.html`` for each label (default: every participant with outputs).

    ``run_record`` is the record of the run that is finishing (not on disk yet); older records in
    ``logs/`` fill in the rest (ground-truth and cord mask paths, the model directory). A
    participant whose report fails is logged and skipped.
    """
    output_dir = Path(output_dir)
    records = ([dict(run_record)] if run_record else []) + out.run_records(output_dir, "participant")
    wanted = [str(label).removeprefix("sub-") for label in labels] if labels is not None \
        else out.participant_labels(output_dir)
    written = []
    for label in wanted:
        try:
            path = build_participant_report(output_dir, label, records)
        except Exception as exc:  # noqa: BLE001 - one participant's report never stops the others
            log.warning("report for sub-%s failed: %s: %s", label, type(exc).__name__, exc)
            continue
        if path is not None:
            written.append(path)
    return written


def build_participant_report(output_dir: Path, label: str, records: Sequence[Mapping[str, Any]]) -> Path | None:
    """One participant's page; None when it has no finished image."""
    images = out.find_images(output_dir, label, records)
    if not images:
        log.info("sub-%s: no finished image, no report", label)
        return None
    model = model_card_info(out.model_dir(output_dir, records))
    sections = [_overview(output_dir, label, images)]
    sections += [_image_section(output_dir, image, model) for image in images]
    sections.append(_guide())
    nav = [("summary", "Summary"), *((f"image-{i.stem}", i.stem) for i in images), ("about", "How to read")]
    path = output_dir / f"sub-{label}.html"
    atomic_write_text(path, html.page(f"sub-{label}", "counterseg participant report", nav, sections))
    log.info("report: %s", path)
    return path


def model_card_info(model_dir: Path) -> dict[str, Any]:
    """Version, preset and checksum of the model card (a JSON file: no weights are read)."""
    path = Path(model_dir) / "model_card.json"
    card = out.read_json(path)
    if card is None:
        return {"path": path}
    return {"path": path, "version": card.get("version"), "preset": card.get("preset"),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _overview(output_dir: Path, label: str, images: Sequence[ImageOutputs]) -> str:
    rows = [(image.source, image.stem) for image in images]
    body = html.key_values([
        ("participant", f"sub-{label}"),
        ("images", len(images)),
        ("sessions", sorted({i.session for i in images if i.session}) or "none"),
        ("output folder", str(output_dir / f"sub-{label}")),
    ], "participant-summary")
    links = "".join(f'<li><a href="#image-{html.esc(stem)}">{html.esc(src)}</a></li>' for src, stem in rows)
    group = html.paragraph("Training, calibration and the evaluation over all participants: group.html.", muted=True) \
        if (output_dir / "group.html").is_file() else ""
    return html.section("summary", f"sub-{label}", body + f"<ul>{links}</ul>" + group)


def _image_section(output_dir: Path, image: ImageOutputs, model: Mapping[str, Any]) -> str:
    parts = [
        html.section(f"segmentation-{image.stem}", "Segmentation", html.guarded(
            lambda: html.key_values(summary_rows(image, model), f"segmentation-table-{image.stem}"),
            f"{image.stem}: summary table"), level=3),
        html.section(f"lesions-{image.stem}", "Lesions", html.guarded(lambda: _lesion_table(image),
                                                                      f"{image.stem}: lesion table"), level=3),
        html.section(f"metrics-{image.stem}", "Metrics", html.guarded(lambda: _metrics(image),
                                                                      f"{image.stem}: metrics"), level=3),
        html.guarded(lambda: _figures(output_dir, image), f"{image.stem}: figures"),
    ]
    return html.section(f"image-{image.stem}", image.source, "".join(parts))


def _calibration_text(sidecar: Mapping[str, Any]) -> str | None:
    """How the calibrated threshold was set, in words (None for outputs written before it was recorded)."""
    rule, n = sidecar.get("CalibrationRule"), sidecar.get("CalibrationImages")
    if rule is None:
        return None
    where = f"{n} healthy held-out image(s)"
    if rule == "voxels":
        return f"{where}: voxel quantile"
    fpr = sidecar.get("CalibrationImageFPR")
    if fpr is None:
        return f"{where}: none of them has a lesion"
    return f"{where}: predicted healthy image false-positive rate {100 * float(fpr):g} %"


def summary_rows(image: ImageOutputs, model: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The per-image table: what was found and how (labels are what the page shows)."""
    sidecar, evaluation, lesions = image.sidecar, image.evaluation, image.lesions
    total = evaluation.get("lesion_volume_mm3")
    if total is None:
        total = sum(html.number(r.get("volume_mm3")) or 0.0 for r in lesions)
    adapter = sidecar.get("AdapterUsed")
    return [
        ("lesion count", len(lesions)),
        ("total lesion volume (mm³)", total),
        ("threshold (residual)", sidecar.get("Threshold")),
        ("threshold origin", _THRESHOLD_ORIGINS.get(sidecar.get("ThresholdSource"), sidecar.get("ThresholdSource"))),
        ("calibration", _calibration_text(sidecar)),
        ("lesions grown to (residual)", (f"{html.fmt(sidecar['GrowThreshold'])} (healthy quantile "
                                         f"{html.fmt(sidecar.get('GrowQuantile'))})") if "GrowThreshold" in sidecar
         else "not grown"),
        ("noising strength(s)", sidecar.get("Strengths")),
        ("samples per strength", sidecar.get("Samples")),
        ("seed", sidecar.get("Seed")),
        ("adapter", f"used, scale {html.fmt(sidecar.get('AdapterScale'))}" if adapter else
         ("not used" if adapter is not None else None)),
        ("analysis region", sidecar.get("AnalysisRegion")),
        ("time taken (s)", evaluation.get("seconds")),
        ("model card version", model.get("version")),
        ("model preset", model.get("preset")),
        ("model card", _card_check(sidecar.get("ModelCardSHA256"), model)),
        ("cord mask", str(image.cord_mask) if image.cord_mask else "none (the whole body foreground was searched)"),
        ("ground truth", str(image.truth) if image.truth else "none"),
        ("original image", str(image.image) if image.image else "not reachable (figures drawn on the counterfactual)"),
    ]


def _card_check(used: str | None, model: Mapping[str, Any]) -> str:
    if not used:
        return "not recorded"
    if "sha256" not in model:
        return f"{model['path']} not found (used: sha256 {used[:12]}…)"
    if model["sha256"] == used:
        return f"{model['path']} (sha256 {used[:12]}…, the model this image was segmented with)"
    return f"{model['path']} differs from the one used (sha256 {used[:12]}…): the model changed since"


def _lesion_table(image: ImageOutputs) -> str:
    rows = image.lesions
    if not rows:
        return html.paragraph("No lesion above the threshold.")
    values = [[html.number(r.get(key)) for key in LESION_COLUMNS] for r in rows]
    caption = html.paragraph("Largest first. Centroids in scanner coordinates (mm, RAS+); scores are anomaly "
                             "scores in [0, 1] (the healthy quantile of the residual).", muted=True)
    return html.table(list(LESION_COLUMNS.values()), values, f"lesion-table-{image.stem}") + caption


def _metrics(image: ImageOutputs) -> str:
    evaluation = image.evaluation
    if not evaluation:
        return html.note("No evaluation file.")
    shown = [(label, evaluation[key]) for key, label in METRIC_LABELS.items() if key in evaluation]
    if "dice" in evaluation:
        text = "Against the ground-truth lesion mask."
    else:
        text = ("No ground-truth lesion mask: if this participant is healthy, every predicted voxel is a "
                "false positive.")
    return html.paragraph(text, muted=True) + html.key_values(shown, f"metrics-table-{image.stem}")


def _figures(output_dir: Path, image: ImageOutputs) -> str:
    from bids_app.reports.volumes import load_volumes

    volumes = load_volumes(image)
    folder = output_dir / FIGURES_DIR
    legend = ("Rows: the original; its healthy counterfactual (same grey window); the anomaly score in colour "
              "(from 0.5, the healthy median, to 1); lesions: the predicted mask's contour in yellow")
    if volumes.truth is not None:
        legend += ", the ground truth's in cyan, filled green where both agree (TP), red for false positives, blue for misses"
    blocks = []
    for view in ("sagittal", "axial"):
        def make(view: str = view) -> str:
            path = figures.mosaic(volumes, view, folder / f"{image.stem}_desc-{view}_mosaic.png")
            what = "slices across the cord" if view == "sagittal" else "slices along the cord, every lesion's largest one among them"
            return html.figure(_rel(path, output_dir), f"{view.capitalize()} {what}. {legend}.", f"{image.stem} {view}")

        blocks.append(html.guarded(make, f"{image.stem}: {view} mosaic"))
    body = html.section(f"mosaics-{image.stem}", "Mosaics", "".join(blocks), level=3)
    if image.sweep:
        body += html.section(f"sweep-{image.stem}", "Strength sweep", _sweep(output_dir, image, volumes), level=3)
    return body


def _sweep(output_dir: Path, image: ImageOutputs, volumes: Any) -> str:
    folder = output_dir / FIGURES_DIR
    strengths = ", ".join(f"{s:.2f}" for s, _, _ in image.sweep)

    def animation() -> str:
        path = figures.sweep_animation(volumes, image.sweep, folder / f"{image.stem}_desc-sweep_animation.gif")
        return html.figure(_rel(path, output_dir), f"Animated: one frame per noising strength ({strengths}).",
                           f"{image.stem} strength sweep animation") if path else html.note("no readable sweep output")

    def filmstrip() -> str:
        path = figures.sweep_filmstrip(volumes, image.sweep, folder / f"{image.stem}_desc-sweep_filmstrip.png")
        return html.figure(_rel(path, output_dir), "The same sweep as a still: too low a strength keeps the lesion "
                           "in the counterfactual, too high a one changes healthy anatomy too.",
                           f"{image.stem} strength sweep") if path else ""

    return ('<div class="row">' + html.guarded(animation, f"{image.stem}: sweep animation")
            + html.guarded(filmstrip, f"{image.stem}: sweep filmstrip") + "</div>")


def _rel(path: Path | None, output_dir: Path) -> str:
    assert path is not None
    return Path(path).relative_to(output_dir).as_posix()


def _guide() -> str:
    items = [
        "The counterfactual is the image as the healthy-trained model redraws it after noising it to the given "
        "strength; what it cannot redraw (a lesion) shows up in the residual |image − counterfactual|.",
        "The anomaly score maps the residual through the residuals of healthy held-out participants: 0.99 means "
        "higher than 99% of healthy cord voxels. It is not a probability to threshold at 0.5.",
        "The lesion mask is the residual above the threshold, inside the analysis region (the cord mask when "
        "there is one), with lesions smaller than the minimum volume removed.",
        "Mosaics are cropped to the cord mask's extent plus a margin, as in SCT's QC; slices are in the image's "
        "own voxels, reoriented to RAS for display.",
    ]
    body = "<ul>" + "".join(f"<li>{html.esc(item)}</li>" for item in items) + "</ul>"
    return html.section("about", "How to read this report", body)
