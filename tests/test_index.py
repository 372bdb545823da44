"""`raymem index` on a real local Ray: folder, table and WebDataset inputs, errors, resume, FAISS."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymem import uri as uris
from raymem.captions import tag_entities
from raymem.config import IndexConfig
from raymem.errors import InputError
from raymem.index import plan_shards, run_index
from raymem.join import Queries, nearest_neighbours
from raymem.schema import PackedEmbeddingType, embedding_matrix
from raymem.sources import inspect_training

pytestmark = pytest.mark.ray


def picture(i: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))


def config(demo_root, tmp_path, **over) -> IndexConfig:
    raw = {
        "output": str(tmp_path / "index"),
        "embedding": {
            "clip": {"model": f"local-dir:{demo_root / 'clip-tiny'}", "pretrained": None},
            "copy_detection": {"model": "immaculate:sscd_distilled", "image_size": 64},
        },
        "entities": ["Old Mill", "Qadira"],
        "shard_size": 4,
        "batch_size": 3,
        "background_sample": 5,
        **over,
    }
    return IndexConfig.model_validate(raw)


def test_tag_entities_whole_words():
    assert tag_entities("The old mill at dusk, near Qadira's gate", ["Old Mill", "Qadira", "Mill"]) == [
        "Old Mill",
        "Qadira",
        "Mill",
    ]
    assert tag_entities("a windmill", ["Mill"]) == [] and tag_entities(None, ["x"]) == []


def test_folder_index_records_corrupt_images_and_resumes(local_ray, demo_root, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(9):
        picture(i).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
        (folder / ("sub" if i % 2 else "") / f"img{i}.txt").write_text(f"the Old Mill number {i}")
    (folder / "broken.png").write_bytes(b"not a png at all")
    cfg = config(demo_root, tmp_path, input={"kind": "folder", "path": str(folder)})
    manifest = run_index(cfg)
    assert manifest["rows"] == 9 and manifest["errors"] == 1 and manifest["shards"] == 3
    out = tmp_path / "index"
    table = (
        pq.read_table(out).to_pylist()
        if False
        else pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]).to_pylist()
    )
    assert {r["train_id"] for r in table} == {f"img{i}" if i % 2 == 0 else f"sub/img{i}" for i in range(9)}
    row = next(r for r in table if r["train_id"] == "img0")
    assert row["caption"] == "the Old Mill number 0" and row["entities"] == ["Old Mill"]
    assert len(row["clip_embedding"]) == 64 and len(row["sscd_embedding"]) == 512
    errors = pq.read_table(out / "_errors").to_pylist()
    assert errors[0]["train_id"] == "broken" and "UnidentifiedImageError" in errors[0]["error"]
    index = json.loads((out / "_index.json").read_text())
    assert index["background"]["sscd"]["n"] == 5 and set(index["background"]) == {"clip", "sscd"}
    # The index is a valid training table for a scan.
    training = inspect_training(str(out), {"clip": 64, "sscd": 512})
    assert training.num_rows == 9 and training.index["rows"] == 9
    # Re-run: every shard is done, nothing is embedded again.
    assert run_index(cfg)["shards_embedded_now"] == 0


def test_table_index_and_its_input_errors(local_ray, demo_root, tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        picture(i).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"id": f"t{i}", "file": f"imgs/{i}.png", "text": f"Qadira view {i}"})
    rows.append({"id": "t5", "file": "imgs/missing.png", "text": "gone"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inp = {
        "kind": "table",
        "path": str(tmp_path / "train.jsonl"),
        "image_column": "file",
        "caption_column": "text",
        "id_column": "id",
    }
    # Packed embeddings (embedding_storage): one binary value per row, the join's fast layout.
    manifest = run_index(config(demo_root, tmp_path, input=inp, embedding_storage="packed"))
    assert manifest["rows"] == 5 and manifest["errors"] == 1
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "index").glob("part-*.parquet"))])
    assert table.column("train_id").to_pylist() == [f"t{i}" for i in range(5)]
    assert table.column("entities").to_pylist()[0] == ["Qadira"]
    assert table.schema.field("clip_embedding").type == PackedEmbeddingType(64)
    assert table.schema.field("sscd_embedding").type == PackedEmbeddingType(512)
    clip = embedding_matrix(table.column("clip_embedding"))
    np.testing.assert_allclose(np.linalg.norm(clip, axis=1), 1.0, rtol=1e-5)
    assert inspect_training(str(tmp_path / "index"), {"clip": 64, "sscd": 512}).dims == {"clip": 64, "sscd": 512}
    with pytest.raises(ValueError, match="embedding_storage"):
        config(demo_root, tmp_path, input=inp, embedding_storage="packed-int8")
    # Bad input: one line naming the file, row and field, before anything runs.
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[:1]))
    with pytest.raises(InputError, match=r"dup.jsonl: row 3, field 'id': duplicate id 't0' \(first at row 1\)"):
        plan_shards(config(demo_root, tmp_path, input={**inp, "path": str(tmp_path / "dup.jsonl")}))
    with pytest.raises(InputError, match=r"train.jsonl: field 'caption': required column is missing"):
        plan_shards(config(demo_root, tmp_path, input={**inp, "caption_column": "caption"}))


def test_webdataset_index_reads_tars_and_images_stay_addressable(local_ray, demo_root, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(3):
                key = f"{s:03d}{i:04d}"
                buf = io.BytesIO()
                picture(10 * s + i).save(buf, format="PNG")
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", f"Old Mill {s}-{i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("orphan.txt")  # a sample with no image
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    manifest = run_index(config(demo_root, tmp_path, input={"kind": "webdataset", "path": str(shards)}))
    assert manifest["rows"] == 6 and manifest["shards"] == 2 and manifest["errors"] == 2
    table = pq.read_table(tmp_path / "index" / "part-00001.parquet").to_pylist()
    assert table[0]["train_id"] == "shard-001/0010000" and table[0]["caption"] == "Old Mill 1-0"
    assert table[0]["image_uri"].endswith("shard-001.tar#0010000.png")
    image = Image.open(io.BytesIO(uris.read_bytes(table[0]["image_uri"])))
    assert image.size == (48, 48)


def test_faiss_mode_against_exact(local_ray, tmp_path):
    """IVF per shard; with nprobe = nlist it must equal the exact join, and the index records recall."""
    from raymem.config import FaissConfig
    from raymem.encoders import l2_normalize
    from raymem.faiss_index import build_indexes
    from raymem.index import measure_recall
    from raymem.schema import embedding_array

    rng = np.random.default_rng(0)
    out = tmp_path / "t"
    out.mkdir()
    for s in range(2):
        x = l2_normalize(rng.standard_normal((800, 16)))
        pq.write_table(
            pa.table({"train_id": [f"{s}-{i}" for i in range(800)], "clip_embedding": embedding_array(x, 16)}),
            out / f"part-{s:05d}.parquet",
        )
    training = inspect_training(str(out), {"clip": 16})
    built = build_indexes(training, FaissConfig(enabled=True, nlist=8))
    assert built["indexes"] == 2 and (out / "_faiss" / "part-00000.clip.faiss").exists()
    q = {"q": Queries([f"q{i}" for i in range(20)], {"clip": l2_normalize(rng.standard_normal((20, 16)))})}
    exact = nearest_neighbours(training, q, 5, batch_rows=300)["q"]["clip"]
    full = nearest_neighbours(training, q, 5, batch_rows=300, mode="faiss", nprobe=8)["q"]["clip"]
    np.testing.assert_array_equal(exact.ids, full.ids)
    np.testing.assert_allclose(exact.scores, full.scores, rtol=1e-5)
    recall = measure_recall(training, FaissConfig(enabled=True, recall_queries=30, recall_k=5, nprobe=2))
    assert 0.3 < recall["recall_clip"] <= 1.0 and recall["queries"] == 30
