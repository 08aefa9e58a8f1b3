"""Where the browser tests find Chromium and Playwright, and where they leave screenshots for a person."""
from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
NO_CHROMIUM = "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"

#: Screenshots of the report pages, for a person to look at after the run (git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "reports"


def playwright_missing() -> str | None:
    """Why the interactive tests cannot run here (None: they can)."""
    if CHROMIUM is None:
        return NO_CHROMIUM
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-test.txt; it drives the system chromium)"
    return None
