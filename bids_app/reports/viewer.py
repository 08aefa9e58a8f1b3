"""The before/after views of one image: layer images in ``figures/``, a manifest of them, and their HTML.

Per image: a sagittal and an axial strip through the cord (every lesion's largest slice among the
slices shown) and, per predicted lesion, a crop around it (sagittal and axial through it, side by
side, at a readable size). Each view is drawn as layers of the same size (original, counterfactual,
anomaly score above the threshold, lesion outlines: ``render.LAYERS``) that the page stacks and
flicks between with CSS only (fMRIPrep's before/after, without script).

The manifest (``figures/<stem>_desc-qc_views.json``) lists the views with their layer files and the
threshold the score layer used, so that the QC index shows the same views without loading volumes.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_app.io import atomic_write_text
from bids_app.reports import html, render
from bids_app.reports import volumes as vol
from bids_app.reports.outputs import ImageOutputs
from bids_app.reports.png import write_png
from bids_app.reports.volumes import Lesion, Volumes

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
N_SAGITTAL, N_AXIAL = 3, 10
#: At most this many lesions get a crop of their own (largest first); the lesion table lists them all.
MAX_LESION_CROPS = 8
#: Margin around a lesion's bounding box in its crop, and the least field of view of a crop (mm).
LESION_MARGIN_MM, LESION_MIN_FIELD_MM = 8.0, 24.0
#: Target sizes in pixels: the sagittal strip's height and width, one axial slice, one side of a lesion crop.
SAGITTAL_PX, SAGITTAL_WIDTH_PX, AXIAL_PX, AXIAL_WIDTH_PX, LESION_PX = 640, 960, 150, 1200, 280
#: The score layer's threshold when the mask's sidecar has no ``ProbsegThreshold`` (outputs written before it).
FALLBACK_QUANTILE = 0.99


@dataclass(frozen=True)
class ScoreThreshold:
    """Where the score layer starts colouring, and how the page says so."""

    value: float
    source: str  # "ProbsegThreshold" or "stated quantile"
    text: str


@dataclass(frozen=True)
class Panel:
    """One view: its layer images (layer key -> figure path relative to the output dir) and size in pixels."""

    key: str
    title: str
    caption: str
    layers: dict[str, str]
    width: int
    height: int


@dataclass(frozen=True)
class Views:
    """What the manifest holds for one image."""

    image: str
    stem: str
    threshold: ScoreThreshold
    has_truth: bool
    panels: tuple[Panel, ...]


def score_threshold(sidecar: Mapping[str, Any]) -> ScoreThreshold:
    """The mask's threshold in anomaly-score units (``ProbsegThreshold``), else a stated healthy quantile."""
    value = sidecar.get("ProbsegThreshold")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        origin = "--threshold" if sidecar.get("ThresholdSource") == "user" else "calibrated"
        return ScoreThreshold(float(value), "ProbsegThreshold",
                              f"anomaly score > {value:.4g}, the lesion mask's {origin} threshold "
                              "(ProbsegThreshold in its sidecar)")
    return ScoreThreshold(FALLBACK_QUANTILE, "stated quantile",
                          f"anomaly score > {FALLBACK_QUANTILE:g}, a stated healthy quantile (the mask's sidecar "
                          "has no ProbsegThreshold: outputs of an older version)")


def manifest_path(output_dir: Path, stem: str) -> Path:
    return Path(output_dir) / FIGURES_DIR / f"{stem}_desc-qc_views.json"


def build_views(output_dir: Path, image: ImageOutputs, volumes: Volumes) -> Views:
    """Draw every view of one image into ``figures/`` and write its manifest."""
    output_dir = Path(output_dir)
    threshold = score_threshold(image.sidecar)
    window = vol.window(volumes.background)
    panels = [_overview(output_dir, image.stem, volumes, "sagittal", window, threshold.value),
              _overview(output_dir, image.stem, volumes, "axial", window, threshold.value)]
    lesions = vol.lesion_components(volumes)
    for lesion in lesions[:MAX_LESION_CROPS]:
        panels.append(_lesion_crop(output_dir, image.stem, volumes, lesion, window, threshold.value))
    views = Views(image.source, image.stem, threshold, volumes.truth is not None, tuple(panels))
    atomic_write_text(manifest_path(output_dir, image.stem), json.dumps(asdict(views), indent=1))
    return views


def read_views(output_dir: Path, stem: str) -> Views | None:
    """The manifest of one image (None when absent or unreadable: its report was not built)."""
    try:
        data = json.loads(manifest_path(output_dir, stem).read_text(encoding="utf-8"))
        return Views(data["image"], data["stem"], ScoreThreshold(**data["threshold"]), bool(data["has_truth"]),
                     tuple(Panel(**p) for p in data["panels"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no views of %s: %s", stem, exc)
        return None


def _cut(volumes: Volumes, view: str, index: int, box: tuple[slice, slice, slice] | None = None) -> render.Cut:
    """One displayed slice of every array (``box``: restrict to a crop first)."""
    take = vol.sagittal if view == "sagittal" else vol.axial
    box = box or (slice(None),) * 3
    shift = (box[0].start or 0) if view == "sagittal" else (box[2].start or 0)

    def cut(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else take(array[box], index - shift)

    return render.Cut(cut(volumes.background), cut(volumes.counterfactual), cut(volumes.anomaly),
                      cut(volumes.mask), cut(volumes.truth))


def _write_layers(output_dir: Path, name: str, drawn: Mapping[str, np.ndarray]) -> dict[str, str]:
    paths = {}
    for layer, pixels in drawn.items():
        path = write_png(output_dir / FIGURES_DIR / f"{name}_{layer}.png", pixels)
        paths[layer] = path.relative_to(output_dir).as_posix()
    return paths


def _overview(output_dir: Path, stem: str, volumes: Volumes, view: str, window: tuple[float, float],
              threshold: float) -> Panel:
    """A strip of slices through the cord: across it (sagittal) or along it (axial)."""
    axis = 0 if view == "sagittal" else 2
    low, high = vol.slice_range(volumes, axis)
    wanted = vol.lesion_slices(volumes.lesion_voxels, axis)
    indices = vol.choose_slices(low, high, N_SAGITTAL if view == "sagittal" else N_AXIAL, wanted)
    spacing = vol.pixel_spacing(volumes.zooms, view)
    cuts = [_cut(volumes, view, i) for i in indices]
    height_mm, width_mm = cuts[0].score.shape[0] * spacing[0], cuts[0].score.shape[1] * spacing[1]
    if view == "sagittal":
        ppm = min(SAGITTAL_PX / height_mm, SAGITTAL_WIDTH_PX / (width_mm * len(cuts)))
    else:
        ppm = min(AXIAL_PX / max(height_mm, width_mm), AXIAL_WIDTH_PX / (width_mm * len(cuts)))
    reps = render.repeats(spacing, ppm)
    per_slice = [render.layers(c, window, threshold, reps) for c in cuts]
    drawn = {layer: render.side_by_side([s[layer] for s in per_slice]) for layer in per_slice[0]}
    where = "left to right" if view == "sagittal" else "inferior to superior"
    lesion_note = " (every lesion's largest slice among them)" if wanted else ""
    caption = (f"{view.capitalize()} slices {', '.join(map(str, indices))} ({where}){lesion_note}; "
               f"cropped to the {volumes.crop_source} plus a margin; {_voxel_text(spacing, reps)}.")
    first = next(iter(drawn.values()))
    return Panel(view, f"{view} through the cord", caption, _write_layers(output_dir, f"{stem}_desc-{view}", drawn),
                 int(first.shape[1]), int(first.shape[0]))


def _lesion_crop(output_dir: Path, stem: str, volumes: Volumes, lesion: Lesion, window: tuple[float, float],
                 threshold: float) -> Panel:
    """Sagittal and axial slices through one lesion, cropped around it, side by side."""
    box = _crop_around(lesion, volumes.anomaly.shape, volumes.zooms)
    x, _, z = lesion.centre
    sagittal, axial = _cut(volumes, "sagittal", x, box), _cut(volumes, "axial", z, box)
    sag_mm, ax_mm = vol.pixel_spacing(volumes.zooms, "sagittal"), vol.pixel_spacing(volumes.zooms, "axial")
    extent = max(sagittal.score.shape[0] * sag_mm[0], sagittal.score.shape[1] * sag_mm[1],
                 axial.score.shape[0] * ax_mm[0], axial.score.shape[1] * ax_mm[1])
    ppm = LESION_PX / extent
    sag_reps, ax_reps = render.repeats(sag_mm, ppm), render.repeats(ax_mm, ppm)
    sag_layers, ax_layers = render.layers(sagittal, window, threshold, sag_reps), render.layers(axial, window,
                                                                                                 threshold, ax_reps)
    row = sagittal.score.shape[0] - 1 - (z - box[2].start)  # superior is up in the sagittal slice
    drawn = {layer: render.side_by_side([render.tick_marks(sag_layers[layer], row, sag_reps), ax_layers[layer]])
             for layer in sag_layers}
    voxel_mm3 = float(np.prod(volumes.zooms))
    caption = (f"Lesion {lesion.index}: {lesion.n_voxels} voxels ({lesion.n_voxels * voxel_mm3:.4g} mm³). "
               f"Left: sagittal slice {x}; right: axial slice {z} (marked by the white ticks); "
               f"{_voxel_text(sag_mm, sag_reps)}.")
    first = next(iter(drawn.values()))
    return Panel(f"lesion-{lesion.index}", f"lesion {lesion.index}", caption,
                 _write_layers(output_dir, f"{stem}_desc-lesion{lesion.index}", drawn),
                 int(first.shape[1]), int(first.shape[0]))


def _crop_around(lesion: Lesion, shape: Sequence[int], zooms: Sequence[float]) -> tuple[slice, slice, slice]:
    """The lesion's bounding box plus a margin, at least the least field of view, clipped to the arrays."""
    box = []
    for axis, part in enumerate(lesion.box):
        pad = int(math.ceil(LESION_MARGIN_MM / zooms[axis]))
        low, high = part.start - pad, part.stop + pad
        short = int(math.ceil(LESION_MIN_FIELD_MM / zooms[axis])) - (high - low)
        if short > 0:
            low, high = low - short // 2, high + short - short // 2
        box.append(slice(max(low, 0), min(high, int(shape[axis]))))
    return box[0], box[1], box[2]


def _voxel_text(spacing: Sequence[float], reps: Sequence[int]) -> str:
    return (f"one voxel ({spacing[0]:.3g} x {spacing[1]:.3g} mm) is {reps[0]} x {reps[1]} pixels, "
            "not interpolated")


# --------------------------------------------------------------------------- HTML


def panel_html(panel: Panel, uid: str, loading: str = "eager") -> str:
    """One view as a stack of layers with a radio button per layer and a flick toggle (CSS only)."""
    uid = html.esc(uid)
    controls, images = [], []
    for number, (layer, label) in enumerate(render.LAYERS):
        if layer not in panel.layers:
            continue
        checked = " checked" if not controls else ""
        controls.append(f'<input type="radio" class="pick pick-{layer}" name="{uid}" id="{uid}-{layer}"'
                        f'{checked}><label for="{uid}-{layer}" title="key {number + 1} on the QC index">'
                        f"{html.esc(label)}</label>")
        images.append(f'<img class="layer layer-{layer}" src="{html.esc(panel.layers[layer])}" '
                      f'width="{panel.width}" height="{panel.height}" alt="{html.esc(panel.title)}: '
                      f'{html.esc(label)}" loading="{loading}">')
    if "counterfactual" in panel.layers:
        controls.append(f'<input type="checkbox" class="flick" id="{uid}-flick"><label for="{uid}-flick" '
                        'class="flick-label">flick original / counterfactual</label>')
    return (f'<div class="viewer" id="{uid}" data-view="{html.esc(panel.key)}">'
            f'<div class="viewer-title">{html.esc(panel.title)}</div>{"".join(controls)}'
            f'<div class="stack">{"".join(images)}</div>'
            f'<p class="caption">{html.esc(panel.caption)}</p></div>')


def legend_html(views: Views) -> str:
    """What the colours mean, with the score colour bar and the threshold it starts at."""
    items = [f'<span class="swatch" style="border-color: rgb{render.PREDICTION_RGB}"></span> predicted lesion']
    if views.has_truth:
        items.append(f'<span class="swatch" style="border-color: rgb{render.TRUTH_RGB}"></span> ground truth')
    bar = (f'<span class="colourbar" style="background: {render.css_gradient()}"></span> '
           f"{html.esc(f'{views.threshold.value:.4g}')} … 1")
    return (f'<p class="legend">{" &nbsp; ".join(items)} &nbsp; anomaly score: {bar}. '
            f"Coloured: {html.esc(views.threshold.text)}; below it nothing is coloured.</p>")


def views_html(views: Views, uid_prefix: str, lazy: bool = False) -> str:
    """Legend, the two cord views, then the lesion crops."""
    overview = [p for p in views.panels if not p.key.startswith("lesion-")]
    crops = [p for p in views.panels if p.key.startswith("lesion-")]
    loading = "lazy" if lazy else "eager"
    body = legend_html(views) + '<div class="row">' + "".join(
        panel_html(p, f"{uid_prefix}-{p.key}", loading) for p in overview) + "</div>"
    if crops:
        body += (f'<h4>Predicted lesions (largest first, at most {MAX_LESION_CROPS})</h4><div class="row">'
                 + "".join(panel_html(p, f"{uid_prefix}-{p.key}", loading) for p in crops) + "</div>")
    else:
        body += html.paragraph("No predicted lesion: no lesion crop.", muted=True)
    return body
