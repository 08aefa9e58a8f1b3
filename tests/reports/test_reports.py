"""The reports of a synthetic end-to-end run: every section there, every figure a valid image, every
number the same as in the TSV/JSON outputs, and a report failure never fails a run."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest

from bids_app.bids.tables import VERTEBRAL_LEVELS
from bids_app.reports.participant import METRIC_LABELS
from tests.conftest import participant_args
from tests.reports.conftest import SWEEP
from tests.reports.page import Page, as_float, read_page

PNG, GIFS = b"\x89PNG\r\n\x1a\n", (b"GIF87a", b"GIF89a")
STEMS = {"01": "sub-01_T2w", "05": "sub-05_T2w"}


def pages(out: Path) -> dict[str, Page]:
    return {name: read_page(out / f"{name}.html") for name in ("sub-01", "sub-05", "group", "index")}


def anat(out: Path, label: str) -> Path:
    return out / f"sub-{label}" / "anat"


def close(text: str, value: float) -> bool:
    """A number as the report shows it (4 significant digits) against the file's full value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return text == "n/a"
    return as_float(text) == pytest.approx(value, rel=1e-3, abs=1e-9)


def test_the_levels_write_the_reports(report_run: Path, tiny_model: Path) -> None:
    for name in ("sub-01.html", "sub-05.html", "group.html", "index.html"):
        assert (report_run / name).is_file(), name
    assert (tiny_model.parent / "group.html").is_file(), "the group level writes its report"
    assert "dataset-table" in read_page(tiny_model.parent / "group.html").tables


def test_participant_reports_have_every_section(report_run: Path) -> None:
    for label, stem in STEMS.items():
        page = read_page(report_run / f"sub-{label}.html")
        expected = {"summary", "about", f"image-{stem}", f"segmentation-{stem}", f"lesions-{stem}",
                    f"metrics-{stem}", f"views-{stem}", f"sweep-{stem}"}
        assert expected <= page.ids, expected - page.ids
        n_lesions = len((anat(report_run, label) / f"{stem}_lesions.tsv").read_text().splitlines()) - 1
        assert len(page.images) == 4 * (2 + min(n_lesions, 8)) + 2, \
            "4 layers of the sagittal, axial and lesion views, sweep animation and filmstrip"


def test_group_report_has_every_section(report_run: Path) -> None:
    page = read_page(report_run / "group.html")
    expected = {"dataset", "models", "training", "training-figures", "calibration", "false-positives",
                "evaluation", "participants", "dataset-table", "excluded-table", "components-table",
                "calibration-table", "false-positive-table", "evaluation-summary", "evaluation-images", "index-link"}
    assert expected <= page.ids, expected - page.ids
    names = [Path(src).name for src in page.images]
    assert {f"group_desc-{stage}_losses.png" for stage in ("vqgan", "diffusion", "adapter")} <= set(names)
    assert "group_desc-calibration_histogram.png" in names and "group_desc-evaluation_scatter.png" in names
    assert any(n.startswith("model_vqgan_reconstruction") for n in names), "training figures of the model dir"
    assert any(n.startswith("model_diffusion_sample") for n in names)


def test_no_part_of_any_report_failed(report_run: Path) -> None:
    for name, page in pages(report_run).items():
        assert not [n for n in page.notes if "could not be made" in n], name


def test_every_referenced_image_exists_and_is_valid(report_run: Path) -> None:
    from PIL import Image

    for name, page in pages(report_run).items():
        assert page.images, name
        for src in page.images:
            path = report_run / src
            assert path.is_file() and path.parent == report_run / "figures", (name, src)
            head = path.read_bytes()[:8]
            assert head == PNG or head[:6] in GIFS, (name, src, head)
            with Image.open(path) as image:
                image.verify()
            if head[:6] in GIFS:
                with Image.open(path) as image:
                    assert image.n_frames == len(SWEEP), "one frame per strength"


def test_reports_reference_nothing_on_the_network(report_run: Path) -> None:
    for name, page in pages(report_run).items():
        text = (report_run / f"{name}.html").read_text()
        assert not [u for u in page.urls if re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", u, re.I)], name
        assert not re.search(r"url\(|@import|<script[^>]*\ssrc=", text), name
        assert not {"link", "iframe", "object", "embed"} & page.tags, name
        assert ("script" in page.tags) == (name == "index"), "only the index has a script, inline"


def test_participant_numbers_match_the_outputs(report_run: Path, tiny_model: Path) -> None:
    card = json.loads((tiny_model / "model_card.json").read_text())
    for label, stem in STEMS.items():
        page = read_page(report_run / f"sub-{label}.html")
        folder = anat(report_run, label)
        evaluation = json.loads((folder / f"{stem}_evaluation.json").read_text())
        sidecar = json.loads((folder / f"sub-{label}_label-lesion_mask.json").read_text())
        lines = (folder / f"{stem}_lesions.tsv").read_text().splitlines()
        header, lesions = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), r.split("\t"))) for r in lines[1:]]
        summary = page.key_values(f"segmentation-table-{stem}")
        assert int(summary["lesion count"]) == len(lesions) == evaluation["n_lesions"]
        assert close(summary["total lesion volume (mm³)"], evaluation["lesion_volume_mm3"])
        assert close(summary["threshold (residual)"], sidecar["Threshold"])
        assert close(summary["threshold (anomaly score)"], sidecar.get("ProbsegThreshold"))
        assert summary["threshold origin"].startswith(sidecar["ThresholdSource"])
        assert summary["calibration"] == (f"{sidecar['CalibrationImages']} healthy held-out image(s): predicted "
                                          f"healthy image false-positive rate {100 * sidecar['CalibrationImageFPR']:g} %")
        grown = summary["lesions grown to (residual)"]
        assert close(grown.split()[0], sidecar["GrowThreshold"]) and grown.endswith(f"quantile {sidecar['GrowQuantile']})")
        assert int(summary["samples per strength"]) == sidecar["Samples"] == 1
        assert [as_float(s) for s in summary["noising strength(s)"].split(",")] == sidecar["Strengths"]
        assert close(summary["time taken (s)"], evaluation["seconds"])
        assert summary["model card version"] == card["version"]
        assert "the model this image was segmented with" in summary["model card"]
        if lesions:
            rows = page.rows(f"lesion-table-{stem}")
            assert len(rows) == len(lesions)
            for row, lesion in zip(rows, lesions):
                level = lesion.pop("vertebral_level", "n/a")
                assert row[-1] == VERTEBRAL_LEVELS.get(level, level), "SCT's level number shown by name (3: C3)"
                assert [close(cell, float(lesion[key])) for cell, key in zip(row, header)
                        if key != "vertebral_level"] == [True] * len(lesion)
        metrics = page.key_values(f"metrics-table-{stem}")
        shown = {key: label for key, label in METRIC_LABELS.items() if key in evaluation}
        assert set(metrics) == set(shown.values())
        for key, label_text in shown.items():
            value = evaluation[key]
            if isinstance(value, bool):
                assert metrics[label_text] == ("yes" if value else "no"), key
            else:
                assert close(metrics[label_text], value), key
    truth = read_page(report_run / "sub-05.html").key_values("metrics-table-sub-05_T2w")
    assert "Dice" in truth and "Dice" not in read_page(report_run / "sub-01.html").key_values("metrics-table-sub-01_T2w")


def test_group_numbers_match_the_outputs(report_run: Path, tiny_model: Path) -> None:
    page = read_page(report_run / "group.html")
    record = json.loads(next((report_run / "logs").glob("run_group_*.json")).read_text())
    split = json.loads((tiny_model / "split.json").read_text())
    dataset = page.key_values("dataset-table")
    assert int(dataset["participants found"]) == len({i["subject"] for i in record["inputs"]["images"]}) == 6
    assert dataset["used for training"] == ", ".join(split["train"])
    assert dataset["used for validation (held out, calibration)"] == ", ".join(split["validation"])
    assert page.rows("excluded-table") == [list(item) for item in sorted(record["training"]["excluded"].items())]
    assert page.key_values("model-table")["model card version"] == json.loads((tiny_model / "model_card.json").read_text())["version"]

    calibration = json.loads((tiny_model / "calibration.json").read_text())["summary"]
    table = page.key_values("calibration-table")
    assert close(table["threshold (residual)"], calibration["threshold"])
    assert close(table["quantile of healthy residuals"], calibration["quantile"])
    assert int(table["calibration images"]) == calibration["n_images"]
    assert int(table["calibration voxels"]) == calibration["n_voxels"]

    summary = [line.split("\t") for line in (report_run / "evaluation_summary.tsv").read_text().splitlines()[1:]]
    rows = page.rows("evaluation-summary")
    assert [r[0] for r in rows] == [s[0] for s in summary]
    for row, line in zip(rows, summary):
        if line[1] == "n/a":  # e.g. lesion precision with no predicted lesion: undefined, shown as such
            assert row[1:3] == ["n/a", "n/a"], (line[0], row)
            continue
        assert close(row[1], float(line[1])) and close(row[2], float(line[2])) and row[3] == line[3], line[0]
    lesion = json.loads((anat(report_run, "05") / "sub-05_T2w_evaluation.json").read_text())
    (image_row,) = page.rows("evaluation-images")
    assert image_row[0] == lesion["image"] and close(image_row[1], lesion["dice"])

    healthy = json.loads((anat(report_run, "01") / "sub-01_T2w_evaluation.json").read_text())
    fp = page.key_values("false-positive-table")
    assert int(fp["healthy images"]) == 1, "sub-01: no ground truth, selected as healthy; sub-05 has one"
    assert int(fp["with a false-positive lesion"]) == int(healthy["any_lesion"])
    assert close(fp["mean false-positive volume (mm³)"], healthy["fp_volume_mm3"])


def test_a_broken_figure_costs_only_that_figure(report_run: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """Also the reports-only entry point: rebuilds a page from the outputs alone."""
    from bids_app.reports import __main__ as reports_only
    from bids_app.reports import viewer

    out = tmp_path / "out"
    shutil.copytree(report_run, out)
    (out / "sub-05.html").unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("no axial today")

    monkeypatch.setattr(viewer, "build_views", broken)
    with caplog.at_level(logging.WARNING):
        assert reports_only.main([str(out), "--participant-label", "sub-05", "--no-group"]) == 0
    page = read_page(out / "sub-05.html")
    assert [n for n in page.notes if "no axial today" in n] and "no axial today" in caplog.text
    assert "segmentation-table-sub-05_T2w" in page.tables and len(page.images) == 2, "the sweep figures remain"
    assert (out / "index.html").stat().st_mtime_ns > (report_run / "index.html").stat().st_mtime_ns, \
        "the index is rebuilt with the participant pages"


def test_reports_only_builds_headless_in_a_fresh_process(report_run: Path, tmp_path: Path) -> None:
    """No display, and pyplot (with its global backend choice) is never imported."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    shutil.copytree(report_run, out)
    (out / "sub-01.html").unlink()
    (out / "group.html").unlink()
    untouched = (out / "sub-05.html").stat().st_mtime_ns
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    script = ("import sys; from bids_app.reports.__main__ import main; code = main(sys.argv[1:]); "
              "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, str(out), "--participant-label", "01"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("sub-01", "group"):
        page = read_page(out / f"{name}.html")
        assert page.images and not [n for n in page.notes if "could not be made" in n], name
    assert (out / "sub-05.html").stat().st_mtime_ns == untouched, "only the participants asked for"
    assert "WARNING" not in done.stderr, done.stderr


def test_a_failing_report_never_fails_the_run(simple_dataset: Path, tiny_model: Path, tmp_path: Path,
                                              monkeypatch, caplog) -> None:
    import bids_app.reports
    from bids_app import cli

    def broken(*args, **kwargs):
        raise RuntimeError("report machinery exploded")

    monkeypatch.setattr(bids_app.reports, "build_participant_reports", broken)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "02",
                         "--skip-bids-validation", *participant_args(tiny_model)])
    assert code == 0 and (anat(out, "02") / "sub-02_label-lesion_mask.nii.gz").is_file()
    assert "report(s) not built" in caplog.text and "report machinery exploded" in caplog.text
    assert not (out / "sub-02.html").exists()
