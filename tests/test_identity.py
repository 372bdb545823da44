"""The scan id comes from what the inputs contain, not where they sit."""

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem.config import parse_config
from raymem.identity import embedding_mismatches, scan_id_of, scan_identity
from raymem.pipeline import check_inputs
from raymem.schema import embedding_array


def make_inputs(root, prompts=("a photo of the Old Mill",)):
    root.mkdir(parents=True)
    (root / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": p, "entity": "Old Mill"}) + "\n" for i, p in enumerate(prompts)
        )
    )
    (root / "train").mkdir()
    x = np.eye(4, 8, dtype=np.float32)
    pq.write_table(
        pa.table({"train_id": ["a", "b", "c", "d"], "clip_embedding": embedding_array(x, 8)}),
        root / "train" / "part-0.parquet",
    )
    (root / "model").mkdir()
    (root / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return root


def config(root, **over):
    raw = {
        "name": "nightly",
        "model": {"id": str(root / "model")},
        "prompts": str(root / "prompts.jsonl"),
        "training": {"embeddings": str(root / "train")},
        "embedding": {"copy_detection": {"model": None}},
        "output": {"uri": str(root / "out"), "scan_date": "2026-11-30"},
        **over,
    }
    return parse_config(raw)


def scan_id(cfg):
    prompts, training = check_inputs(cfg)
    return scan_id_of(cfg, scan_identity(cfg, prompts, training))


def test_the_same_inputs_elsewhere_are_the_same_scan(tmp_path):
    a = make_inputs(tmp_path / "here")
    shutil.copytree(a, tmp_path / "there")
    here = scan_id(config(a))
    assert here == scan_id(config(tmp_path / "there"))  # other absolute paths, same content
    assert here.startswith("nightly-2026-11-30-")
    # where it runs and with what resources does not change what it computes
    assert here == scan_id(config(a, resources={"join_actors": 4}, ray={"address": "ray://head:10001"}))


def test_changed_content_settings_or_date_is_another_scan(tmp_path):
    a = make_inputs(tmp_path / "a")
    base = scan_id(config(a))
    (a / "prompts.jsonl").write_text(
        json.dumps({"prompt_id": "p0", "prompt": "the Old Mill at night", "entity": "Old Mill"}) + "\n"
    )
    changed_prompts = scan_id(config(a))
    assert changed_prompts != base
    (a / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert scan_id(config(a)) != changed_prompts
    pq.write_table(
        pa.table({"train_id": ["e"], "clip_embedding": embedding_array(np.eye(1, 8, dtype=np.float32), 8)}),
        a / "train" / "part-1.parquet",
    )
    with_more_training = scan_id(config(a))
    assert with_more_training != changed_prompts
    # the same file names and row counts with other contents (re-written tags) are another scan too
    pq.write_table(
        pa.table(
            {
                "train_id": ["e"],
                "clip_embedding": embedding_array(np.eye(1, 8, dtype=np.float32), 8),
                "entities": pa.array([["Old Mill"]], pa.list_(pa.string())),
            }
        ),
        a / "train" / "part-1.parquet",
    )
    retagged = scan_id(config(a))
    assert retagged != with_more_training
    pq.write_table(
        pa.table({"train_id": ["e"], "clip_embedding": embedding_array(np.eye(1, 8, dtype=np.float32), 8)}),
        a / "train" / "part-1.parquet",
    )
    assert scan_id(config(a)) == with_more_training  # rewritten to the same contents: the same scan
    assert scan_id(config(a, generation={"seeds_per_prompt": 8})) != with_more_training
    other_day = config(a, output={"uri": str(a / "out"), "scan_date": "2026-12-01"})
    assert other_day.scan_date == dt.date(2026, 12, 1) and scan_id(other_day) != with_more_training


# -- the scan embeds as the index did ------------------------------------------------------------------------


def _recorded(**embedding):
    base = {
        "clip": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        "copy_detection": {"model": "immaculate:sscd", "image_size": 288},
    }
    for section, values in embedding.items():
        base[section] = {**base[section], **values}
    return base


def test_an_index_embedded_with_other_weights_or_another_input_size_is_told_apart():
    index = {"config": {"embedding": _recorded()}}
    assert embedding_mismatches(index, _recorded(), ["clip", "sscd"]) == ([], [])
    differ, _ = embedding_mismatches(
        index, _recorded(clip={"pretrained": "openai"}, copy_detection={"image_size": 32}), ["clip", "sscd"]
    )
    assert differ == [("clip.pretrained", "laion2b_s34b_b79k", "openai"), ("copy_detection.image_size", 288, 32)]
    # only the spaces the table has: a CLIP-only table (two-stage copy detection) ignores the copy detector
    assert embedding_mismatches(index, _recorded(copy_detection={"image_size": 32}), ["clip"]) == ([], [])
    # a table not written by `raymem index` (or before it recorded its embedding) has nothing to compare
    assert embedding_mismatches({"rows": 3}, _recorded(), ["clip"]) == ([], [])
    assert embedding_mismatches(None, _recorded(), ["clip"]) == ([], [])


def test_the_same_weights_elsewhere_match_and_a_remote_copy_cannot_be_checked(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "open_clip_config.json").write_text("{}")
        (tmp_path / name / "weights.safetensors").write_bytes(b"same" if name != "c" else b"other")
    index = {"config": {"embedding": _recorded(clip={"model": f"local-dir:{tmp_path / 'a'}", "pretrained": None})}}
    moved = _recorded(clip={"model": f"local-dir:{tmp_path / 'b'}", "pretrained": None})
    assert embedding_mismatches(index, moved, ["clip"]) == ([], [])  # by content, not by path
    other = _recorded(clip={"model": f"local-dir:{tmp_path / 'c'}", "pretrained": None})
    assert embedding_mismatches(index, other, ["clip"])[0] == [
        ("clip.model", f"local-dir:{tmp_path / 'a'}", f"local-dir:{tmp_path / 'c'}")
    ]
    remote = _recorded(clip={"model": "s3://models/clip", "pretrained": None})
    assert embedding_mismatches(index, remote, ["clip"]) == (
        [],
        [("clip.model", f"local-dir:{tmp_path / 'a'}", "s3://models/clip")],
    )
