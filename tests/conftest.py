"""Shared fixtures: offline environment, the demo world built once per session, local Ray instances."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# Offline and quiet, before anything imports the hub or Ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Fail fast rather than hang for Ray's default 30 minutes if a stage cannot be scheduled.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")

REPO = Path(__file__).resolve().parents[1]


def demo_raw_config(root: Path) -> dict:
    """configs/tiny.yaml with every path moved under `root`."""
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["model"]["id"] = str(root / "sd-tiny")
    raw["prompts"] = str(root / "prompts.jsonl")
    raw["embedding"]["clip"]["model"] = f"local-dir:{root / 'clip-tiny'}"
    raw["training"]["embeddings"] = str(root / "train" / "embeddings")
    raw["output"]["uri"] = str(root / "out")
    return raw


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo assets (tiny SD pipeline, tiny open_clip, training world), built once per session."""
    from raymem.config import parse_config
    from raymem.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(parse_config(demo_raw_config(root)))
    return root


@pytest.fixture
def demo_raw(demo_root, tmp_path) -> dict:
    """The demo config as a dict, writing its outputs to a fresh directory."""
    raw = demo_raw_config(demo_root)
    raw["output"]["uri"] = str(tmp_path / "out")
    return raw


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray (never joins a cluster already on the machine); one CPU left for reads."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def two_scans(demo_root, tmp_path_factory):
    """Two complete demo scans under one output root: A with the first three prompts, B with all six.

    B adds the captain prompt, whose seed 1 is planted in the training set: a new MU prompt. B joins
    through the bfloat16 first pass (exact all the same), in the workers it warmed while generating.
    """
    import ray

    from raymem.config import parse_config
    from raymem.pipeline import run_scan

    root = tmp_path_factory.mktemp("scans")
    prompts = (demo_root / "prompts.jsonl").read_text().splitlines()
    subset = root / "prompts-a.jsonl"
    subset.write_text(
        "\n".join(p for p in prompts if '"captain"' not in p and '"kite"' not in p and '"mill"' not in p) + "\n"
    )
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for name, prompt_file in (("a", subset), ("b", demo_root / "prompts.jsonl")):
        raw = demo_raw_config(demo_root)
        raw.update(name=f"scan-{name}", prompts=str(prompt_file))
        raw["output"] = {"uri": str(root / "out"), "scan_date": "2026-11-27" if name == "a" else "2026-11-28"}
        raw["generation"]["seeds_per_prompt"] = 2
        raw["signals"]["null_seeds"] = 2
        if name == "b":
            raw["join"] = {**raw.get("join", {}), "first_pass": "bfloat16"}
        results[name] = run_scan(parse_config(raw))
    if started:
        ray.shutdown()
    return root / "out", results["a"], results["b"]
