"""Each report page in headless Chromium: every image loads and nothing is fetched from the network.

A probe copy of each page (same folder, so relative links resolve as in the report) gets a Content
Security Policy that allows only ``file:`` and ``data:`` resources and records every violation, and a
script that, once the page has loaded, writes each image's ``naturalWidth`` and every fetched
resource into the DOM; ``--dump-dom`` hands that DOM back. A network request would show up as a
violation (and a non-file resource), a missing or broken image as ``naturalWidth == 0``.
"""
from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.reports.browser import CHROMIUM, NO_CHROMIUM
from tests.reports.page import read_page

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--virtual-time-budget=10000", "--dump-dom"]

POLICY = ("default-src 'none'; img-src file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
HEAD = f"""<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<script>window.__violations = [];
document.addEventListener("securitypolicyviolation", e => window.__violations.push(e.blockedURI + " " + e.violatedDirective));
</script>"""
TAIL = """<script>
window.addEventListener("load", () => {
  const result = {
    images: Array.from(document.images, i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
    resources: performance.getEntriesByType("resource").map(r => r.name),
    violations: window.__violations,
  };
  const out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = btoa(JSON.stringify(result));
  document.body.appendChild(out);
});
</script>"""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


def probe(page: Path, profile: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    text = text.replace("<head>", "<head>" + HEAD, 1).replace("</body>", TAIL + "</body>", 1)
    text = text.replace('loading="lazy"', 'loading="eager"')  # the index's hidden previews: load them all
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(text, encoding="utf-8")
    try:
        done = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", copy.as_uri()],
                              capture_output=True, text=True, timeout=120)
    finally:
        copy.unlink()
    match = re.search(r'<pre id="probe-result">([A-Za-z0-9+/=]+)</pre>', done.stdout)
    assert match, f"no probe result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(base64.b64decode(match[1]))


@pytest.mark.parametrize("name", ["sub-01", "sub-05", "group", "index"])
def test_report_loads_offline_in_chromium(report_run: Path, tmp_path: Path, name: str) -> None:
    page = report_run / f"{name}.html"
    result = probe(page, tmp_path / "profile")
    expected = read_page(page).images
    assert [i["src"] for i in result["images"]] == expected and expected
    broken = [i for i in result["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, broken
    assert result["violations"] == []
    assert [r for r in result["resources"] if not r.startswith("file://")] == []


def test_the_probe_sees_a_network_fetch_and_a_broken_image(tmp_path: Path) -> None:
    """The checks above can fail: a remote image is a violation, a missing file has no width."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><style>p { background: url("https://example.invalid/b.png"); }'
                    '</style></head><body><p>x</p><img src="http://example.invalid/a.png"><img src="missing.png">'
                    '</body></html>')
    result = probe(page, tmp_path / "profile")
    assert [i["width"] for i in result["images"]] == [0, 0]
    assert any("example.invalid/a.png" in v for v in result["violations"]), result
