"""Plain HTML for the reports: one self-contained page with inline CSS, images by relative path.

No template engine, external script, web font or CDN: a report opens from a laptop, a cluster's
file browser or an archive years later, offline (the QC index's script is inline). Every value is
escaped here, so report code passes raw strings and numbers.
"""
from __future__ import annotations

import datetime as dt
import html
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from bids_app import __version__

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0; color: #1d2430; background: #f6f7f9; line-height: 1.4; }
header { background: #1d2430; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 1.35em; font-weight: 600; }
header p { margin: 4px 0 0; color: #b8c1cf; font-size: 0.85em; }
nav { position: sticky; top: 0; background: #2b3445; padding: 6px 24px; z-index: 3; display: flow-root; }
nav a { color: #dfe6f0; margin-right: 16px; font-size: 0.85em; text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { padding: 8px 24px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; margin: 16px 0; padding: 4px 18px 14px; }
section section { border: none; padding: 0; margin: 10px 0; }
h2 { font-size: 1.15em; border-bottom: 1px solid #e3e6ea; padding-bottom: 4px; }
h3 { font-size: 1.0em; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 6px 0; }
th, td { border: 1px solid #dde1e7; padding: 3px 9px; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; }
table.kv th { background: #f3f5f8; font-weight: 500; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td.num { text-align: left; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #cfd4db; background: #000; }
figure.chart img { background: #fff; }
figcaption { font-size: 0.8em; color: #566070; margin-top: 3px; max-width: 1100px; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.note { background: #fff7e0; border-left: 4px solid #e8b400; padding: 6px 10px; font-size: 0.85em; }
.muted { color: #6b7585; font-size: 0.85em; }
code { font-size: 0.9em; background: #f0f2f5; padding: 0 3px; border-radius: 3px; }
nav a.page { float: right; margin: 0 0 0 16px; font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.78em; margin: 0 6px 2px 0;
         background: #e3e8ef; color: #1d2430; white-space: nowrap; }
.badge.warn { background: #ffe3b3; } .badge.bad { background: #ffc9c9; } .badge.info { background: #d6e9ff; }
.viewer { display: inline-block; margin: 6px 0; vertical-align: top; }
.viewer-title { font-weight: 600; font-size: 0.9em; margin-bottom: 2px; }
.viewer > input { margin: 0 2px 0 6px; vertical-align: middle; }
.viewer > label { font-size: 0.8em; margin-right: 2px; cursor: pointer; }
.viewer > label.flick-label { margin-left: 2px; color: #7a3e00; }
.viewer .stack { display: grid; margin-top: 4px; background: #000; border: 1px solid #cfd4db; width: fit-content;
                 max-width: 100%; }
.viewer .stack > img { grid-area: 1 / 1; visibility: hidden; max-width: 100%; height: auto;
                       image-rendering: pixelated; }
.viewer > input.pick-original:checked ~ .stack > img.layer-original,
.viewer > input.pick-counterfactual:checked ~ .stack > img.layer-counterfactual,
.viewer > input.pick-score:checked ~ .stack > img.layer-score,
.viewer > input.pick-lesions:checked ~ .stack > img.layer-lesions { visibility: visible; }
.viewer > input.flick:checked ~ .stack > img.layer { visibility: hidden; }
.viewer > input.flick:checked ~ .stack > img.layer-original { animation: flick-first 1.2s steps(1, end) infinite; }
.viewer > input.flick:checked ~ .stack > img.layer-counterfactual {
  animation: flick-second 1.2s steps(1, end) infinite; }
@keyframes flick-first { 0% { visibility: visible; } 50% { visibility: hidden; } 100% { visibility: hidden; } }
@keyframes flick-second { 0% { visibility: hidden; } 50% { visibility: visible; } 100% { visibility: visible; } }
.viewer .caption { font-size: 0.78em; color: #566070; max-width: 620px; margin: 3px 0; }
.legend { font-size: 0.82em; }
.legend .swatch { display: inline-block; width: 14px; height: 9px; border: 2px solid; vertical-align: middle; }
.legend .colourbar { display: inline-block; width: 90px; height: 11px; vertical-align: middle;
                     border: 1px solid #999; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell: 4 significant digits for floats, yes/no for booleans, ``n/a`` for missing or NaN."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value) or "n/a"
    return str(value)


def number(text: str | None) -> float | int | None:
    """A TSV cell as a number (``n/a`` -> None), so that it is formatted like JSON values."""
    if text is None or text in ("", "n/a"):
        return None
    try:
        as_float = float(text)
    except ValueError:
        return None
    return int(as_float) if text.lstrip("-").isdigit() else as_float


def shown_path(path: Path | str | None, output_dir: Path, raw: Path | None = None) -> str | None:
    """A path as a page shows it: relative to the output dataset or the raw dataset when inside one,
    so that no page holds the output dir's absolute path (and it stays right when the folder moves)."""
    if path is None:
        return None
    for root, where in ((output_dir, "this output dataset"), (raw, "the raw dataset")):
        if root is None:
            continue
        try:
            relative = Path(path).resolve().relative_to(Path(root).resolve())
        except (ValueError, OSError):
            continue
        return f"{relative.as_posix() or '.'} (in {where})"
    return str(path)


def _cell(value: Any, tag: str = "td") -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    attribute = ' class="num"' if numeric else ""
    return f"<{tag}{attribute}>{esc(fmt(value))}</{tag}>"


def key_values(rows: Iterable[tuple[str, Any]], table_id: str) -> str:
    """A two-column table of labelled values."""
    body = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in rows)
    return f'<table class="kv" id="{esc(table_id)}"><tbody>{body}</tbody></table>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str) -> str:
    """A table with a header row; values are formatted with :func:`fmt`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(src: str, caption: str, alt: str, chart: bool = False) -> str:
    """An image by relative path (``figures/...``) with its caption."""
    kind = ' class="chart"' if chart else ""
    return (f'<figure{kind}><img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def badge(text: str, kind: str = "", title: str = "") -> str:
    """A short flag (``kind``: "", "info", "warn" or "bad"), with an optional tooltip."""
    tip = f' title="{esc(title)}"' if title else ""
    return f'<span class="badge {esc(kind)}"{tip}>{esc(text)}</span>'


def link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def paragraph(text: str, muted: bool = False) -> str:
    attribute = ' class="muted"' if muted else ""
    return f"<p{attribute}>{esc(text)}</p>"


def section(section_id: str, title: str, body: str, level: int = 2) -> str:
    return f'<section id="{esc(section_id)}"><h{level}>{esc(title)}</h{level}>{body}</section>'


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str],
         pages: Sequence[tuple[str, str]] = (), script: str = "", css: str = "") -> str:
    """The whole document; ``nav`` links (id, label) to the page's own sections, ``pages`` (file, label)
    to the other report pages; ``script`` and ``css`` are inlined (nothing is ever fetched)."""
    links = "".join(f'<a class="page" href="{esc(href)}">{esc(label)}</a>' for href, label in reversed(pages))
    links += "".join(f'<a href="#{esc(i)}">{esc(label)}</a>' for i, label in nav)
    made = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}{css}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)} &middot; counterseg {esc(__version__)} &middot; "
        f"built {esc(made)}</p></header>"
        f"<nav>{links}</nav><main>{''.join(sections)}</main>"
        + (f"<script>{script}</script>" if script else "") + "</body></html>\n"
    )


def guarded(build: Any, what: str) -> str:
    """The HTML ``build()`` returns, or a note when it fails: a broken figure or section costs that
    part of the page (and a warning in the log), never the report nor the run."""
    import logging

    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - reports never fail (fMRIPrep habit)
        logging.getLogger(__name__).warning("report: %s failed: %s: %s", what, type(exc).__name__, exc)
        return note(f"{what} could not be made: {type(exc).__name__}: {exc}")
