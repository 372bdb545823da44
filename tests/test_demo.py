"""`raymem demo`: the planted development world scanned with its committed trained models. A newcomer's
first run must show every category found where it was planted and nothing where nothing was."""

import json
import re

import pytest
import yaml

from raymem.cli import main
from raymem.config import load_config
from raymem.planted.benchmark import PlantedConfig, scan_config
from tests.conftest import REPO

pytestmark = pytest.mark.ray


def demo_config_under(tmp_path) -> str:
    """configs/demo.yaml with the world, index and outputs moved under `tmp_path` (models stay)."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["model"]["id"] = str(REPO / "assets" / "planted-models" / "pipeline")
    raw["embedding"]["clip"]["model"] = f"local-dir:{REPO / 'assets' / 'planted-models' / 'clip'}"
    raw["prompts"] = str(tmp_path / "world" / "prompts-eval.jsonl")
    raw["training"]["embeddings"] = str(tmp_path / "index")
    raw["output"]["uri"] = str(tmp_path / "out")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_demo_scans_the_benchmarks_world_with_the_benchmarks_settings(tmp_path):
    """Everything but names and paths equals the planted benchmark's evaluation scan with the
    generator's own CLIP (`bench planted --shared-clip`), so the demo shows what docs/planted.md
    measures for that setup (the benchmark's default scans with the presence CLIP)."""
    demo = load_config(demo_config_under(tmp_path))
    models = REPO / "assets" / "planted-models"
    shared = PlantedConfig(presence=None)
    bench = scan_config(shared, tmp_path / "world", models, tmp_path / "index", "eval", {})

    def settings(cfg):
        d = json.loads(cfg.model_dump_json())
        for key in ("name", "prompts", "training", "output", "model"):
            d.pop(key)
        return d

    assert settings(demo) == settings(bench)
    assert (models / "pipeline" / "model_index.json").exists() and (models / "clip").is_dir()


def test_make_demo_finds_each_category_where_it_was_planted(tmp_path, capsys):
    assert main(["demo", "--config", demo_config_under(tmp_path)]) == 0
    out = capsys.readouterr().out
    found = {
        line.split()[0]: (int(line.split()[1]), int(line.split()[3]))
        for line in out.splitlines()
        if line.endswith("images labelled as planted")
    }
    assert set(found) == {"MU", "MI", "ME", "none"}
    # Exact on this machine: MU 48/48, MI 24/24, ME 6/24, none 32/32 (docs/planted.md). Another CPU may
    # move a generation by its last bits, so the bounds leave a little room; ME stays the hard case.
    assert found["MU"][0] >= found["MU"][1] - 2 and found["MI"][0] >= found["MI"][1] - 2
    assert found["none"][0] >= found["none"][1] - 2
    assert found["ME"][0] >= 1
    assert "next: raymem report latest --output" in out.splitlines()[-2]
    # the MI rule's false positives, measured on the scan's own controls, printed beside its findings
    assert re.search(r"^MI controls: \d+ of \d+ other entities' implied elements pass the MI test", out, re.M)
    # Nothing planted, nothing found: no control prompt has an MU, MI or ME image.
    controls = [line for line in out.splitlines() if "nothing: the world never shows this name" in line]
    assert len(controls) == 4 and all(line.split()[2:4] == ["none", "8"] for line in controls)
