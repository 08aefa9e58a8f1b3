"""The QC pages used as a rater uses them, in headless Chromium (Playwright driving the system build):
rate, move with the keys, sort, export and read the exported files back; flick a view. Screenshots of
the index and of one participant page are left in ``test-artifacts/reports/`` for a person to look at.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bids_app.reports.qc_script import EXPORT_COLUMNS, EXPORT_NAME
from tests.reports.browser import ARTIFACTS

STEMS = ("sub-01_T2w", "sub-05_T2w")
IMAGES = {stem: f"{stem.split('_')[0]}/anat/{stem}.nii.gz" for stem in STEMS}


@pytest.fixture()
def page(browser, report_run: Path):
    """A fresh browser profile (empty localStorage) that records every request the page makes."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.requests = []
    tab.on("request", lambda request: tab.requests.append(request.url))
    yield tab
    assert [u for u in tab.requests if not u.startswith(("file:", "data:", "blob:"))] == [], "nothing from a network"
    context.close()


def selected(page) -> str:
    return page.eval_on_selector("#qc-table tbody tr.selected", "row => row.dataset.stem")


def visible_preview(page) -> list[str]:
    return page.eval_on_selector_all(".preview", "all => all.filter(p => !p.hidden).map(p => p.id)")


def download(page, button: str, folder: Path) -> Path:
    with page.expect_download() as info:
        page.click(button)
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


def test_the_index_rates_moves_with_the_keys_and_exports(page, report_run: Path, tmp_path: Path) -> None:
    page.goto((report_run / "index.html").as_uri())
    assert selected(page) == STEMS[0] and visible_preview(page) == [f"preview-{STEMS[0]}"]
    page.wait_for_function(f"() => Array.from(document.querySelectorAll('#ix-{STEMS[0]}-sagittal img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")  # lazy, loaded once shown

    page.click("#qc-rater button.fail")
    page.fill("#qc-note", "motion\tat C3")
    page.keyboard.press("Escape")  # leave the note: keys act on the page again
    page.keyboard.press("ArrowDown")
    assert selected(page) == STEMS[1] and visible_preview(page) == [f"preview-{STEMS[1]}"]
    assert page.evaluate("location.hash") == f"#{STEMS[1]}"
    assert page.input_value("#qc-note") == "", "the next image has its own (empty) note"
    page.keyboard.press("a")
    page.keyboard.press("k")
    assert selected(page) == STEMS[0]
    assert page.input_value("#qc-note") == "motion\tat C3"
    assert page.get_attribute("#qc-rater button.fail", "aria-pressed") == "true"
    assert page.inner_text("#qc-rated") == "2"

    exported = json.loads(download(page, "#qc-export-json", tmp_path).read_text())
    assert [r["image"] for r in exported["ratings"]] == [IMAGES[s] for s in STEMS]
    first, second = exported["ratings"]
    assert (first["rating"], first["note"], first["participant_id"], first["session_id"]) == \
        ("fail", "motion\tat C3", "sub-01", None)
    assert (second["rating"], second["note"]) == ("artefact", "")
    assert all(set(r) == set(EXPORT_COLUMNS) and r["rated_at"].endswith("Z") for r in exported["ratings"])

    table = download(page, "#qc-export-tsv", tmp_path)
    assert table.name == f"{EXPORT_NAME}.tsv"
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0]) == list(EXPORT_COLUMNS)
    assert [(r["image"], r["rating"], r["note"], r["session_id"]) for r in rows] == [
        (IMAGES[STEMS[0]], "fail", "motion at C3", "n/a"), (IMAGES[STEMS[1]], "artefact", "n/a", "n/a")]

    page.keyboard.press("x")  # clear sub-01's rating; its note stays
    page.reload()
    assert selected(page) == STEMS[0], "the page reopens where the rater was (#stem)"
    ratings = page.eval_on_selector_all("#qc-table td.rating", "cells => cells.map(c => c.textContent)")
    assert ratings == ["", "artefact"], "ratings are kept in the browser"
    assert page.input_value("#qc-note") == "motion\tat C3"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "index.png"), full_page=True)


def test_the_index_sorts_and_the_keys_follow_the_sorted_order(page, report_run: Path) -> None:
    page.goto((report_run / "index.html").as_uri())
    lesions = [int(v) for v in page.eval_on_selector_all(
        "#qc-table tbody td:nth-child(5)", "cells => cells.map(c => c.textContent)")]
    assert len(set(lesions)) > 1, "the fixture's images differ in lesion count"
    header = "#qc-table th[data-key=lesions]"
    for direction in ("ascending", "descending"):
        page.click(header)
        assert page.get_attribute(header, "aria-sort") == direction
        shown = [int(v) for v in page.eval_on_selector_all(
            "#qc-table tbody td:nth-child(5)", "cells => cells.map(c => c.textContent)")]
        assert shown == sorted(lesions, reverse=direction == "descending")
    order = page.eval_on_selector_all("#qc-table tbody tr", "rows => rows.map(r => r.dataset.stem)")
    page.click(f"#row-{order[0]} td:nth-child(2)")
    page.keyboard.press("j")
    assert selected(page) == order[1]


def layer_visibility(page, viewer: str) -> dict[str, str]:
    return page.eval_on_selector_all(f"#{viewer} img.layer", "imgs => Object.fromEntries(imgs.map("
                                     "i => [i.className.split('layer-')[1], getComputedStyle(i).visibility]))")


def test_a_view_flicks_between_the_original_and_the_counterfactual(page, report_run: Path) -> None:
    page.goto((report_run / "sub-05.html").as_uri())
    viewer = f"{STEMS[1]}-sagittal"
    assert layer_visibility(page, viewer) == {"original": "visible", "counterfactual": "hidden",
                                              "score": "hidden", "lesions": "hidden"}
    page.click(f"label[for={viewer}-score]")
    assert [k for k, v in layer_visibility(page, viewer).items() if v == "visible"] == ["score"]
    page.click(f"label[for={viewer}-flick]")
    shown = []
    for fraction in (0.25, 0.75):  # halfway through each half of the flick cycle
        page.evaluate("""([viewer, fraction]) => document.querySelectorAll(`#${viewer} img.layer`).forEach(img =>
            img.getAnimations().forEach(a => { a.pause();
                a.currentTime = fraction * a.effect.getComputedTiming().duration; }))""", [viewer, fraction])
        shown.append([k for k, v in layer_visibility(page, viewer).items() if v == "visible"])
    assert shown == [["original"], ["counterfactual"]]
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.click(f"label[for={viewer}-flick]")
    page.screenshot(path=str(ARTIFACTS / "sub-05.png"), full_page=True)
