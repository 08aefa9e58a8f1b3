"""The QC index ``<output_dir>/index.html``: every image of the output dataset in one sortable table,
the selected image's views beside it, and ratings a rater saves in the browser and exports (SCT QC).

One row per finished image (and per image the newest participant run failed on): participant,
session, image, lesions, volume, highest lesion score and flags. The views are the participant
pages' own layer images, listed by each image's manifest (``viewer.read_views``), so that the index
is rebuilt from files on disk without loading a volume. Keys, ratings and export: ``qc_script``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bids_app.bids.layout import name_parts
from bids_app.io import atomic_write_text
from bids_app.reports import flags, html, qc_script, viewer
from bids_app.reports import outputs as out
from bids_app.reports.flags import Flag
from bids_app.reports.outputs import ImageOutputs

log = logging.getLogger(__name__)

INDEX_PAGE = "index.html"
#: Table columns: (key, header, type for sorting).
COLUMNS = (("order", "#", "number"), ("participant", "participant", "text"), ("session", "session", "text"),
           ("image", "image", "text"), ("lesions", "lesions", "number"), ("volume", "volume mm³", "number"),
           ("max_score", "max score", "number"), ("flags", "flags", "text"), ("rating", "rating", "text"))


@dataclass
class Row:
    """One image as the index lists it."""

    image: str  # raw relpath
    stem: str
    subject: str
    session: str | None
    lesions: int | None = None
    volume: float | None = None
    max_score: float | None = None
    flags: list[Flag] = field(default_factory=list)
    failure: Mapping[str, Any] | None = None
    page: str | None = None  # the participant page's anchor


def index_rows(output_dir: Path, records: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Every finished image of the output dir, then every failed one, by participant, session and image."""
    roles = flags.participant_roles(out.model_dir(output_dir, records))
    rows = []
    for label in out.participant_labels(output_dir):
        rows += [_finished(output_dir, image, roles) for image in out.find_images(output_dir, label, records)]
    finished = {row.image for row in rows}
    for failure in flags.failed_images(records, finished):
        parts = Path(failure["image"]).parts
        subject = parts[0].removeprefix("sub-")
        session = parts[1].removeprefix("ses-") if len(parts) > 3 and parts[1].startswith("ses-") else None
        stem = name_parts(Path(failure["image"]).name)[0]
        row_flags = ([roles[subject]] if subject in roles else []) + [flags.FAILED]
        rows.append(Row(failure["image"], stem, subject, session, flags=row_flags, failure=failure))
    return sorted(rows, key=lambda r: (r.subject, r.session or "", r.image))


def _finished(output_dir: Path, image: ImageOutputs, roles: Mapping[str, Flag]) -> Row:
    lesions = image.lesions
    scores = [html.number(r.get("max_score")) for r in lesions]
    evaluation = image.evaluation
    volume = evaluation.get("lesion_volume_mm3")
    if volume is None:
        volume = sum(html.number(r.get("volume_mm3")) or 0.0 for r in lesions)
    page = f"sub-{image.subject}.html#image-{image.stem}"
    return Row(image.source, image.stem, image.subject, image.session, len(lesions), float(volume),
               max((s for s in scores if s is not None), default=None), flags.image_flags(image, roles), None,
               page if (output_dir / f"sub-{image.subject}.html").is_file() else None)


def build_index(output_dir: str | Path, records: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write ``index.html`` over every image of the output dir."""
    output_dir = Path(output_dir)
    records = list(records) or out.run_records(output_dir, "participant")
    rows = index_rows(output_dir, records)
    failed = sum(r.failure is not None for r in rows)
    with_lesions = sum(bool(r.lesions) for r in rows)
    summary = (f'<p class="muted">{len(rows)} image(s), {with_lesions} with a predicted lesion, {failed} failed; '
               f'<span id="qc-rated">0</span> rated.</p>')
    listing = f'<div class="qc-list">{summary}{_table(rows)}</div>'
    previews = "".join(_preview(output_dir, row) for row in rows) or html.note("No image in this output dataset yet.")
    body = f'<div class="qc">{listing}<div class="qc-view">{_rater()}{previews}</div></div>'
    pages = [("group.html", "group report")] if (output_dir / "group.html").is_file() else []
    path = output_dir / INDEX_PAGE
    document = html.page("counterseg QC index", "rate every image; ratings stay in this browser until exported",
                         [], [html.section("qc", "Images", body)], pages,
                         script=qc_script.SCRIPT if rows else "", css=qc_script.CSS)
    atomic_write_text(path, document)
    log.info("QC index: %s (%d image(s))", path, len(rows))
    return path


def _cell(value: Any, sort_value: Any = None, cls: str = "") -> str:
    sort = "" if sort_value is None else str(sort_value)
    attribute = f' class="{cls}"' if cls else ""
    return f'<td{attribute} data-value="{html.esc(sort)}">{html.esc(html.fmt(value))}</td>'


def _table(rows: Sequence[Row]) -> str:
    head = "".join(f'<th data-type="{kind}" data-key="{key}" title="sort by {html.esc(label)}">{html.esc(label)}</th>'
                   for key, label, kind in COLUMNS)
    lines = []
    for order, row in enumerate(rows, 1):
        badges = "".join(html.badge(f.text, f.kind, f.meaning) for f in row.flags)
        name = html.link(row.page, row.stem) if row.page else html.esc(row.stem)
        cells = [
            _cell(order, order, "num"), _cell(f"sub-{row.subject}", row.subject),
            _cell(f"ses-{row.session}" if row.session else None, row.session or ""),
            f'<td data-value="{html.esc(row.image)}">{name}</td>',
            _cell(row.lesions, row.lesions, "num"), _cell(row.volume, row.volume, "num"),
            _cell(row.max_score, row.max_score, "num"),
            f'<td data-value="{html.esc(" ".join(f.text for f in row.flags))}">{badges}</td>',
            '<td class="rating" data-value=""></td>',
        ]
        lines.append(f'<tr id="row-{html.esc(row.stem)}" data-order="{order}" data-stem="{html.esc(row.stem)}" '
                     f'data-image="{html.esc(row.image)}" data-participant="sub-{html.esc(row.subject)}" '
                     f'data-session="{html.esc("ses-" + row.session if row.session else "")}" '
                     f'aria-selected="false">{"".join(cells)}</tr>')
    return f'<table id="qc-table"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _rater() -> str:
    buttons = "".join(f'<button type="button" class="{r}" data-rating="{r}" aria-pressed="false" '
                      f'title="key {r[0]}">{r} ({r[0]})</button>' for r in qc_script.RATINGS)
    buttons += '<button type="button" data-rating="" title="key x">clear (x)</button>'
    keys = "; ".join(f"<b>{html.esc(k)}</b> {html.esc(v)}" for k, v in qc_script.KEYS.items())
    return (f'<div class="rater" id="qc-rater"><div><b id="qc-current"></b></div>{buttons}'
            '<textarea id="qc-note" placeholder="note (n): what is wrong, where" aria-label="note"></textarea>'
            '<div><button type="button" id="qc-export-json">export JSON</button>'
            '<button type="button" id="qc-export-tsv">export TSV</button> '
            '<span class="muted" id="qc-status"></span></div>'
            f'<p class="keys">{keys}</p></div>')


def _preview(output_dir: Path, row: Row) -> str:
    """The selected image's pane: its flags, numbers and views (hidden until selected)."""
    badges = "".join(html.badge(f.text, f.kind, f.meaning) for f in row.flags)
    head = f"<h3>{html.esc(row.image)}</h3><p>{badges}"
    if row.page:
        head += " " + html.link(row.page, "participant page (tables, metrics, sweep)")
    head += "</p>"
    if row.failure is not None:
        report = row.failure.get("crash_report")
        body = html.note(f"Failed (exit {row.failure.get('exit_code')}): {row.failure.get('error')}")
        if report:
            body += html.paragraph(f"Crash report: logs/{Path(str(report)).name}", muted=True)
    else:
        numbers = html.paragraph(f"{html.fmt(row.lesions)} lesion(s), {html.fmt(row.volume)} mm³, highest lesion "
                                 f"score {html.fmt(row.max_score)}.")
        views = viewer.read_views(output_dir, row.stem)
        body = numbers + (viewer.views_html(views, f"ix-{row.stem}", lazy=True) if views is not None else
                          html.note("No views: the participant report of this image was not built."))
    return f'<div class="preview" id="preview-{html.esc(row.stem)}" hidden>{head}{body}</div>'
