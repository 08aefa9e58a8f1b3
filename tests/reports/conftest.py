"""One participant run (a healthy and a lesion participant, with a strength sweep) whose reports the
report tests read; the group run record comes from the tiny model's own group run."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import LESION_THRESHOLD, participant_args

SWEEP = (0.3, 0.6)


@pytest.fixture(scope="package")
def report_run(simple_dataset: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output dir of ``participant`` on sub-01 (healthy) and sub-05 (lesions, ground truth), which
    also holds the group run record of the tiny model: the run builds both kinds of report."""
    from bids_app import cli

    out = tmp_path_factory.mktemp("reports") / "out"
    (out / "logs").mkdir(parents=True)
    for record in (tiny_model.parent / "logs").glob("run_group_*.json"):
        shutil.copy2(record, out / "logs" / record.name)
    sweep = f"{SWEEP[0]}:{SWEEP[-1]}:{SWEEP[1] - SWEEP[0]:.2f}"
    code = cli.main([str(simple_dataset), str(out), "participant", "--participant-label", "01", "05",
                     "--strength-sweep", sweep, "--skip-bids-validation", "--threshold", str(LESION_THRESHOLD),
                     *participant_args(tiny_model)])
    assert code == 0
    return out


@pytest.fixture(scope="package")
def browser():
    """Playwright's Chromium, the system's own build (nothing is downloaded); skips without either."""
    from tests.reports.browser import CHROMIUM, playwright_missing

    reason = playwright_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


_STARTED = time.time()


def pytest_terminal_summary(terminalreporter) -> None:
    """Say where the report screenshots of this run are (those it wrote)."""
    from tests.reports.browser import ARTIFACTS

    shots = sorted(p for p in ARTIFACTS.glob("*.png") if p.stat().st_mtime >= _STARTED) if ARTIFACTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"report screenshots for a person to look at: {ARTIFACTS} "
                                    f"({', '.join(p.name for p in shots)})")
