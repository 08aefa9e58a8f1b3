"""The QC index's inline script and style: selection, keys, sorting, ratings in localStorage, export.

Kept as text here (inlined into ``index.html``, nothing is fetched) so that the page opens offline
from any folder. Ratings are stored per index file (the key holds the page's path), as
``{image: {rating, note, rated_at}}``; the export lists every image of the table (unrated ones with
an empty rating) with the columns of :data:`EXPORT_COLUMNS`.
"""
from __future__ import annotations

import json

#: Columns of the exported TSV and keys of each exported JSON object, in this order.
EXPORT_COLUMNS = ("image", "participant_id", "session_id", "rating", "note", "rated_at")
RATINGS = ("pass", "fail", "artefact")
#: Keys of the index page -> what they do (the page's help line is made from this).
KEYS = {"↓ or j": "next image", "↑ or k": "previous image", "p": "pass", "f": "fail", "a": "artefact",
        "x": "clear the rating", "n": "write a note (Esc leaves it)", "space": "flick original / counterfactual",
        "1-4": "show a layer (original, counterfactual, score, outlines)"}
EXPORT_NAME = "counterseg_qc_ratings"

CSS = """
main { max-width: none; }
.qc { display: grid; grid-template-columns: max-content minmax(480px, 1fr); gap: 16px; align-items: start; }
.qc-list { position: sticky; top: 40px; max-height: calc(100vh - 56px); max-width: 55vw; overflow: auto; }
#qc-table { width: 100%; font-size: 0.8em; }
#qc-table th, #qc-table td { padding: 2px 5px; }
#qc-table th { cursor: pointer; user-select: none; white-space: nowrap; position: sticky; top: 0; }
#qc-table td:nth-child(-n+4) { white-space: nowrap; }
#qc-table .badge { white-space: normal; font-size: 0.9em; padding: 0 5px; }
#qc-table th[aria-sort="ascending"]::after { content: " \\25B2"; }
#qc-table th[aria-sort="descending"]::after { content: " \\25BC"; }
#qc-table tbody tr { cursor: pointer; }
#qc-table tbody tr:hover { background: #f1f5fb; }
#qc-table tbody tr.selected { background: #dbe8ff; outline: 2px solid #3d7dff; }
td.rating[data-value="pass"] { background: #d8f5dc; }
td.rating[data-value="fail"] { background: #ffd6d6; }
td.rating[data-value="artefact"] { background: #ffeab8; }
.rater { position: sticky; top: 40px; z-index: 2; background: #fff; border: 1px solid #dde1e7; border-radius: 6px;
         padding: 8px 12px; margin: 0 0 12px; }
.rater button { font-size: 0.9em; padding: 3px 10px; margin-right: 4px; cursor: pointer; }
.rater button[aria-pressed="true"] { font-weight: 700; outline: 2px solid #1d2430; }
.rater button.pass { background: #d8f5dc; } .rater button.fail { background: #ffd6d6; }
.rater button.artefact { background: #ffeab8; }
.rater textarea { width: 100%; box-sizing: border-box; height: 3.2em; margin-top: 6px; font: inherit; }
.rater .keys { font-size: 0.75em; color: #566070; margin: 4px 0 0; }
.preview h3 { margin-top: 4px; }
"""

_SCRIPT = """
(() => {
  "use strict";
  const STORE = "counterseg-qc:" + location.pathname;
  const COLUMNS = __COLUMNS__;
  const table = document.getElementById("qc-table");
  const body = table.tBodies[0];
  const note = document.getElementById("qc-note");
  const status = document.getElementById("qc-status");
  let ratings = {};
  try { ratings = JSON.parse(localStorage.getItem(STORE)) || {}; } catch (error) { ratings = {}; }
  let current = null;

  const rows = () => Array.from(body.rows);
  const save = () => {
    try { localStorage.setItem(STORE, JSON.stringify(ratings)); status.textContent = "saved in this browser"; }
    catch (error) { status.textContent = "not saved (" + error.name + "): export now"; }
    document.getElementById("qc-rated").textContent =
      rows().filter(r => (ratings[r.dataset.image] || {}).rating).length;
  };
  const paint = row => {
    const rating = (ratings[row.dataset.image] || {}).rating || "";
    const cell = row.querySelector("td.rating");
    cell.textContent = rating;
    cell.dataset.value = rating;
  };
  const showRating = () => {
    const entry = ratings[current.dataset.image] || {};
    document.querySelectorAll(".rater button[data-rating]").forEach(b =>
      b.setAttribute("aria-pressed", String(b.dataset.rating === entry.rating)));
    note.value = entry.note || "";
    document.getElementById("qc-current").textContent = current.dataset.image;
  };
  const select = (row, scroll) => {
    if (!row) return;
    if (current) {
      current.classList.remove("selected");
      current.setAttribute("aria-selected", "false");
      document.getElementById("preview-" + current.dataset.stem).hidden = true;
    }
    current = row;
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    const shown = document.getElementById("preview-" + row.dataset.stem);
    shown.hidden = false;
    shown.querySelectorAll("img[loading=lazy]").forEach(img => { img.loading = "eager"; });  // all of this one
    history.replaceState(null, "", "#" + row.dataset.stem);
    showRating();
    if (scroll) row.scrollIntoView({block: "nearest"});
  };
  const move = step => {
    const all = rows();
    const at = all.indexOf(current) + step;
    select(all[Math.min(Math.max(at, 0), all.length - 1)], true);
  };
  const update = change => {
    const image = current.dataset.image;
    const entry = Object.assign({}, ratings[image], change, {rated_at: new Date().toISOString()});
    if (!entry.rating) delete entry.rating;
    if (!entry.note) delete entry.note;
    if (entry.rating || entry.note) ratings[image] = entry; else delete ratings[image];
    save();
    paint(current);
    showRating();
  };
  const preview = () => document.getElementById("preview-" + current.dataset.stem);

  body.addEventListener("click", event => {
    const row = event.target.closest("tr");
    if (row && !event.target.closest("a")) select(row, false);
  });
  document.querySelectorAll(".rater button[data-rating]").forEach(button =>
    button.addEventListener("click", () => update({rating: button.dataset.rating || null})));
  note.addEventListener("input", () => update({note: note.value}));

  const cellValue = (row, column) => {
    const cell = row.cells[column];
    return cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
  };
  const sortBy = (header, direction) => {
    const column = header.cellIndex;
    const numeric = header.dataset.type === "number";
    const sign = direction === "ascending" ? 1 : -1;
    const keyed = rows().map(row => [cellValue(row, column), Number(row.dataset.order), row]);
    keyed.sort((a, b) => {
      if ((a[0] === "") !== (b[0] === "")) return a[0] === "" ? 1 : -1;  // n/a last either way
      const order = numeric ? Number(a[0]) - Number(b[0]) : a[0].localeCompare(b[0], undefined, {numeric: true});
      return sign * order || a[1] - b[1];
    });
    keyed.forEach(item => body.appendChild(item[2]));
    table.tHead.querySelectorAll("th").forEach(th => th.removeAttribute("aria-sort"));
    header.setAttribute("aria-sort", direction);
  };
  table.tHead.addEventListener("click", event => {
    const header = event.target.closest("th");
    if (!header) return;
    sortBy(header, header.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending");
    if (current) current.scrollIntoView({block: "nearest"});
  });

  document.addEventListener("keydown", event => {
    if (event.target.closest("textarea, input[type=text]")) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || !current) return;
    const layers = ["original", "counterfactual", "score", "lesions"];
    if (event.key === "ArrowDown" || event.key === "j") move(1);
    else if (event.key === "ArrowUp" || event.key === "k") move(-1);
    else if (event.key === "p") update({rating: "pass"});
    else if (event.key === "f") update({rating: "fail"});
    else if (event.key === "a") update({rating: "artefact"});
    else if (event.key === "x") update({rating: null});
    else if (event.key === "n") note.focus();
    else if (event.key === " ") {
      const boxes = preview().querySelectorAll("input.flick");
      const on = !Array.from(boxes).some(box => box.checked);
      boxes.forEach(box => { box.checked = on; });
    } else if (/^[1-4]$/.test(event.key)) {
      preview().querySelectorAll("input.pick-" + layers[Number(event.key) - 1]).forEach(i => { i.checked = true; });
      preview().querySelectorAll("input.flick").forEach(box => { box.checked = false; });
    } else return;
    event.preventDefault();
  });

  const exported = () => rows().slice().sort((a, b) => a.dataset.order - b.dataset.order).map(row => {
    const entry = ratings[row.dataset.image] || {};
    return {image: row.dataset.image, participant_id: row.dataset.participant,
            session_id: row.dataset.session || null, rating: entry.rating || null, note: entry.note || "",
            rated_at: entry.rated_at || null};
  });
  const download = (name, type, text) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], {type: type}));
    link.download = name;
    document.body.appendChild(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  };
  const tsvCell = value => value === null || value === "" ? "n/a" : String(value).replace(/[\\t\\r\\n]+/g, " ");
  document.getElementById("qc-export-json").addEventListener("click", () => download(
    "__NAME__.json", "application/json",
    JSON.stringify({exported_at: new Date().toISOString(), index: location.pathname.split("/").pop(),
                    ratings: exported()}, null, 1) + "\\n"));
  document.getElementById("qc-export-tsv").addEventListener("click", () => download(
    "__NAME__.tsv", "text/tab-separated-values",
    [COLUMNS.join("\\t")].concat(exported().map(r => COLUMNS.map(c => tsvCell(r[c])).join("\\t"))).join("\\n")
    + "\\n"));

  rows().forEach(paint);
  save();
  status.textContent = Object.keys(ratings).length ? "ratings restored from this browser" : "nothing rated yet";
  const wanted = location.hash ? document.getElementById("row-" + decodeURIComponent(location.hash.slice(1))) : null;
  select(wanted || rows()[0], true);
})();
"""

SCRIPT = _SCRIPT.replace("__COLUMNS__", json.dumps(list(EXPORT_COLUMNS))).replace("__NAME__", EXPORT_NAME)
