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


def dump_dom(chromium: str, page, fragment: str, profile) -> str:
    url = page.as_uri() + fragment
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_report_renders_with_images(two_scans, tmp_path, capsys):
    chromium = chromium_or_skip()
    root, _, b = two_scans
    assert main(["report", b.scan_id, "--output", str(root), "--out", str(tmp_path / "report"), "--top", "4"]) == 0
    page = tmp_path / "report" / "index.html"
    html = page.read_text()
    assert f"<title>raymem report · {b.scan_id}</title>" in html  # the scan id in the title
    assert "a portrait of Captain Mira" in html  # the prompt's text, labelled as such
    assert '<span class="k">caption</span>' in html and '<span class="k">training</span>' in html
    assert 'id="findings-MU"' in html and 'id="findings-ME"' in html and 'id="findings-MI"' in html
    # Every stored neighbour of a finding is shown (the tiny world's join.k is 12), not only the first.
    first = html[html.index('class="finding"') : html.index('class="finding"', html.index('class="finding"') + 1)]
    assert first.count("<figure") == 1 + 12
    assert 'aria-label="labels per entity"' in html and 'aria-label="replication scores"' in html
    assert 'aria-label="background"' in html  # the train-train distribution is drawn, not one line
    assert ">0.5</text>" in html and ">images</text>" in html  # both axes have ticks and a title
    assert 'aria-label="render rate against training frequency"' in html and html.count("<circle") == 6
    assert "showing ME" in html and "ME and MU" in html  # co-occurrence beside the primary labels
    controls = b.counts["implied_controls"]  # the MI rule's false positives measured on this scan, in words
    assert f"{controls['beyond_null']} of {controls['probes']}\ncontrols" in html and 'id="implied-controls"' in html

    profile = tmp_path / "profile"
    dom = dump_dom(chromium, page, "", profile)
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 13  # every <img> decoded

    # Sorting and filtering, as the URL asks for them: entities by MU count, descending; prompts by text.
    dom = dump_dom(chromium, page, "#sort=entities:n_MU:desc&filter=prompts:captain", profile)
    entity_rows = re.search(r'<table id="entities".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    mu = [int(v) for v in re.findall(r'<tr>(?:<td[^>]*>[^<]*</td>){2}<td data-value="(\d+)"', entity_rows)]
    assert len(mu) == 6 and mu == sorted(mu, reverse=True) and mu[0] > 0
    assert 'aria-sort="descending"' in dom
    prompt_rows = re.search(r'<table id="prompts".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    shown = [r for r in re.findall(r"<tr( hidden=\"\")?>(.*?)</tr>", prompt_rows, re.S) if not r[0]]
    assert len(shown) == 1 and "Captain Mira" in shown[0][1]

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
