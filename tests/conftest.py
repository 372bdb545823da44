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
    """configs/demo.yaml with every path moved under `root`."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
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
