"""The participant QC report ``<output_dir>/sub-<label>.html``: every image of one participant.

Per image: the views a reader checks a segmentation with by eye (sagittal and axial, a crop per
lesion, original and counterfactual to flick between: ``viewer``), what was found (lesion count,
volumes, where), how (threshold and its origin, strengths, model), how well when a ground truth
exists, and the strength sweep. Built from the outputs on disk only.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_app.io import atomic_write_text
from bids_app.reports import figures, flags, html, viewer
from bids_app.reports import outputs as out
from bids_app.reports.index import INDEX_PAGE, build_index
from bids_app.reports.outputs import ImageOutputs
from bids_app.reports.viewer import FIGURES_DIR

log = logging.getLogger(__name__)

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
    "mean_score": "mean anomaly score", "n_voxels": "voxels", "vertebral_level": "vertebral level",
}
_THRESHOLD_ORIGINS = {
    "calibrated": "calibrated: a high quantile of healthy held-out residuals (group stage calibrate)",
    "user": "user: --threshold",
}


def build_participant_reports(output_dir: str | Path, labels: Sequence[str] | None = None,
                              run_record: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``sub-<label>.html`` for each label (default: every participant with outputs), then the QC
    index ``index.html`` over every image of the output dir.

    ``run_record`` is the record of the run that is finishing (not on disk yet); older records in
    ``logs/`` fill in the rest (ground-truth and cord mask paths, the model directory). A
    participant whose report fails is logged and skipped; so is a failing index.
    """
    output_dir = Path(output_dir)
    records = ([dict(run_record)] if run_record else []) + out.run_records(output_dir, "participant")
    wanted = [str(label).removeprefix("sub-") for label in labels] if labels is not None \
        else out.participant_labels(output_dir)
    roles = flags.participant_roles(out.model_dir(output_dir, records))
    written = []
    for label in wanted:
        try:
            path = build_participant_report(output_dir, label, records, roles)
        except Exception as exc:  # noqa: BLE001 - one participant's report never stops the others
            log.warning("report for sub-%s failed: %s: %s", label, type(exc).__name__, exc)
            continue
        if path is not None:
            written.append(path)
    try:
        written.append(build_index(output_dir, records))
    except Exception as exc:  # noqa: BLE001 - the pages above stand without the index
        log.warning("QC index failed: %s: %s", type(exc).__name__, exc)
    return written


def build_participant_report(output_dir: Path, label: str, records: Sequence[Mapping[str, Any]],
                             roles: Mapping[str, flags.Flag] | None = None) -> Path | None:
    """One participant's page; None when it has no finished image."""
    images = out.find_images(output_dir, label, records)
    if not images:
        log.info("sub-%s: no finished image, no report", label)
        return None
    roles = roles if roles is not None else flags.participant_roles(out.model_dir(output_dir, records))
    model = model_card_info(out.model_dir(output_dir, records))
    places = Places(output_dir, out.raw_root(output_dir, records))
    sections = [_overview(output_dir, label, images, roles)]
    sections += [_image_section(places, image, model, roles) for image in images]
    sections.append(_guide())
    nav = [("summary", "Summary"), *((f"image-{i.stem}", i.stem) for i in images), ("about", "How to read")]
    pages = [(INDEX_PAGE, "QC index")] + ([("group.html", "group report")] if _has_group_report(output_dir) else [])
    path = output_dir / f"sub-{label}.html"
    atomic_write_text(path, html.page(f"sub-{label}", "counterseg participant report", nav, sections, pages))
    log.info("report: %s", path)
    return path


def _has_group_report(output_dir: Path) -> bool:
    """group.html is there, or will be: the levels build it right after these pages when the group level
    ever ran into this output dir."""
    return (output_dir / "group.html").is_file() or out.has_group_run(output_dir)


class Places:
    """Paths as this page shows them (``html.shown_path``): no page holds the output dir's absolute path."""

    def __init__(self, output_dir: Path, raw: Path | None) -> None:
        self.output_dir, self.raw = Path(output_dir), raw

    def show(self, path: Path | str | None) -> str | None:
        return html.shown_path(path, self.output_dir, self.raw)


def model_card_info(model_dir: Path) -> dict[str, Any]:
    """Version, preset and checksum of the model card (a JSON file: no weights are read)."""
    path = Path(model_dir) / "model_card.json"
    card = out.read_json(path)
    if card is None:
        return {"path": path}
    return {"path": path, "version": card.get("version"), "preset": card.get("preset"),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _overview(output_dir: Path, label: str, images: Sequence[ImageOutputs], roles: Mapping[str, flags.Flag]) -> str:
    role = roles.get(label)
    badges = html.badge(role.text, role.kind, role.meaning) + html.paragraph(role.meaning.capitalize() + ".") \
        if role else ""
    body = html.key_values([
        ("participant", f"sub-{label}"),
        ("images", len(images)),
        ("sessions", sorted({i.session for i in images if i.session}) or "none"),
        ("output folder", f"sub-{label}/ (in this output dataset)"),
    ], "participant-summary")
    links = "".join(f'<li><a href="#image-{html.esc(i.stem)}">{html.esc(i.source)}</a></li>' for i in images)
    pages = [html.link(f"{INDEX_PAGE}#{images[0].stem}", "QC index")
             + ": every image of the dataset, sortable, with keyboard navigation and ratings to export"]
    if _has_group_report(output_dir):
        pages.append(html.link("group.html", "Group report") + ": the training data, training curves, "
                     "the threshold's calibration and the evaluation over all participants")
    listing = "".join(f"<li>{item}</li>" for item in pages)
    return html.section("summary", f"sub-{label}", badges + body + f"<ul>{links}</ul>"
                        + f'<ul class="pages" id="page-links">{listing}</ul>')


def _image_section(places: Places, image: ImageOutputs, model: Mapping[str, Any],
                   roles: Mapping[str, flags.Flag]) -> str:
    marks = "".join(html.badge(f.text, f.kind, f.meaning) for f in flags.image_flags(image, roles))
    rate = html.link(f"{INDEX_PAGE}#{image.stem}", "rate this image in the QC index")
    parts = [
        f'<p class="flags" id="flags-{html.esc(image.stem)}">{marks} {rate}</p>',
        html.guarded(lambda: _figures(places.output_dir, image), f"{image.stem}: figures"),
        html.section(f"segmentation-{image.stem}", "Segmentation", html.guarded(
            lambda: html.key_values(summary_rows(image, model, places), f"segmentation-table-{image.stem}"),
            f"{image.stem}: summary table"), level=3),
        html.section(f"lesions-{image.stem}", "Lesions", html.guarded(lambda: _lesion_table(image),
                                                                      f"{image.stem}: lesion table"), level=3),
        html.section(f"metrics-{image.stem}", "Metrics", html.guarded(lambda: _metrics(image),
                                                                      f"{image.stem}: metrics"), level=3),
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


def summary_rows(image: ImageOutputs, model: Mapping[str, Any], places: Places) -> list[tuple[str, Any]]:
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
        ("threshold (anomaly score)", sidecar.get("ProbsegThreshold")),
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
        ("model card", _card_check(sidecar.get("ModelCardSHA256"), model, places)),
        ("cord mask", places.show(image.cord_mask) or "none (the whole body foreground was searched)"),
        ("ground truth", places.show(image.truth) or "none"),
        ("original image", places.show(image.image) or "not reachable (figures drawn on the counterfactual)"),
    ]


def _card_check(used: str | None, model: Mapping[str, Any], places: Places) -> str:
    if not used:
        return "not recorded"
    where = places.show(model["path"])
    if "sha256" not in model:
        return f"{where} not found (used: sha256 {used[:12]}…)"
    if model["sha256"] == used:
        return f"{where} (sha256 {used[:12]}…, the model this image was segmented with)"
    return f"{where} differs from the one used (sha256 {used[:12]}…): the model changed since"


def _lesion_table(image: ImageOutputs) -> str:
    rows = image.lesions
    if not rows:
        return html.paragraph("No lesion above the threshold.")
    values = [[_vertebral_level(r.get(key)) if key == "vertebral_level" else html.number(r.get(key))
               for key in LESION_COLUMNS] for r in rows]
    caption = html.paragraph("Largest first (lesion numbers as in the views). Centroids in scanner coordinates "
                             "(mm, RAS+); scores are anomaly scores in [0, 1] (the healthy quantile of the "
                             "residual); vertebral levels where disc labels were found.", muted=True)
    return html.table(list(LESION_COLUMNS.values()), values, f"lesion-table-{image.stem}") + caption


def _vertebral_level(value: str | None) -> str | None:
    """SCT's level number as its name (3 -> C3); None (shown n/a) where there is none."""
    from bids_app.bids.tables import VERTEBRAL_LEVELS

    return None if value in (None, "", "n/a") else VERTEBRAL_LEVELS.get(str(value), str(value))


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
    """The before/after views (and the strength sweep when there is one)."""
    from bids_app.reports.volumes import load_volumes

    volumes = load_volumes(image)
    views = html.guarded(lambda: viewer.views_html(viewer.build_views(output_dir, image, volumes), image.stem),
                         f"{image.stem}: views")
    intro = html.paragraph("Each view stacks layers of the same slices: pick one, or tick the flick box to "
                           "alternate the original and its healthy counterfactual (same grey window): what the "
                           "model removed is what it calls a lesion.", muted=True)
    body = html.section(f"views-{image.stem}", "Views", intro + views, level=3)
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
        "there is one), with lesions smaller than the minimum volume removed; the score layer colours exactly "
        "the voxels above that threshold.",
        "Views are cropped to the cord mask's extent plus a margin, as in SCT's QC; slices are in the image's "
        "own voxels (reoriented to RAS for display, never resampled): each voxel is a block of whole pixels.",
        "Flags: a training participant was seen in training, a calibration participant set the threshold; "
        "their results are optimistic.",
    ]
    body = "<ul>" + "".join(f"<li>{html.esc(item)}</li>" for item in items) + "</ul>"
    return html.section("about", "How to read this report", body)
