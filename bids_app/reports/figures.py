"""QC figures drawn with matplotlib: the strength sweep of an image; group training figures.

(The per-image views, drawn voxel for voxel, are ``render`` and ``viewer``.)

Drawn on matplotlib ``Figure`` objects with the Agg canvas attached explicitly: pyplot (and with it
the global backend choice) is never imported, so figures build on a machine without a display and
never touch a user's interactive backend; the effect is that of ``matplotlib.use("Agg")`` without
the global state. Every figure is written atomically into ``<output_dir>/figures/``.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_app.io import atomic_write_bytes
from bids_app.reports import render
from bids_app.reports import volumes as vol
from bids_app.reports.volumes import Volumes

log = logging.getLogger(__name__)

DPI = 100
#: Lesion contours, in the colours of the views (``render``).
COLOURS = {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in (("prediction", render.PREDICTION_RGB),
                                                                        ("truth", render.TRUTH_RGB))}
RESIDUAL_CMAP = "magma"


def new_figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: Path) -> Path:
    """PNG bytes in memory, then one atomic write."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return atomic_write_bytes(Path(path), buffer.getvalue())


def _contour(ax: Any, mask: np.ndarray, colour: str) -> None:
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.9)


# --------------------------------------------------------------------------- strength sweep

Frame = tuple[float, np.ndarray, np.ndarray]  # strength, counterfactual slice, residual slice


def _sweep_layout(volumes: Volumes, sweep: Sequence[tuple[float, Path, Path]]):
    """Frames of a sweep and the sagittal geometry both sweep figures lay them out with (None: no frames)."""
    index, frames = sweep_frames(volumes, sweep)
    if not frames:
        return None
    row_mm, col_mm = vol.pixel_spacing(volumes.zooms, "sagittal")
    original = vol.sagittal(volumes.background, index)
    return index, frames, original, row_mm / col_mm, original.shape[1] * col_mm, original.shape[0] * row_mm


def sweep_frames(volumes: Volumes, sweep: Sequence[tuple[float, Path, Path]]) -> tuple[int, list[Frame]]:
    """The sagittal slice the sweep shows (the most lesioned one, else mid-cord) and, per strength,
    its counterfactual and residual, on the mosaics' crop."""
    lesions = volumes.lesion_voxels
    low, high = vol.slice_range(volumes, 0)
    index = int(np.argmax(lesions.sum(axis=(1, 2)))) if lesions.any() else (low + high) // 2
    frames = []
    for strength, cf_path, residual_path in sweep:
        cf = volumes.load_like(cf_path, "sweep counterfactual")
        residual = volumes.load_like(residual_path, "sweep residual")
        if cf is not None and residual is not None:
            frames.append((strength, vol.sagittal(cf, index), vol.sagittal(residual, index)))
    return index, frames


def _residual_max(frames: Sequence[Frame]) -> float:
    """One colour scale for every strength, so that frames compare (99.5th percentile of residuals)."""
    values = np.concatenate([f[2][f[2] > 0] for f in frames] or [np.zeros(1)])
    return float(np.percentile(values, 99.5)) if values.size > 1 else 1.0


def sweep_filmstrip(volumes: Volumes, sweep: Sequence[tuple[float, Path, Path]], path: Path) -> Path | None:
    """Original (with lesion contours) | counterfactual and residual at each strength: a still PNG."""
    layout = _sweep_layout(volumes, sweep)
    if layout is None:
        return None
    index, frames, original, aspect, width_mm, height_mm = layout
    columns = len(frames) + 1
    scale = min(11.0 / (width_mm * columns * 1.05), 4.0 / (height_mm * 2.2))
    figure = new_figure(max(width_mm * columns * 1.05 * scale, 6.0), height_mm * 2.2 * scale + 0.5)
    figure.patch.set_facecolor("black")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.12)
    axes = figure.subplots(2, columns, squeeze=False)
    grey, top = vol.window(volumes.background), _residual_max(frames)
    mask = vol.sagittal(volumes.mask, index)
    truth = vol.sagittal(volumes.truth, index) if volumes.truth is not None else None
    for row, title in ((0, "original"), (1, "lesions")):
        axes[row, 0].imshow(original, cmap="gray", vmin=grey[0], vmax=grey[1], aspect=aspect, interpolation="nearest")
        axes[row, 0].set_title(title, fontsize=8, color="white", pad=2)
    if truth is not None:
        _contour(axes[1, 0], truth, COLOURS["truth"])
    _contour(axes[1, 0], mask, COLOURS["prediction"])
    for column, (strength, cf, residual) in enumerate(frames, 1):
        axes[0, column].imshow(cf, cmap="gray", vmin=grey[0], vmax=grey[1], aspect=aspect, interpolation="nearest")
        axes[0, column].set_title(f"s = {strength:.2f}", fontsize=8, color="white", pad=2)
        axes[1, column].imshow(np.nan_to_num(residual), cmap=RESIDUAL_CMAP, vmin=0, vmax=top, aspect=aspect,
                               interpolation="nearest")
    for ax in axes.ravel():
        ax.set_axis_off()
    figure.suptitle(f"sagittal slice {index}: counterfactual (top), residual (bottom) per strength s",
                    fontsize=8, color="#bbbbbb")
    return save_figure(figure, path)


def sweep_animation(volumes: Volumes, sweep: Sequence[tuple[float, Path, Path]], path: Path,
                    frame_ms: int = 800) -> Path | None:
    """Animated GIF, one frame per strength: original | counterfactual | residual.

    One figure is drawn once and only its image data changes per frame, which keeps a 9-strength
    sweep well under a second."""
    from PIL import Image

    layout = _sweep_layout(volumes, sweep)
    if layout is None:
        return None
    index, frames, original, aspect, width_mm, height_mm = layout
    scale = min(7.5 / (width_mm * 3.15), 5.0 / height_mm)
    figure = new_figure(max(width_mm * 3.15 * scale, 3.0), height_mm * scale + 0.45)
    figure.patch.set_facecolor("black")
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.4 / figure.get_figheight(), bottom=0.01, wspace=0.05)
    axes = figure.subplots(1, 3, squeeze=False).ravel()
    grey, top = vol.window(volumes.background), _residual_max(frames)
    axes[0].imshow(original, cmap="gray", vmin=grey[0], vmax=grey[1], aspect=aspect, interpolation="nearest")
    cf_image = axes[1].imshow(frames[0][1], cmap="gray", vmin=grey[0], vmax=grey[1], aspect=aspect,
                              interpolation="nearest")
    residual_image = axes[2].imshow(np.nan_to_num(frames[0][2]), cmap=RESIDUAL_CMAP, vmin=0, vmax=top,
                                    aspect=aspect, interpolation="nearest")
    for ax, title in zip(axes, ("original", "counterfactual", "residual")):
        ax.set_title(title, fontsize=8, color="white", pad=2)
        ax.set_axis_off()
    label = figure.suptitle("", fontsize=9, color="white")
    images = []
    for strength, cf, residual in frames:
        cf_image.set_data(cf)
        residual_image.set_data(np.nan_to_num(residual))
        label.set_text(f"noising strength {strength:.2f}")
        figure.canvas.draw()
        rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3]
        images.append(Image.fromarray(rgb).quantize(colors=128, method=Image.Quantize.MEDIANCUT))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return atomic_write_bytes(Path(path), buffer.getvalue())


# --------------------------------------------------------------------------- group figures


def loss_curves(stage: str, rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One small plot per logged metric of a training stage (losses, codebook perplexity, ...)."""
    from matplotlib.ticker import MaxNLocator

    metrics: list[str] = []
    for row in rows:
        metrics.extend(k for k in row if k not in ("step", "time_s") and k not in metrics)
    series = {}
    for name in metrics:
        points = [(float(r["step"]), float(r[name])) for r in rows
                  if isinstance(r.get(name), (int, float)) and isinstance(r.get("step"), (int, float))
                  and math.isfinite(float(r[name]))]
        if points:
            series[name] = np.asarray(points)
    if not series:
        return None
    columns = min(4, len(series))
    lines = math.ceil(len(series) / columns)
    figure = new_figure(2.7 * columns, 2.0 * lines + 0.3)
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax, (name, points) in zip(axes, series.items()):
        ax.plot(points[:, 0], points[:, 1], marker="o" if len(points) < 30 else None, markersize=3, linewidth=1)
        values = points[:, 1]
        if values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_axis_off()
    figure.suptitle(f"{stage}: training metrics", fontsize=10)
    width, height = figure.get_figwidth(), figure.get_figheight()
    figure.subplots_adjust(left=0.55 / width, right=1 - 0.1 / width, top=1 - 0.5 / height, bottom=0.45 / height,
                           wspace=0.35, hspace=0.65)
    return save_figure(figure, path)


def calibration_histogram(reference: np.ndarray, threshold: float, quantile: float, path: Path) -> Path:
    """Healthy held-out residuals (the calibration reference) and the threshold set on them."""
    reference = np.asarray(reference, dtype=np.float64)
    figure = new_figure(7.0, 3.2)
    ax = figure.subplots()
    top = max(float(reference.max()) if reference.size else 0.0, threshold) * 1.05 or 1.0
    ax.hist(reference, bins=80, range=(0.0, top), color="#4a7fb5", log=True)
    above = float((reference > threshold).mean()) if reference.size else math.nan
    ax.axvline(threshold, color="#d62728", linewidth=1.5,
               label=f"threshold {threshold:.4g} (quantile {quantile:g}; {100 * above:.3g}% of healthy voxels above)")
    ax.set_xlabel("residual |image - counterfactual| inside the analysis region", fontsize=8)
    ax.set_ylabel("voxels (log)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"healthy calibration residuals ({reference.size} voxels)", fontsize=9)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.15)
    return save_figure(figure, path)


def dice_volume_scatter(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Predicted against true lesion volume, and Dice against true volume, one point per image."""
    points = [(str(r.get("image", "")), float(r["true_volume_mm3"]), float(r["pred_volume_mm3"]), float(r["dice"]))
              for r in rows if all(isinstance(r.get(k), (int, float)) for k in ("true_volume_mm3", "pred_volume_mm3", "dice"))]
    if not points:
        return None
    names = [Path(p[0]).name.split(".")[0] for p in points]
    true, pred, dice = (np.asarray([p[i] for p in points]) for i in (1, 2, 3))
    figure = new_figure(8.0, 3.4)
    left, right = figure.subplots(1, 2)
    limit = max(float(true.max()), float(pred.max()), 1.0) * 1.1
    left.plot([0, limit], [0, limit], color="grey", linewidth=0.8, linestyle="--", label="identity")
    left.scatter(true, pred, s=18, color="#1f77b4")
    left.set_xlim(0, limit)
    left.set_ylim(0, limit)
    left.set_xlabel("true lesion volume (mm³)", fontsize=8)
    left.set_ylabel("predicted lesion volume (mm³)", fontsize=8)
    left.legend(fontsize=7)
    right.scatter(true, dice, s=18, color="#2ca02c")
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("true lesion volume (mm³)", fontsize=8)
    right.set_ylabel("Dice", fontsize=8)
    if len(points) <= 20:
        for name, x, y1, y2 in zip(names, true, pred, dice):
            left.annotate(name, (x, y1), fontsize=6, xytext=(3, 3), textcoords="offset points")
            right.annotate(name, (x, y2), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{len(points)} image(s) with ground truth", fontsize=9)
    figure.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.15, wspace=0.28)
    return save_figure(figure, path)
