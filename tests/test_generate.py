"""The generate + embed actor (`raymem.generate.GenerateEmbed`) on the tiny demo pipeline."""

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from raymem.config import parse_config
from raymem.generate import GenerateEmbed, expand_units, work_chunks
from raymem.prompts import Prompt
from tests.conftest import demo_raw_config

PROMPTS = [
    Prompt("lighthouse", "a photo of the Lunar Lighthouse", "Lunar Lighthouse", "a lighthouse", (), ()),
    Prompt("mill", "the Old Mill in autumn", "Old Mill", "a windmill", (), ()),
]


def _chunks(cfg):
    scan = [u for u in expand_units(PROMPTS, cfg, "fingerprint") if u.role == "scan"]
    units = [u for u in scan if u.prompt_id == "lighthouse"][:2] + [u for u in scan if u.prompt_id == "mill"][:2]
    texts = {"lighthouse": ["a photo of a lighthouse with rocks"], "mill": ["a photo of a windmill with a river"]}
    return [pa.Table.from_pylist([chunk]) for chunk in work_chunks(units, 2, texts)]


def _rows(store) -> dict:
    table = ds.dataset(str(store / "generations"), format="parquet").to_table()
    return {r["unit_id"]: r for r in table.to_pylist()}


def test_two_calls_at_once_overlap_one_chunks_cpu_work_with_the_others_sampling(demo_root, tmp_path):
    """An actor runs two chunks at once: while one is sampled, the other's PNGs are written — and the
    models are never used by both threads at once, and the rows are those of one chunk after the other."""
    raw = demo_raw_config(demo_root)
    raw["generation"]["num_inference_steps"] = 2
    cfg = parse_config(raw)
    chunks = _chunks(cfg)
    assert len(chunks) == 2 and cfg.resources.chunks_at_once == 2  # the default: two at once

    serial = GenerateEmbed(cfg, "scan", str(tmp_path / "serial"), str(tmp_path / "serial-texts"))
    for chunk in chunks:
        assert serial(chunk).column("status").to_pylist() == ["ok", "ok"]

    actor = GenerateEmbed(cfg, "scan", str(tmp_path / "store"), str(tmp_path / "texts"))
    guard = threading.Lock()
    events: list[tuple[str, str, float, float]] = []  # (what, chunk's first unit, start, end)
    inside = {"now": 0, "most": 0}

    def using_models(fn, slow=0.0):
        def wrapped(*args, **kwargs):
            with guard:
                inside["now"] += 1
                inside["most"] = max(inside["most"], inside["now"])
            try:
                out = fn(*args, **kwargs)
                time.sleep(slow)  # long enough that the other thread's CPU work falls inside it
                return out
            finally:
                with guard:
                    inside["now"] -= 1

        return wrapped

    def timed(what, fn, key):
        def wrapped(*args):
            start = time.perf_counter()
            out = fn(*args)
            time.sleep(0.3)
            with guard:
                events.append((what, key(*args), start, time.perf_counter()))
            return out

        return wrapped

    owner = {}  # unit -> its chunk's first unit
    for chunk in chunks:
        units = [u["unit_id"] for u in json.loads(chunk.column("units")[0].as_py())]
        owner.update({u: units[0] for u in units})
    actor._sample = timed("sample", using_models(actor._sample), lambda units: owner[units[0].unit_id])
    actor._save_image = timed("save", actor._save_image, lambda unit, pixels: owner[unit.unit_id])
    actor.clip.encode_prepared = using_models(actor.clip.encode_prepared, slow=0.05)
    actor.clip.encode_texts = using_models(actor.clip.encode_texts, slow=0.05)
    actor.sscd.encode_prepared = using_models(actor.sscd.encode_prepared, slow=0.05)

    barrier = threading.Barrier(2)
    results = [None, None]

    def call(i):
        barrier.wait()
        results[i] = actor(chunks[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.column("status").to_pylist() for r in results] == [["ok", "ok"], ["ok", "ok"]]
    assert inside["most"] == 1  # the pipeline and the encoders: one thread at a time

    samples = [e for e in events if e[0] == "sample"]
    saves = [e for e in events if e[0] == "save"]
    assert len(samples) == 2 and len(saves) == 4
    overlapped = [
        (s, w) for s in samples for w in saves if s[1] != w[1] and w[2] < s[3] and s[2] < w[3]
    ]  # a chunk's PNG written while the other chunk was being sampled
    assert overlapped, events

    ours, theirs = _rows(tmp_path / "store"), _rows(tmp_path / "serial")
    assert sorted(ours) == sorted(theirs) and len(ours) == 4
    for uid, row in ours.items():
        for column in ("clip_embedding", "sscd_embedding"):
            assert np.allclose(row[column], theirs[uid][column], atol=1e-5), (uid, column)
        assert np.isclose(row["noise_norm"], theirs[uid]["noise_norm"], rtol=1e-5)
        assert np.isclose(row["clip_prompt_score"], theirs[uid]["clip_prompt_score"], atol=1e-5)
    cached = ds.dataset(str(tmp_path / "texts"), format="parquet").to_table().column("text").to_pylist()
    assert sorted(cached) == ["a photo of a lighthouse with rocks", "a photo of a windmill with a river"]


@pytest.mark.parametrize("chunks_at_once", [1, 3])
def test_a_scan_asks_its_generation_pool_for_the_chunks_at_once_it_is_configured_with(
    demo_raw, local_ray, monkeypatch, chunks_at_once
):
    """`resources.chunks_at_once` reaches the generation stage's pool, and every unit is scored with it."""
    from raymem import runtime
    from raymem.pipeline import run_scan

    asked = {}
    real = runtime.map_stage

    def recording(name, *args, **kwargs):
        asked[name] = kwargs.get("calls_per_actor", 1)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(runtime, "map_stage", recording)
    demo_raw["generation"]["num_inference_steps"] = 2
    demo_raw["resources"]["chunks_at_once"] = chunks_at_once
    result = run_scan(parse_config(demo_raw))
    assert asked["generate"] == chunks_at_once
    assert result.counts["resources"]["generate"]["chunks_at_once"] == chunks_at_once  # in the manifest
    assert result.counts["units_failed"] == 0 and result.counts["units_generated"] > 0
