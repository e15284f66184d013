"""matrix.html in a real headless browser (Debian's Chromium): the interactive frontier chart renders offline with
every variant's point and the frontier's markers, and the page fits a 1400-px window. CI installs Chromium
(.ci/run) and sets QUANTPIPE_REQUIRE_BROWSER, so there a missing browser fails instead of skipping."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_select import FIGURES, FRONTIER, results  # the hand-built run with a known frontier

from quantpipe import report
from quantpipe.results import parse


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("QUANTPIPE_REQUIRE_BROWSER"):
        pytest.fail("Chromium is not installed, and QUANTPIPE_REQUIRE_BROWSER is set (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it")


def browse(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium headless, offline: no background networking, a fresh profile, scripts given 10 s of virtual
    time to render."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars", "--virtual-time-budget=10000", *args,
           page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_matrix_html_frontier_chart_renders_in_chromium(tmp_path: Path) -> None:
    report.write(tmp_path, parse(results()))
    page = tmp_path / "matrix.html"
    dom = browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'class="plot-container plotly"' in html, "plotly did not render the chart (scripts inlined, offline)"
    chart = html[html.index('id="frontier-chart"'):]
    assert chart.count('class="point"') == len(FIGURES)  # one marker per variant
    legend = re.findall(r'class="legendtext"[^>]*>([^<]*)<', chart)
    assert sorted(t.removesuffix(" ◆") for t in legend if t != "Pareto frontier") == sorted(FIGURES)
    assert {t.removesuffix(" ◆") for t in legend if t.endswith("◆")} == FRONTIER
    assert 'class="groups"' in html and "position:sticky" in html

    shot = tmp_path / "shot.png"
    p = browse(page, tmp_path, "--window-size=1400,1800", f"--screenshot={shot}")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    img = (mpimg.imread(shot)[..., :3] * 255).astype(int)
    assert img.shape[1] == 1400
    red = np.abs(img - np.array([214, 39, 40])).sum(axis=2) < 40  # the frontier's colour: line and diamonds
    assert red.sum() > 500, f"only {red.sum()} frontier-coloured pixels in the screenshot"
    grey = np.abs(img - np.array([127, 127, 127])).sum(axis=2) < 20  # the dominated points
    assert grey.sum() > 50
