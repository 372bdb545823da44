"""`raymem report`: a static HTML page, opened in headless Chromium (Debian's), images loaded, not blank."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from raymem.cli import main

pytestmark = pytest.mark.ray

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip():
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("RAYMEM_REQUIRE_CHROMIUM") == "1":  # CI installs it: there, missing is a failure
        pytest.fail("chromium is required (RAYMEM_REQUIRE_CHROMIUM=1) but not installed")
    pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run does)")


def test_report_renders_with_images(two_scans, tmp_path, capsys):
    chromium = chromium_or_skip()
    root, _, b = two_scans
    assert main(["report", b.scan_id, "--output", str(root), "--out", str(tmp_path / "report"), "--top", "4"]) == 0
    page = tmp_path / "report" / "index.html"
    html = page.read_text()
    assert "Captain Mira" in html and "Top findings" in html and "<svg" in html and "background p95" in html
    assert "showing ME" in html and "ME and MU" in html  # co-occurrence beside the primary labels
    assert 'aria-label="render rate against training frequency"' in html and "render rate" in html
    assert html.count("<circle") == 6  # one point per entity of the demo world
    assert len(list((tmp_path / "report" / "images").glob("*.png"))) == 8  # 4 findings x (generated, training)
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title == "raymem report: images 8/8", title  # the page's own check: every <img> decoded
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # not a blank page


def test_report_of_unknown_scan(two_scans, tmp_path, capsys):
    root, _, _ = two_scans
    assert main(["report", "nope", "--output", str(root), "--out", str(tmp_path / "r")]) == 2
    assert "no scan 'nope'" in capsys.readouterr().err
