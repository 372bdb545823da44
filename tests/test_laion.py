"""The clip-retrieval / LAION layout: read in place by the join, converted by `raymem import-embeddings`."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import join as joins
from raymem import sources
from raymem.encoders import l2_normalize
from raymem.errors import InputError
from raymem.laion import convert
from raymem.schema import PackedEmbeddingType, embedding_matrix
from raymem.sources.clip_retrieval import inspect_clip_retrieval

pytestmark = pytest.mark.ray


def write_layout(root, sizes, dim=12, dtype=np.float16, seed=0, row_group_size=None):
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    all_emb, keys = [], []
    for n, size in enumerate(sizes):
        emb = l2_normalize(rng.standard_normal((size, dim))).astype(dtype)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", emb)
        k = [f"{n:05d}{i:04d}" for i in range(size)]
        pq.write_table(
            pa.table(
                {
                    "key": k,
                    "caption": [f"caption {x}" for x in k],
                    "url": [f"https://x/{x}.jpg" for x in k],
                    "similarity": np.zeros(size),
                }
            ),
            root / "metadata" / f"metadata_{n}.parquet",
            row_group_size=row_group_size,
        )
        all_emb.append(emb.astype(np.float32))
        keys += k
    return np.concatenate(all_emb), np.array(keys)


def test_in_place_join_equals_brute_force(local_ray, tmp_path):
    x, keys = write_layout(tmp_path / "laion", [70, 5, 130])
    training = sources.inspect_training(f"clip-retrieval:{tmp_path / 'laion'}", {"clip": 12})
    assert training.layout == "clip-retrieval" and training.num_rows == 205
    assert training.columns == ["caption", "image_uri"]
    rng = np.random.default_rng(1)
    q = l2_normalize(rng.standard_normal((9, 12)))
    result = joins.nearest_neighbours(
        training, {"q": joins.Queries([str(i) for i in range(9)], {"clip": q})}, 4, batch_rows=32
    )["q"]["clip"]
    scores = q @ x.T
    for i, rows in enumerate(result.rows):
        expected = keys[np.argsort(-scores[i], kind="stable")[:4]]
        assert [r["train_id"] for r in rows] == list(expected)
        assert rows[0]["caption"] == f"caption {expected[0]}" and rows[0]["image_uri"].startswith("https://x/")


def test_a_row_range_reads_only_its_metadata_row_groups(tmp_path, monkeypatch):
    from raymem.sources import clip_retrieval

    x, keys = write_layout(tmp_path / "laion", [100], row_group_size=16)
    meta, npy = tmp_path / "laion" / "metadata" / "metadata_0.parquet", tmp_path / "laion" / "img_emb" / "img_emb_0.npy"
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, groups, **kw: read.append(list(groups)) or original(self, groups, **kw),
    )
    for start, stop in ((0, 16), (10, 40), (95, 100), (33, 34)):
        read.clear()
        table = clip_retrieval.read_pair_rows(str(meta), str(npy), start, stop)
        assert table.column("train_id").to_pylist() == list(keys[start:stop])
        np.testing.assert_allclose(sources.checked_matrix(table, "clip_embedding", 12), x[start:stop], atol=1e-3)
        assert read == [list(range(start // 16, (stop - 1) // 16 + 1))]


def test_convert_writes_raymem_parquet(local_ray, tmp_path):
    x, keys = write_layout(tmp_path / "laion", [40, 25], dtype=np.float32)
    result = convert(str(tmp_path / "laion"), str(tmp_path / "out"), entities=["caption 000010003"])
    assert result == {"files": 2, "rows": 65, "dim": 12}
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / f"part-0000{n}.parquet") for n in (0, 1)])
    assert table.column("train_id").to_pylist() == list(keys)
    np.testing.assert_allclose(np.stack(table.column("clip_embedding").to_numpy(zero_copy_only=False)), x)
    assert (
        table.column("entities").to_pylist()[43] == ["caption 000010003"]
        and table.column("entities").to_pylist()[40] == []
    )
    assert sources.inspect_training(str(tmp_path / "out"), {"clip": 12}).num_rows == 65


def test_convert_keeps_laions_float16_bytes_when_packed(local_ray, tmp_path):
    """LAION ships float16: `--storage packed-float16` keeps those values exactly at half the bytes of
    float32, and the join reads them without a decode pass."""
    x, keys = write_layout(tmp_path / "laion", [30, 9], dtype=np.float16)
    result = convert(str(tmp_path / "laion"), str(tmp_path / "out"), storage="packed-float16")
    assert result["rows"] == 39
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / f"part-0000{n}.parquet") for n in (0, 1)])
    assert table.schema.field("clip_embedding").type == PackedEmbeddingType(12, "float16")
    np.testing.assert_array_equal(embedding_matrix(table.column("clip_embedding")), x)
    assert table.column("train_id").to_pylist() == list(keys)


def test_layout_errors(tmp_path):
    write_layout(tmp_path / "a", [10, 10])
    np.save(tmp_path / "a" / "img_emb" / "img_emb_1.npy", np.zeros((9, 12), np.float16))
    with pytest.raises(InputError, match=r"img_emb_1.npy: 9 embeddings but .*metadata_1.parquet has 10 rows"):
        inspect_clip_retrieval(str(tmp_path / "a"), {})
    write_layout(tmp_path / "b", [10, 10])
    (tmp_path / "b" / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(InputError, match=r"img_emb_1.npy: no matching metadata/metadata_1.parquet"):
        inspect_clip_retrieval(str(tmp_path / "b"), {})
    write_layout(tmp_path / "c", [10])
    with pytest.raises(
        InputError, match=r"img_emb_0.npy: embedding dimension 12 does not match the scan's clip model \(512\)"
    ):
        inspect_clip_retrieval(str(tmp_path / "c"), {"clip": 512})
    write_layout(tmp_path / "d", [10, 10])
    np.save(tmp_path / "d" / "img_emb" / "img_emb_1.npy", np.zeros((10, 8), np.float16))
    with pytest.raises(InputError, match=r"img_emb_1.npy: embedding dimension 8 differs from the other files' \(12\)"):
        inspect_clip_retrieval(str(tmp_path / "d"), {})
    with pytest.raises(InputError, match="no img_emb_<N>.npy files found"):
        inspect_clip_retrieval(str(tmp_path / "nothing"), {})
