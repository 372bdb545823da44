import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymem import background, runtime, sources
from raymem import join as joins
from raymem.encoders import l2_normalize
from raymem.entity_stats import entity_stats
from raymem.errors import InputError
from raymem.schema import PackedEmbeddingType, embedding_array, stored_embedding_array


def write_training(root, rng, sizes, dim=16, sscd_dim=8, with_meta=True, storage="list"):
    """Several Parquet files of random unit vectors (embeddings stored as `storage`, raymem index's
    embedding_storage); returns (ids, clip matrix, sscd matrix) as drawn, before any rounding."""
    root.mkdir(parents=True, exist_ok=True)
    ids, clips, sscds = [], [], []
    start = 0
    for n, size in enumerate(sizes):
        clip = l2_normalize(rng.standard_normal((size, dim)))
        sscd = l2_normalize(rng.standard_normal((size, sscd_dim)))
        tid = [f"t{start + i:06d}" for i in range(size)]
        cols = {
            "train_id": tid,
            "clip_embedding": stored_embedding_array(clip, dim, storage),
            "sscd_embedding": stored_embedding_array(sscd, sscd_dim, storage),
        }
        if with_meta:
            cols["caption"] = [f"caption {t}" for t in tid]
            cols["entities"] = pa.array([[f"e{i % 3}"] for i in range(size)], pa.list_(pa.string()))
        pq.write_table(pa.table(cols), root / f"part-{n:03d}.parquet", row_group_size=37)
        ids += tid
        clips.append(clip)
        sscds.append(sscd)
        start += size
    return np.array(ids), np.concatenate(clips), np.concatenate(sscds)


def brute_force(q, x, ids, k):
    s = q @ x.T
    out = []
    for row in s:
        order = sorted(range(len(row)), key=lambda j: (-row[j], ids[j]))[:k]
        out.append((list(ids[order]), row[order]))
    return out


def test_running_topk_merges_batches_like_a_sort():
    rng = np.random.default_rng(0)
    top = joins.RunningTopK(num_queries=3, k=4)
    all_rows = {q: [] for q in range(3)}
    for b in range(5):
        query = rng.integers(0, 3, size=10)
        score = rng.random(10).astype(np.float32)
        ids = np.array([f"b{b}-{i}" for i in range(10)], dtype=object)
        top.add(query, score, ids, np.full(10, f"file{b}", dtype=object), [{"caption": t} for t in ids])
        for q, sc, t in zip(query, score, ids):
            all_rows[int(q)].append((-float(sc), t))
    for q in range(3):
        expected = [tid for _, tid in sorted(all_rows[q])[:4]]
        assert [r["train_id"] for r in top.rows[q]] == expected
        assert all(r["caption"] == r["train_id"] for r in top.rows[q])


def test_ties_are_broken_by_train_id_whatever_the_arrival_order():
    a = joins.RunningTopK(1, 2)
    b = joins.RunningTopK(1, 2)
    ids = np.array(["z", "m", "a"], dtype=object)
    for top, order in ((a, [0, 1, 2]), (b, [2, 1, 0])):
        for i in order:
            top.add(np.array([0]), np.array([0.5], np.float32), ids[[i]], np.array([f"f{i}"], dtype=object), [{}])
    assert [r["train_id"] for r in a.rows[0]] == [r["train_id"] for r in b.rows[0]] == ["a", "m"]


def test_duplicate_train_id_across_files_is_an_error():
    top = joins.RunningTopK(1, 3)
    top.add(
        np.array([0]),
        np.array([0.9], np.float32),
        np.array(["x"], dtype=object),
        np.array(["a.parquet"], dtype=object),
        [{}],
    )
    with pytest.raises(InputError, match=r"b.parquet: field 'train_id': duplicate train_id 'x' \(also in a.parquet\)"):
        top.add(
            np.array([0]),
            np.array([0.9], np.float32),
            np.array(["x"], dtype=object),
            np.array(["b.parquet"], dtype=object),
            [{}],
        )


def test_bad_embedding_values_name_the_file_and_row():
    def batch(values):
        return pa.table(
            {
                "train_id": ["a", "b"],
                "clip_embedding": embedding_array(np.array(values, np.float32), 2),
                "path": ["f.parquet", "f.parquet"],
            }
        )

    with pytest.raises(
        InputError, match=r"f.parquet: field 'clip_embedding': the embedding of train_id 'b' has NaN or inf values"
    ):
        sources.checked_matrix(batch([[1, 0], [np.nan, 0]]), "clip_embedding", 2)
    with pytest.raises(InputError, match=r"the embedding of train_id 'a' is zero \(1 bad row\(s\)\)"):
        sources.checked_matrix(batch([[0, 0], [1, 0]]), "clip_embedding", 2)
    with pytest.raises(InputError, match=r"embedding dimension 2 does not match the scan's \(3\)"):
        sources.checked_matrix(batch([[1, 0], [0, 1]]), "clip_embedding", 3)
    m = sources.checked_matrix(batch([[3, 4], [0, 2]]), "clip_embedding", 2)  # not normalised: normalised here
    np.testing.assert_allclose(m, [[0.6, 0.8], [0, 1]])


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_top_rows_streamed_over_batches_keeps_the_exact_top_k_and_every_tie(tied, bounded):
    """top_rows on the true scores, and top_rows_bounded on scores off by up to +-error (the bfloat16 first
    pass) that re-scores its candidates: both keep every score that can be in the top-k, ties included."""
    rng = np.random.default_rng(11 + tied + 2 * bounded)
    for _ in range(40):
        q, k, total = int(rng.integers(1, 9)), int(rng.integers(1, 12)), int(rng.integers(1, 4000))
        scores = (
            rng.integers(0, 30, size=(q, total)).astype(np.float32)  # many ties at the k-th
            if tied
            else rng.standard_normal((q, total)).astype(np.float32)
        )
        best = np.full((q, k), -np.inf, np.float32)
        emitted = [dict() for _ in range(q)]
        start = 0
        while start < total:
            n = int(rng.integers(1, 1500))
            part = scores[:, start : start + n]
            block = int(rng.choice([1, 7, 256]))
            if bounded:
                error = float(rng.choice([0.01, 0.3, 2.0]))
                # (0.99: the float32 cast of approx must not push it past the bound)
                approx = (part + rng.uniform(-0.99 * error, 0.99 * error, part.shape)).astype(np.float32)
                rows, cols, vals = joins.top_rows_bounded(
                    approx, min(k, part.shape[1]), best, error, lambda r, c, part=part: part[r, c], block
                )
            else:
                rows, cols, vals = joins.top_rows(part if n % 2 else part.copy(), min(k, part.shape[1]), best, block)
            np.testing.assert_array_equal(vals, part[rows, cols])
            for r, c, v in zip(rows, cols, vals):
                emitted[r][start + int(c)] = v
            start += n
        for i in range(q):
            kth = np.sort(scores[i])[::-1][:k][-1]
            # every score at or above the true k-th was emitted (ties included) ...
            assert set(np.flatnonzero(scores[i] >= kth)) <= set(emitted[i]), (i, kth)
            # ... and the running best is the true top k
            np.testing.assert_array_equal(best[i], np.sort(scores[i])[::-1][:k])


def test_bfloat16_scores_stay_within_the_bound():
    """The bound the bfloat16 first pass relies on, against float64 dot products, on vectors made to round
    badly (components at bfloat16's rounding midpoints, a few large components, random)."""
    rng = np.random.default_rng(3)
    first = joins.BFloat16FirstPass(threads=1)
    for dim in (16, 512, 1024):
        mid = np.full((8, dim), 1 + 2.0**-9, np.float32) * rng.choice([-1, 1], (8, dim))  # halfway between bf16s
        sparse = np.zeros((8, dim), np.float32)
        sparse[np.arange(8), rng.integers(0, dim, 8)] = 1 + 2.0**-9
        sparse[:, 0] += 0.3
        x = np.concatenate([mid, sparse, rng.standard_normal((48, dim)).astype(np.float32)])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[rng.permutation(len(x))[:24]] * np.float32(1.0004)  # rows as long as the join lets through
        approx, bound = first.scores(("t", dim), q, first.rows(x))
        error = np.abs(approx.float().numpy() - q.astype(np.float64) @ x.astype(np.float64).T).max()
        assert error <= joins.bfloat16_error_bound(dim, 1.0004 * joins.ROW_NORM_MAX), (dim, error)
        assert bound >= joins.bfloat16_error_bound(dim, joins.ROW_NORM_MAX)  # from the queries' own norms


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_the_bfloat16_first_pass_gives_the_float32_top_k(ties, tiled, monkeypatch):
    """A scorer with the bfloat16 first pass returns what the float32 scorer returns: the same rows in the
    same order and their float32 scores, over several batches, with self-exclusion and exact ties; tiled,
    the query tiles change size with the batches (700 rows, then 200)."""
    if tiled:
        monkeypatch.setattr(joins, "MAX_SCORE_ELEMENTS", 700 * 16)  # 16 queries per tile of 700 rows, 56 of 200
    rng = np.random.default_rng(9)
    centres = l2_normalize(rng.standard_normal((5, 64)))
    x = l2_normalize(centres[rng.integers(0, 5, 3000)] + 0.15 * rng.standard_normal((3000, 64)))
    if ties:
        x[1500:] = x[:1500]  # every row twice, under another id
    ids = [f"t{i:05d}" for i in range(len(x))]
    picked = rng.choice(len(x), 40, replace=False)  # background-style queries: training rows, themselves excluded
    table = pa.table({"train_id": ids, "clip_embedding": embedding_array(x, 64), "path": ["p"] * len(ids)})
    qs = {"u": joins.Queries([ids[i] for i in picked], {"clip": x[picked]}, exclude_self=True)}

    def joined(first_pass, ready_after=0):
        """The scorer's result; with the first pass, it becomes ready after `ready_after` batches (torch is
        imported in a thread: the first batches of a join are scored in float32)."""
        ready = threading.Event()
        real = joins.BFloat16FirstPass

        def slow_to_import(threads):
            assert ready.wait(60)
            return real(threads)

        monkeypatch.setattr(joins, "BFloat16FirstPass", slow_to_import)
        monkeypatch.setattr(joins, "torch_imported", lambda: False)  # a cold worker: torch imports in a thread
        scorer = joins.TopKScorer(qs, 7, first_pass=first_pass)
        result = {"u": {"clip": joins.RunningTopK(40, 7, exclude=qs["u"].ids)}}
        for i, start in enumerate(range(0, len(x), 700)):
            if i == ready_after:
                ready.set()
                assert (scorer.warmed() is not None) == (first_pass == "bfloat16")
            elif i < ready_after:
                assert scorer.first_pass is None  # still warming: this batch is scored in float32
            joins.fold(scorer(table.slice(start, 700)), result)
        monkeypatch.setattr(joins, "BFloat16FirstPass", real)
        return result["u"]["clip"].rows

    plain = joined("none")
    for first in (joined("bfloat16"), joined("bfloat16", ready_after=2)):
        assert [[r["train_id"] for r in rows] for rows in first] == [[r["train_id"] for r in rows] for rows in plain]
        np.testing.assert_allclose(
            [[r["score"] for r in rows] for rows in first], [[r["score"] for r in rows] for rows in plain], rtol=1e-5
        )


def test_the_first_pass_reuses_its_buffers_safely_across_spaces_sets_and_batch_sizes():
    """The first pass writes every item's bfloat16 rows and scores into buffers it reuses: two query sets,
    two spaces of different dimensions and batches that grow and shrink (the buffers grow, then are
    viewed smaller) give exactly what the float32 path gives."""
    rng = np.random.default_rng(21)
    clip = l2_normalize(rng.standard_normal((1400, 64)))
    sscd = l2_normalize(rng.standard_normal((1400, 32)))
    ids = [f"t{i:04d}" for i in range(1400)]
    table = pa.table(
        {
            "train_id": ids,
            "clip_embedding": embedding_array(clip, 64),
            "sscd_embedding": embedding_array(sscd, 32),
            "path": ["p"] * len(ids),
        }
    )
    picked = rng.choice(1400, 30, replace=False)
    qs = {
        "units": joins.Queries([f"u{i}" for i in range(12)], {"clip": clip[:12] * 0.9 + 0.1, "sscd": sscd[:12]}),
        "background": joins.Queries(
            [ids[i] for i in picked], {"clip": clip[picked], "sscd": sscd[picked]}, exclude_self=True
        ),
    }

    def joined(first_pass):
        scorer = joins.TopKScorer(qs, 5, first_pass=first_pass)
        assert (scorer.warmed() is not None) == (first_pass == "bfloat16")
        result = {
            name: {s: joins.RunningTopK(len(q.ids), 5, exclude=q.ids if q.exclude_self else None) for s in q.matrices}
            for name, q in qs.items()
        }
        start = 0
        for size in (200, 900, 300):  # grow, then shrink
            joins.fold(scorer(table.slice(start, size)), result)
            start += size
        return {(name, s): running.rows for name, spaces in result.items() for s, running in spaces.items()}

    plain, first = joined("none"), joined("bfloat16")
    assert set(first) == {(n, s) for n in qs for s in ("clip", "sscd")}
    for key in plain:
        assert [[r["train_id"] for r in rows] for rows in first[key]] == [
            [r["train_id"] for r in rows] for rows in plain[key]
        ], key
        np.testing.assert_allclose(
            [[r["score"] for r in rows] for rows in first[key]],
            [[r["score"] for r in rows] for rows in plain[key]],
            rtol=1e-6,
        )


def test_an_unusable_first_pass_costs_speed_not_results(monkeypatch, caplog):
    """A first pass that fails (its self-check, or torch's import) leaves the scorer in float32, with a warning."""

    def broken(threads):
        raise RuntimeError("bfloat16 products off by 0.5, beyond the bound: not used")

    monkeypatch.setattr(joins, "BFloat16FirstPass", broken)
    q = {"u": joins.Queries(["a"], {"clip": l2_normalize(np.ones((1, 8)))})}
    scorer = joins.TopKScorer(q, 2, first_pass="bfloat16")
    with caplog.at_level("WARNING", logger="raymem.join"):
        assert scorer.warmed() is None
    assert "scoring in float32" in caplog.text
    x = l2_normalize(np.arange(24, dtype=np.float32).reshape(3, 8) + 1)
    out = scorer(pa.table({"train_id": ["x", "y", "z"], "clip_embedding": embedding_array(x, 8), "path": ["p"] * 3}))
    assert sorted(out.column("train_id").to_pylist()) == ["y", "z"]


def test_auto_first_pass_only_where_it_repays_itself(monkeypatch):
    """auto: the bfloat16 pass for joins large enough to repay importing torch, and only on an actor whose
    CPU multiplies bfloat16 in hardware (emulated, it is slower than float32)."""
    q = {"u": joins.Queries([f"q{i}" for i in range(1024)], {"clip": np.zeros((1024, 512), np.float32)})}
    assert joins.first_pass_for("auto", 1_000_000, q) == "none"  # 5.4e11 multiply-adds
    assert joins.first_pass_for("auto", 3_000_000, q) == "auto"  # 1.6e12: twice as fast with the pass
    assert joins.first_pass_for("auto", 10_000_000, q) == "auto"
    assert joins.first_pass_for("bfloat16", 10, q) == "bfloat16" and joins.first_pass_for("none", 10**9, q) == "none"
    # in warmed workers (a scan's join) torch's import is off the join: the pass repays itself sooner
    assert joins.AUTO_FIRST_PASS_MACS_WARMED < joins.AUTO_FIRST_PASS_MACS
    assert joins.first_pass_for("auto", 1_000_000, q, warmed=True) == "auto"
    assert joins.first_pass_for_macs("auto", joins.AUTO_FIRST_PASS_MACS_WARMED - 1, warmed=True) == "none"
    small = {"u": joins.Queries(["a"], {"clip": l2_normalize(np.ones((1, 8)))})}
    for native in (False, True):
        monkeypatch.setattr(joins, "bfloat16_native", lambda native=native: native)
        assert (joins.TopKScorer(small, 2, first_pass="auto").warmed() is not None) == native
    assert joins.TopKScorer(small, 2, first_pass="none").warmed() is None


def test_top_rows_discards_batches_below_the_floor():
    high = np.array([[0.9, 0.8, 0.95, 0.7]], np.float32)
    best = np.full((1, 2), -np.inf, np.float32)
    rows, cols, _ = joins.top_rows(high, 2, best, block=1)
    assert sorted(cols) == [0, 2] and best.tolist() == [[np.float32(0.95), np.float32(0.9)]]
    low = np.array([[0.5, 0.85, 0.1, 0.89]], np.float32)  # nothing reaches 0.9 any more
    rows, cols, _ = joins.top_rows(low, 2, best, block=2)
    assert len(rows) == 0
    tie = np.array([[0.9, 0.2]], np.float32)  # a tie with the k-th is kept: the driver orders ties by id
    rows, cols, _ = joins.top_rows(tie, 2, best, block=1)
    assert cols.tolist() == [0]


def test_scorer_results_do_not_depend_on_batch_order_ties_included():
    rng = np.random.default_rng(5)
    x = l2_normalize(rng.standard_normal((40, 8)))
    x = np.concatenate([x, x[:20]])  # 20 exact ties under other ids
    ids = [f"t{i:03d}" for i in range(len(x))]
    q = l2_normalize(rng.standard_normal((6, 8)))
    table = pa.table({"train_id": ids, "clip_embedding": embedding_array(x, 8), "path": ["p"] * len(ids)})

    def joined(order):
        scorer = joins.TopKScorer({"u": joins.Queries([f"q{i}" for i in range(6)], {"clip": q})}, 5)
        result = {"u": {"clip": joins.RunningTopK(6, 5)}}
        for start in order:
            joins.fold(scorer(table.slice(start, 15)), result)
        return [[r["train_id"] for r in rows] for rows in result["u"]["clip"].rows]

    forward = joined([0, 15, 30, 45])
    assert forward == joined([45, 30, 15, 0]) == joined([30, 0, 45, 15])
    # the same scores by brute force (per slice, as BLAS rounds a slice), sorted by (-score, train_id)
    s = np.concatenate([q @ x[start : start + 15].T for start in (0, 15, 30, 45)], axis=1)
    assert forward == [[ids[j] for j in sorted(range(len(ids)), key=lambda j: (-row[j], ids[j]))[:5]] for row in s]


@pytest.mark.ray
def test_exact_topk_equals_numpy_across_files_and_batches(local_ray, tmp_path):
    rng = np.random.default_rng(7)
    ids, clip, sscd = write_training(tmp_path / "train", rng, sizes=[250, 1, 173, 402])
    training = sources.inspect_training(str(tmp_path / "train"), {"clip": 16, "sscd": 8})
    assert training.num_rows == 826 and training.dims == {"clip": 16, "sscd": 8}
    q_clip = l2_normalize(rng.standard_normal((23, 16)))
    q_sscd = l2_normalize(rng.standard_normal((23, 8)))
    # Plant exact matches so rank 1 is known, then compare the rest with brute force.
    q_clip[0] = clip[300]
    q_sscd[5] = sscd[825]
    qids = [f"q{i}" for i in range(23)]
    k = 7
    result = joins.nearest_neighbours(
        training,
        {"units": joins.Queries(qids, {"clip": q_clip, "sscd": q_sscd})},
        k,
        batch_rows=64,  # many batches, boundaries inside files and across them
        plan=runtime.JoinPlan.fixed(2, num_gpus=0.0, num_cpus=0.5),
    )
    for space, q, x in (("clip", q_clip, clip), ("sscd", q_sscd, sscd)):
        expected = brute_force(q, x, ids, k)
        got = result["units"][space].rows
        for (exp_ids, exp_scores), rows in zip(expected, got):
            assert [r["train_id"] for r in rows] == exp_ids
            np.testing.assert_allclose([r["score"] for r in rows], exp_scores, rtol=1e-5, atol=1e-6)
            assert all(r["caption"] == f"caption {r['train_id']}" for r in rows)
    assert result["units"]["clip"].rows[0][0]["train_id"] == ids[300]
    assert result["units"]["sscd"].rows[5][0]["train_id"] == ids[825]


@pytest.mark.ray
def test_packed_embeddings_join_exactly_like_lists(local_ray, tmp_path):
    """`embedding_storage: packed` stores each row's floats as one binary value (no list levels to decode):
    the same rows give the same neighbours and scores; packed-float16 gives the exact top-k of the
    float16-rounded rows."""
    k, qids = 5, [f"q{i}" for i in range(9)]
    results, matrices = {}, {}
    for storage in ("list", "packed", "packed-float16"):
        rng = np.random.default_rng(11)  # the same draws for every storage
        ids, clip, sscd = write_training(tmp_path / storage, rng, sizes=[70, 3, 101], storage=storage)
        training = sources.inspect_training(str(tmp_path / storage), {"clip": 16, "sscd": 8})
        assert training.dims == {"clip": 16, "sscd": 8}
        q = {"clip": l2_normalize(rng.standard_normal((9, 16))), "sscd": l2_normalize(rng.standard_normal((9, 8)))}
        result = joins.nearest_neighbours(training, {"units": joins.Queries(qids, q)}, k, batch_rows=40)
        results[storage], matrices[storage] = result["units"], (ids, clip, sscd, q)
        # the stats pass reads the same column type (entity centroids from packed rows)
        if storage == "packed":
            assert entity_stats(training, {"e0"})["e0"].count == 24 + 1 + 34
            # and the join actors' bfloat16 first pass (join.first_pass) finds the same neighbours
            first = joins.nearest_neighbours(
                training, {"units": joins.Queries(qids, q)}, k, batch_rows=40, first_pass="bfloat16"
            )
            for space in ("clip", "sscd"):
                got, want = first["units"][space].rows, result["units"][space].rows
                assert [[r["train_id"] for r in rows] for rows in got] == [
                    [r["train_id"] for r in rows] for rows in want
                ]
                np.testing.assert_allclose(
                    [[r["score"] for r in rows] for rows in got],
                    [[r["score"] for r in rows] for rows in want],
                    rtol=1e-5,
                )
    for space in ("clip", "sscd"):
        listed, packed = results["list"][space].rows, results["packed"][space].rows
        assert [[(r["train_id"], r["score"]) for r in rows] for rows in packed] == [
            [(r["train_id"], r["score"]) for r in rows] for rows in listed
        ]
        ids, clip, sscd, q = matrices["packed-float16"]
        x = {"clip": clip, "sscd": sscd}[space].astype(np.float16).astype(np.float32)
        # (rounded unit rows stay within the join's 1e-3 norm tolerance: scored as they are stored)
        for (exp_ids, exp_scores), rows in zip(brute_force(q[space], x, ids, k), results["packed-float16"][space].rows):
            assert [r["train_id"] for r in rows] == exp_ids
            np.testing.assert_allclose([r["score"] for r in rows], exp_scores, rtol=1e-5, atol=1e-6)


def test_packed_embeddings_read_back_everywhere(tmp_path):
    """A packed file is plain Parquet: the type travels in its Arrow schema (float32 or float16, the
    dimension); a reader without raymem gets fixed-size binary values that numpy decodes; a fixed-size
    binary column without the type is refused, naming file and field, since its dtype is unknown."""
    import duckdb

    from raymem.schema import embedding_matrix

    x = l2_normalize(np.random.default_rng(2).standard_normal((6, 4)))
    for storage, dtype in (("packed", "<f4"), ("packed-float16", "<f2")):
        path = tmp_path / f"{storage}.parquet"
        pq.write_table(pa.table({"e": stored_embedding_array(x, 4, storage)}), path, row_group_size=4)
        column = pq.read_table(path).column("e")
        assert column.type == PackedEmbeddingType(4, dtype="float32" if storage == "packed" else "float16")
        expected = x.astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(embedding_matrix(column), expected)  # two row groups, two chunks
        np.testing.assert_array_equal(embedding_matrix(column.slice(3, 2)), expected[3:5])
        blobs = duckdb.sql(f"SELECT e FROM '{path}'").fetchall()
        np.testing.assert_array_equal(np.stack([np.frombuffer(b, dtype) for (b,) in blobs]), x.astype(dtype))
    bare = tmp_path / "bare"
    bare.mkdir()
    raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), 6, [None, pa.py_buffer(x.tobytes())])
    pq.write_table(pa.table({"train_id": [str(i) for i in range(6)], "clip_embedding": raw}), bare / "a.parquet")
    with pytest.raises(
        InputError,
        match=r"a.parquet: field 'clip_embedding': fixed_size_binary\[16\] without raymem's packed-embedding type",
    ):
        sources.inspect_training(str(bare), {})


@pytest.mark.ray
def test_background_queries_skip_themselves(local_ray, tmp_path):
    rng = np.random.default_rng(3)
    ids, clip, _ = write_training(tmp_path / "train", rng, sizes=[60, 60])
    training = sources.inspect_training(str(tmp_path / "train"), {"clip": 16})
    bg = background.background_sample(training, 10, ["clip"])
    assert len(bg.ids) == 10 and bg.exclude_self
    result = joins.nearest_neighbours(training, {"background": bg}, 2, batch_rows=50)
    for qid, rows in zip(bg.ids, result["background"]["clip"].rows):
        i = list(ids).index(qid)
        scores = clip @ clip[i]
        scores[i] = -np.inf
        assert rows[0]["train_id"] == ids[int(np.argmax(scores))]
        assert all(r["train_id"] != qid for r in rows)


@pytest.mark.ray
def test_entity_stats_are_streamed_counts_and_centroids(local_ray, tmp_path):
    rng = np.random.default_rng(1)
    write_training(tmp_path / "train", rng, sizes=[10, 20])
    training = sources.inspect_training(str(tmp_path / "train"), {})
    stats = entity_stats(training, {"e0", "e1", "e9"})
    assert {e: st.count for e, st in stats.items()} == {"e0": 4 + 7, "e1": 3 + 7, "e9": 0}
    assert stats["e9"].centroid is None
    # The centroid is the normalised mean of the tagged rows' CLIP embeddings.
    import pyarrow as pa_

    table = pa_.concat_tables([pq.read_table(f) for f in training.files])
    rows = [i for i, tags in enumerate(table.column("entities").to_pylist()) if "e0" in tags]
    x = np.stack(table.column("clip_embedding").to_numpy(zero_copy_only=False))[rows].sum(0)
    np.testing.assert_allclose(stats["e0"].centroid, x / np.linalg.norm(x), rtol=1e-5)


def test_inspect_training_errors(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="no .parquet files found"):
        sources.inspect_training(str(tmp_path / "none"), {})
    write_training(tmp_path / "t", rng, sizes=[5])
    with pytest.raises(
        InputError,
        match=r"part-000.parquet: field 'clip_embedding': embedding dimension 16 does not match the scan's clip model \(512\)",
    ):
        sources.inspect_training(str(tmp_path / "t"), {"clip": 512})
    pq.write_table(pa.table({"train_id": ["a"], "caption": ["c"]}), tmp_path / "t" / "part-001.parquet")
    with pytest.raises(InputError, match=r"part-001.parquet: field 'clip_embedding': required column is missing"):
        sources.inspect_training(str(tmp_path / "t"), {})
    (tmp_path / "t" / "part-001.parquet").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"part-001.parquet: not a readable Parquet file"):
        sources.inspect_training(str(tmp_path / "t"), {})
    skipping = sources.inspect_training(str(tmp_path / "t"), {}, skip_bad_files=True)
    assert skipping.num_rows == 5 and len(skipping.skipped) == 1 and "part-001.parquet" in skipping.skipped[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(
        pa.table({"train_id": pa.array([], pa.string()), "clip_embedding": embedding_array(np.zeros((0, 4)), 4)}),
        empty / "a.parquet",
    )
    with pytest.raises(InputError, match="the training table has no rows"):
        sources.inspect_training(str(empty), {})


@pytest.mark.ray
def test_nan_in_a_streamed_file_fails_the_join_with_the_file_named(local_ray, tmp_path):
    rng = np.random.default_rng(5)
    write_training(tmp_path / "t", rng, sizes=[30, 30])
    x = l2_normalize(rng.standard_normal((4, 16)))
    x[2, 3] = np.inf
    pq.write_table(
        pa.table({"train_id": [f"bad{i}" for i in range(4)], "clip_embedding": embedding_array(x, 16)}),
        tmp_path / "t" / "part-zzz.parquet",
    )
    training = sources.inspect_training(str(tmp_path / "t"), {"clip": 16})
    q = {"q": joins.Queries(["q"], {"clip": l2_normalize(rng.standard_normal((1, 16)))})}
    with pytest.raises(
        InputError,
        match=r"^\S*part-zzz.parquet: field 'clip_embedding': the embedding of train_id 'bad2' has NaN or inf",
    ):
        joins.nearest_neighbours(training, q, 3, batch_rows=16)


@pytest.mark.ray
def test_corrupt_data_pages_behind_an_intact_footer_name_the_file(local_ray, tmp_path):
    rng = np.random.default_rng(6)
    write_training(tmp_path / "t", rng, sizes=[40, 40])
    victim = tmp_path / "t" / "part-001.parquet"
    data = bytearray(victim.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8  # footer length + 'PAR1' + the length itself
    for i in range(4, len(data) - footer, 7):  # scribble over the pages, leave the footer alone
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))
    training = sources.inspect_training(str(tmp_path / "t"), {"clip": 16})  # the footer still reads
    q = {"q": joins.Queries(["q"], {"clip": l2_normalize(rng.standard_normal((1, 16)))})}
    with pytest.raises(InputError, match=r"^\S*part-001.parquet: unreadable Parquet data in row groups \[[0-9, ]+\]: "):
        joins.nearest_neighbours(training, q, 3)


@pytest.mark.ray
def test_a_requested_work_gets_a_sample_of_its_copies_whatever_the_file_order(local_ray, tmp_path):
    """The work copies a private mark is measured against: the tagged rows with the smallest train_id
    hash (a bottom-k sample, the same whichever batch a row arrives in), with their image_uri; only for
    the entities of prompts that request a work."""
    from raymem.entity_stats import _hash

    rng = np.random.default_rng(5)
    root = tmp_path / "train"
    root.mkdir()
    ids = [f"r{i:03d}" for i in range(90)]
    for n in range(3):
        part = ids[n * 30 : (n + 1) * 30]
        clip = l2_normalize(rng.standard_normal((30, 16)))
        pq.write_table(
            pa.table(
                {
                    "train_id": part,
                    "clip_embedding": embedding_array(clip, 16),
                    "caption": [f"caption {t}" for t in part],
                    "entities": pa.array([[f"e{int(t[1:]) % 3}"] for t in part], pa.list_(pa.string())),
                    "image_uri": [f"/images/{t}.png" for t in part],
                }
            ),
            root / f"part-{n:03d}.parquet",
            row_group_size=7,
        )
    training = sources.inspect_training(str(root), {})
    stats = entity_stats(training, {"e0", "e1"}, works={"e0"}, work_copies=5)
    tagged = [t for t in ids if int(t[1:]) % 3 == 0]
    expected = sorted(tagged, key=_hash)[:5]
    assert [t for t, _ in stats["e0"].work_copies] == sorted(expected, key=_hash)
    assert all(u == f"/images/{t}.png" for t, u in stats["e0"].work_copies)
    assert stats["e1"].work_copies == () and stats["e0"].count == 30  # counts as before
    everything = entity_stats(training, {"e0"}, works={"e0"}, work_copies=100)["e0"].work_copies
    assert sorted(t for t, _ in everything) == tagged
    assert entity_stats(training, {"e0"}, works={"e0"}, work_copies=0)["e0"].work_copies == ()


@pytest.mark.parametrize("first_pass", ["none", "bfloat16"])
def test_a_query_never_matches_its_exact_duplicate_in_a_batch_smaller_than_k(first_pass):
    """A background query's exact duplicate (same image_hash, another id) is masked even in a batch of
    fewer rows than k, before any floor is known: no path re-scores a masked entry back in."""
    x = l2_normalize(np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0.8, 0.6, 0, 0]], np.float32))
    table = pa.table(
        {
            "train_id": ["a", "a-copy", "c"],
            "image_hash": ["h", "h", "other"],
            "clip_embedding": embedding_array(x, 4),
            "path": ["p"] * 3,
        }
    )
    qs = {"bg": joins.Queries(["a"], {"clip": x[:1]}, exclude_self=True, hashes=["h"])}
    scorer = joins.TopKScorer(qs, 5, first_pass=first_pass)
    scorer.warmed()
    out = scorer(table)
    assert out.column("train_id").to_pylist() == ["c"]
    assert out.column("score").to_pylist() == pytest.approx([0.8])


def test_read_only_queries_convert_without_a_warning():
    """Queries arrive read-only from the object store: the first pass copies them rather than have torch
    print a non-writable-array warning into every scan's log. (In a fresh process: torch warns once per
    process, so an earlier test could have used up the warning.)"""
    import subprocess
    import sys

    script = """
import numpy as np
from raymem import join as joins
first = joins.BFloat16FirstPass(threads=1)
q = np.full((4, 8), 8 ** -0.5, np.float32)
q.setflags(write=False)
approx, _ = first.scores(("read-only",), q, first.rows(np.full((5, 8), 8 ** -0.5, np.float32)))
assert approx.shape == (4, 5)
"""
    run = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "not writable" not in run.stderr


def test_a_scorer_in_a_process_that_imported_torch_has_its_first_pass_at_once():
    """A warmed worker (torch imported): the first pass is built in the constructor, so the first rows
    the scorer gets are scored through it, not in float32 while a thread imports torch."""
    import torch  # noqa: F401  (what warm_first_pass leaves in a worker process)

    q = {"u": joins.Queries(["a"], {"clip": l2_normalize(np.ones((1, 8)))})}
    scorer = joins.TopKScorer(q, 2, first_pass="bfloat16")
    assert scorer.first_pass is not None  # no waiting: `warmed()` would wait for a thread
    x = l2_normalize(np.arange(24, dtype=np.float32).reshape(3, 8) + 1)
    scorer(pa.table({"train_id": ["x", "y", "z"], "clip_embedding": embedding_array(x, 8), "path": ["p"] * 3}))
    assert scorer.rows_first_pass == 3


def test_join_workers_are_warmed_only_for_a_cpu_join_through_the_first_pass(monkeypatch):
    """No warming tasks for a GPU join or one in float32; a warming task imports torch only where the
    join's scorer would use the pass (`auto`: on a CPU with bfloat16 in hardware)."""
    cpu = runtime.JoinPlan.fixed(2, num_gpus=0.0, num_cpus=1.0, threads=1)
    gpu = runtime.JoinPlan.fixed(2, num_gpus=1.0, num_cpus=0.5, threads=1)
    monkeypatch.setattr(joins, "bfloat16_native", lambda: True)
    assert joins.warm_join_workers(gpu, "bfloat16", 10**13) == []  # a GPU actor multiplies on its device
    assert joins.warm_join_workers(cpu, "none", 10**13) == []
    assert joins.warm_join_workers(cpu, "auto", joins.AUTO_FIRST_PASS_MACS_WARMED - 1) == []  # too small to repay
    built = []
    monkeypatch.setattr(joins, "BFloat16FirstPass", built.append)
    joins.warm_first_pass(3, "auto")
    assert built == [3]
    monkeypatch.setattr(joins, "bfloat16_native", lambda: False)  # the worker's own CPU decides `auto`
    joins.warm_first_pass(3, "auto")
    joins.warm_first_pass(3, "none")
    assert built == [3]
    joins.warm_first_pass(3, "bfloat16")
    assert built == [3, 3]


def test_a_warming_that_ray_refuses_is_logged_and_the_scan_goes_on(tmp_path, monkeypatch, caplog):
    """The warming is only a speed-up: when Ray refuses its tasks (here a plan asking for -1 CPUs, which
    Ray's own option check rejects) the scan logs it and its join starts cold instead of failing."""
    from raymem import pipeline
    from raymem.config import parse_config

    write_training(tmp_path / "train", np.random.default_rng(3), sizes=[40])
    training = sources.inspect_training(str(tmp_path / "train"), {"clip": 16})
    cfg = parse_config(
        {
            "name": "t",
            "model": {"id": "org/model"},
            "prompts": "p.jsonl",
            "training": {"embeddings": str(tmp_path / "train")},
            "output": {"uri": str(tmp_path / "out")},
            "join": {"first_pass": "bfloat16"},
        }
    )
    refused = runtime.JoinPlan.fixed(1, num_gpus=0.0, num_cpus=-1.0, threads=1)
    monkeypatch.setattr(runtime, "plan_join", lambda *args: refused)
    monkeypatch.setattr(runtime.ClusterResources, "current", classmethod(lambda cls: None))
    with caplog.at_level("WARNING", logger="raymem.pipeline"):
        assert pipeline._warm_join(cfg, training, ["u"] * 10, "cpu") == []
    assert "join warming not started (ValueError" in caplog.text


@pytest.mark.ray
def test_a_join_after_warming_scores_every_row_through_the_first_pass(local_ray, tmp_path):
    """The warming tasks leave torch imported in the workers; the join's tasks then run there (Ray hands a
    task the worker that went idle last) and score every row in bfloat16 from the first, exactly."""
    from raymem.config import ActorRange

    rng = np.random.default_rng(11)
    ids, clip, _ = write_training(tmp_path / "train", rng, sizes=[300, 200])
    training = sources.inspect_training(str(tmp_path / "train"), {"clip": 16})
    plan = runtime.plan_join(ActorRange(1, 1), runtime.ClusterResources.current())
    pids = local_ray.get(joins.warm_join_workers(plan, "bfloat16", 10**13))
    assert len(pids) == plan.actors
    q = l2_normalize(rng.standard_normal((9, 16)))
    stats: dict = {}
    result = joins.nearest_neighbours(
        training,
        {"u": joins.Queries([f"q{i}" for i in range(9)], {"clip": q})},
        5,
        plan=plan,
        first_pass="bfloat16",
        stats=stats,
    )
    assert stats == {"rows_scored": 500, "rows_first_pass": 500}
    for (exp_ids, _), rows in zip(brute_force(q, clip, ids, 5), result["u"]["clip"].rows):
        assert [r["train_id"] for r in rows] == exp_ids


def test_a_scan_joins_in_the_workers_it_warmed_while_generating(two_scans):
    """Scan B forces the first pass: its join workers were warmed while its images were generated, so
    every training row went through it (a cold worker scores this small table in float32 before torch is
    imported). Scan A (auto, too small a join to repay the pass) scored all in float32."""
    _, a, b = two_scans
    assert b.counts["join"]["rows_first_pass"] == b.counts["join"]["rows_scored"] > 0
    assert a.counts["join"] == {"rows_scored": b.counts["join"]["rows_scored"], "rows_first_pass": 0}
