"""The group report ``<output_dir>/group.html``: what the model was trained on, how training went,
how the threshold was calibrated, and how the segmentations score where a ground truth exists.

Sources: the group run record (selection, exclusions, stage summaries), the model directory's JSON
files and training figures (``split.json``, ``model_card.json``, ``calibration.json``, ``figures/``),
the loss logs in the model's checkpoint folder of the work dir (``<stage>/losses.jsonl``), and the participant outputs
(evaluation files and ``evaluation_summary.tsv``). No weights are read.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from bids_app.errors import CountersegError
from bids_app.io import atomic_write_bytes, atomic_write_text
from bids_app.reports import figures, html
from bids_app.reports import outputs as out
from bids_app.reports.index import INDEX_PAGE
from bids_app.reports.viewer import FIGURES_DIR
from bids_app.workspace import checkpoints_dir

log = logging.getLogger(__name__)

STAGE_ORDER = ("vqgan", "diffusion", "adapter")
_STEP_RE = re.compile(r"^(?P<kind>.+)_step-(?P<step>\d+)\.png$")
_EVALUATION_COLUMNS = {"image": "image", "dice": "Dice", "auprc": "AUPRC", "lesion_f1": "lesion F1",
                       "pred_volume_mm3": "predicted volume (mm³)", "true_volume_mm3": "true volume (mm³)",
                       "volume_error_mm3": "volume error (mm³)"}


def build_group_report(output_dir: str | Path, run_record: Mapping[str, Any] | None = None) -> Path:
    """Write ``group.html`` (each section independently: a failing one becomes a note).

    ``run_record`` is the record of a group run that is finishing (not on disk yet); otherwise the
    newest group record in ``logs/`` is used.
    """
    output_dir = Path(output_dir)
    records = out.run_records(output_dir, "group")
    records = [r for r in records if r.get("exit_code") == 0] or records  # a failed rerun says less
    record = dict(run_record) if run_record else (records[0] if records else {})
    context = _Context(output_dir, record)
    sections = [
        ("dataset", "Dataset", _dataset),
        ("models", "Models", _models),
        ("training", "Training curves", _training_curves),
        ("training-figures", "Training figures", _training_figures),
        ("calibration", "Calibration", _calibration),
        ("false-positives", "Healthy false positives", _false_positives),
        ("evaluation", "Evaluation", _evaluation),
    ]
    body = [html.section(key, title, html.guarded(lambda build=build: build(context), f"group report: {title}"))
            for key, title, build in sections]
    body.append(html.section("participants", "Participant reports", _participant_links(output_dir)))
    nav = [(key, title) for key, title, _ in sections] + [("participants", "Participants")]
    path = output_dir / "group.html"
    pages = [(INDEX_PAGE, "QC index")] if (output_dir / INDEX_PAGE).is_file() else []
    atomic_write_text(path, html.page("counterseg group report", f"output dataset {output_dir.name}", nav, body, pages))
    log.info("report: %s", path)
    return path


class _Context:
    """Paths and files the sections share, resolved once."""

    def __init__(self, output_dir: Path, record: Mapping[str, Any]) -> None:
        self.output_dir = output_dir
        self.record = record
        self.model_dir = out.setting_path(record, "model_dir") or output_dir / "models"
        self.work_dir = out.setting_path(record, "work_dir") or output_dir / "work"
        self.split = out.read_json(self.model_dir / "split.json") or \
            ((record.get("preprocessing") or {}).get("split") or {})
        self.card = out.read_json(self.model_dir / "model_card.json")
        self.evaluations = out.evaluations(output_dir)

    def figure_path(self, name: str) -> Path:
        return self.output_dir / FIGURES_DIR / name

    def show(self, path: Path) -> str:
        """A path as the page shows it (``html.shown_path``)."""
        return html.shown_path(path, self.output_dir) or ""

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.output_dir).as_posix()


def _dataset(context: _Context) -> str:
    record = context.record
    if not record:
        return html.note("No group run record in logs/: the group level did not run into this output directory.")
    images = (record.get("inputs") or {}).get("images") or []
    found = sorted({f"sub-{i['subject']}" for i in images if isinstance(i, Mapping) and "subject" in i})
    training = record.get("training") or {}
    excluded = training.get("excluded") or {}
    rows = [
        ("participants found", len(found)),
        ("images found", len(images)),
        ("selected as healthy", len(training.get("participants") or [])),
        ("used for training", context.split.get("train") or []),
        ("used for validation (held out, calibration)", context.split.get("validation") or []),
        ("excluded", len(excluded)),
        ("selection", _selection_rule(record)),
    ]
    body = html.key_values(rows, "dataset-table")
    if excluded:
        body += "<h3>Excluded participants</h3>" + html.table(
            ["participant", "reason"], sorted(excluded.items()), "excluded-table")
    return body


def _selection_rule(record: Mapping[str, Any]) -> str:
    selection = ((record.get("settings") or {}).get("selection") or {})
    if selection.get("train_participants"):
        return "--train-participants " + " ".join(selection["train_participants"])
    column, value = selection.get("healthy_column"), selection.get("healthy_value")
    return f"participants.tsv {column} = {value}, no lesion mask" if column else "n/a"


def _models(context: _Context) -> str:
    card = context.card
    if card is None:
        return html.note(f"No model card in {context.show(context.model_dir)}: training did not finish.")
    stages = context.record.get("models") or {}
    rows = [("model directory", context.show(context.model_dir)), ("model card version", card.get("version")),
            ("preset", card.get("preset")), ("latent scale", card.get("latent_scale"))]
    components = []
    for name, component in (card.get("components") or {}).items():
        metrics = component.get("final_metrics") or {}
        components.append([name, component.get("steps"), component.get("stopped_by"),
                           (stages.get(name) or {}).get("seconds"),
                           "; ".join(f"{k} {html.fmt(v)}" for k, v in metrics.items())])
    return html.key_values(rows, "model-table") + html.table(
        ["component", "steps", "stopped by", "seconds", "final metrics"], components, "components-table")


def _training_curves(context: _Context) -> str:
    folder = checkpoints_dir(context.work_dir, context.model_dir)
    logs = sorted(folder.glob("*/losses.jsonl"),
                  key=lambda p: (STAGE_ORDER.index(p.parent.name) if p.parent.name in STAGE_ORDER else 99, p))
    if not logs:
        return html.note(f"No loss logs in {context.show(folder)} (the work directory may have been "
                         "cleaned).")
    blocks = []
    for path in logs:
        stage = path.parent.name

        def make(stage: str = stage, path: Path = path) -> str:
            rows = out.read_jsonl(path)
            figure = figures.loss_curves(stage, rows, context.figure_path(f"group_desc-{stage}_losses.png"))
            if figure is None:
                return html.note(f"{stage}: the loss log has no values")
            caption = (f"{stage}: {len(rows)} logged steps. "
                       + ("perplexity and dead_codes show the codebook usage; val_* are on the validation "
                          "participants." if stage == "vqgan" else "Training loss per logged step."))
            return html.figure(context.rel(figure), caption, f"{stage} training curves", chart=True)

        blocks.append(html.guarded(make, f"{stage} training curves"))
    return "".join(blocks)


def _training_figures(context: _Context) -> str:
    """Validation reconstructions and unconditional samples: the first and the last of each kind."""
    folder = context.model_dir / "figures"
    kinds: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.glob("*.png"):
        match = _STEP_RE.match(path.name)
        if match:
            kinds.setdefault(match["kind"], []).append((int(match["step"]), path))
    if not kinds:
        return html.note(f"No training figures in {context.show(folder)}.")
    blocks = []
    for kind, items in sorted(kinds.items()):
        items.sort()
        chosen = items if len(items) <= 2 else [items[0], items[-1]]
        shown = "".join(html.figure(_reachable(context, path), f"{kind.replace('_', ' ')}, step {step} "
                                    f"(rows: {_figure_rows(kind)}; sagittal, coronal, axial mid-slices)",
                                    f"{kind} step {step}") for step, path in chosen)
        blocks.append(f"<h3>{html.esc(kind.replace('_', ' '))} ({len(items)} saved)</h3>"
                      f'<div class="row">{shown}</div>')
    return "".join(blocks)


def _figure_rows(kind: str) -> str:
    return ("validation image, its reconstruction" if "reconstruction" in kind
            else "a training image for reference, an unconditional sample")


def _reachable(context: _Context, path: Path) -> str:
    """A relative link when the figure lies inside the output dir, else a copy into figures/."""
    try:
        return Path(os.path.relpath(path.resolve(), context.output_dir.resolve())).as_posix() \
            if context.output_dir.resolve() in path.resolve().parents else _copy(context, path)
    except ValueError:
        return _copy(context, path)


def _copy(context: _Context, path: Path) -> str:
    target = context.figure_path(f"model_{path.name}")
    if not target.is_file() or target.stat().st_size != path.stat().st_size:
        atomic_write_bytes(target, path.read_bytes())
    return context.rel(target)


def _calibration(context: _Context) -> str:
    from bids_app.segmentation.calibration import CALIBRATION_FILE, read_calibration_file

    try:
        stored = read_calibration_file(context.model_dir / CALIBRATION_FILE)
    except CountersegError as exc:
        return html.note(f"No calibration to show ({exc}): run the group stage calibrate.")
    calibration, summary = stored.calibration, stored.summary
    above = float((calibration.reference > calibration.threshold).mean())
    rows = [
        ("threshold (residual)", calibration.threshold),
        ("quantile of healthy residuals", calibration.quantile),
        ("healthy voxels above the threshold (calibration set)", above),
        ("calibration images", calibration.n_images),
        ("calibration voxels", calibration.n_voxels),
        ("calibration participants", summary.get("participants") or []),
        ("reference values kept", int(calibration.reference.size)),
    ]
    figure = figures.calibration_histogram(calibration.reference, calibration.threshold, calibration.quantile,
                                           context.figure_path("group_desc-calibration_histogram.png"))
    caption = ("Residuals of the healthy held-out participants inside the analysis region, pooled; the lesion "
               "threshold sits at the given quantile, so that fraction of healthy voxels lies below it.")
    return html.key_values(rows, "calibration-table") + html.figure(
        context.rel(figure), caption, "calibration residual histogram", chart=True)


def healthy_images(context: _Context) -> list[tuple[dict[str, Any], str, bool]]:
    """Images without ground truth, each with its role and whether it counts as healthy: a participant
    the group level excluded (a patient without a lesion mask) is listed but not counted."""
    excluded = (context.record.get("training") or {}).get("excluded") or {}
    train, validation = set(context.split.get("train") or []), set(context.split.get("validation") or [])
    rows = []
    for evaluation in context.evaluations:
        if "dice" in evaluation:
            continue
        subject = evaluation["image"].split("/")[0]
        if subject in excluded:
            role, counted = f"excluded from training: {excluded[subject]}", False
        elif subject in train:
            role, counted = "training (seen in training: optimistic)", True
        elif subject in validation:
            role, counted = "validation (held out)", True
        else:
            role, counted = "not in the group run", True
        rows.append((evaluation, role, counted))
    return rows


def _false_positives(context: _Context) -> str:
    rows = healthy_images(context)
    if not rows:
        return html.note("No segmented image without ground truth yet: run the participant level on healthy "
                         "participants to measure the false-positive rate.")
    counted = [e for e, _, c in rows if c]
    with_fp = sum(bool(e.get("any_lesion")) for e in counted)
    mean_fp = sum(float(e.get("fp_volume_mm3") or 0.0) for e in counted) / len(counted) if counted else None
    summary = html.key_values([
        ("healthy images", len(counted)),
        ("with a false-positive lesion", with_fp),
        ("image-level false-positive rate", with_fp / len(counted) if counted else None),
        ("mean false-positive volume (mm³)", mean_fp),
    ], "false-positive-table")
    table = html.table(["image", "role", "any lesion", "false-positive volume (mm³)", "lesions"],
                       [[e["image"], role, e.get("any_lesion"), e.get("fp_volume_mm3"), e.get("n_lesions")]
                        for e, role, _ in rows], "false-positive-images")
    text = html.paragraph("Images without a ground-truth lesion mask; every predicted voxel of a healthy image is "
                          "a false positive. Rates count healthy participants only.", muted=True)
    return text + summary + table


def _evaluation(context: _Context) -> str:
    with_truth = [e for e in context.evaluations if "dice" in e]
    if not with_truth:
        return html.note("No participant output with a ground truth yet.")
    body = ""
    summary = out.read_tsv(context.output_dir / "evaluation_summary.tsv")
    if summary:
        body += "<h3>Summary (evaluation_summary.tsv)</h3>" + html.table(
            ["metric", "mean", "median", "n"],
            [[r.get("metric"), html.number(r.get("mean")), html.number(r.get("median")), html.number(r.get("n"))]
             for r in summary], "evaluation-summary")
    body += "<h3>Per image</h3>" + html.table(
        list(_EVALUATION_COLUMNS.values()), [[e.get(k) for k in _EVALUATION_COLUMNS] for e in with_truth],
        "evaluation-images")

    def scatter() -> str:
        figure = figures.dice_volume_scatter(with_truth, context.figure_path("group_desc-evaluation_scatter.png"))
        return html.figure(context.rel(figure), "Left: predicted against true lesion volume per image (dashed: "
                           "identity). Right: Dice against true lesion volume.", "Dice and volume scatter",
                           chart=True) if figure else ""

    return body + html.guarded(scatter, "Dice/volume scatter")


def _participant_links(output_dir: Path) -> str:
    index = (f'<p id="index-link">{html.link(INDEX_PAGE, "QC index")}: every image in one sortable table, with '
             "keyboard navigation and ratings to export.</p>") if (output_dir / INDEX_PAGE).is_file() else ""
    pages = sorted(p.name for p in output_dir.glob("sub-*.html"))
    if not pages:
        return index + html.paragraph("No participant report yet.", muted=True)
    return index + "<ul>" + "".join(f'<li><a href="{html.esc(p)}">{html.esc(p[:-5])}</a></li>' for p in pages) + "</ul>"

