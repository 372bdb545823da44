"""A scan's reads of the training table: the whole-table passes on reads of their own, against the same
passes riding along the exact join's read (`raymem.passes`), measured in one run on one machine.

    python bench/table_passes_bench.py                 # 1,000,000 rows, list storage
    python bench/table_passes_bench.py --storage packed

Separate: `check_train_ids` (the ids), `entity_stats` (tags and CLIP embeddings) and the exact join, each
reading the table, as a scan did before 2026-12-01. Together: one join whose actors run the id check and
the entity statistics on the rows they read. Both are timed `--repeat` times, interleaved (the machine's
speed drifts); the ratio of each pair is printed, and the two must give the same neighbours, entity
counts, centroids and work copies. Data: unit vectors around 2,000 centres (bench/join_bench.py's),
30 % of rows tagged with 1-2 of 200 entities, a caption and an image_uri per row, written once under
--work (100,000 rows per file, 65,536-row row groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from join_bench import cluster_centers, clustered  # noqa: E402  (names the BLAS kernels, puts raymem on the path)


def make_table(root: Path, rows: int, dim: int, storage: str, entities: int = 200) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.outputs import parquet_options
    from raymem.schema import stored_embedding_array

    if (root / "_COMPLETE").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centers = cluster_centers(dim)
    names = np.array([f"entity{i:03d}" for i in range(entities)])
    for f, start in enumerate(range(0, rows, 100_000)):
        n = min(100_000, rows - start)
        ids = [f"t{start + i:09d}" for i in range(n)]
        tagged = rng.random(n) < 0.3
        tags = [list(rng.choice(names, rng.integers(1, 3), replace=False)) if t else [] for t in tagged]
        table = pa.table(
            {
                "train_id": ids,
                "clip_embedding": stored_embedding_array(clustered(rng, centers, n), dim, storage),
                "caption": [f"a photo of item {t}" for t in ids],
                "entities": pa.array(tags, pa.list_(pa.string())),
                "image_uri": [f"s3://bucket/images/{t}.jpg" for t in ids],
            }
        )
        pq.write_table(table, root / f"part-{f:05d}.parquet", row_group_size=65_536, **parquet_options(table.schema))
    (root / "_COMPLETE").write_text("")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--storage", default="list", choices=["list", "packed", "packed-float16"])
    parser.add_argument("--entities", type=int, default=30, help="entities the scan asks about")
    parser.add_argument("--work-copies", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", default="build/bench-passes")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import ray

    from raymem import runtime
    from raymem.config import ActorRange
    from raymem.entity_stats import EntityStatsPass, entity_stats
    from raymem.join import Queries, nearest_neighbours
    from raymem.sources import inspect_training
    from raymem.train_ids import TrainIdCheck, check_train_ids

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = make_table(
        Path(args.work).absolute() / f"rows-{args.rows}-{args.storage}", args.rows, args.dim, args.storage
    )
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    training = inspect_training(str(root), {"clip": args.dim})
    rng = np.random.default_rng(1)
    queries = {
        "u": Queries(
            [f"q{i}" for i in range(args.queries)], {"clip": clustered(rng, cluster_centers(args.dim), args.queries)}
        )
    }
    wanted = {f"entity{i:03d}" for i in range(0, 200, max(1, 200 // args.entities))}
    works = set(sorted(wanted)[:3])
    plan = runtime.plan_join(ActorRange(1, 1), runtime.ClusterResources.current())
    join = dict(plan=plan, first_pass="none")  # float32 in both: the passes are what is compared
    nearest_neighbours(training, queries, args.k, **join)  # first-use costs paid before anything is timed

    def separate():
        t = {}
        start = time.perf_counter()
        check_train_ids(training)
        t["check_train_ids"] = time.perf_counter() - start
        start = time.perf_counter()
        stats = entity_stats(training, wanted, works, args.work_copies)
        t["entity_stats"] = time.perf_counter() - start
        start = time.perf_counter()
        result = nearest_neighbours(training, queries, args.k, **join)
        t["join"] = time.perf_counter() - start
        return sum(t.values()), t, result, stats

    def together():
        stats = EntityStatsPass(training, wanted, works, args.work_copies)
        start = time.perf_counter()
        result = nearest_neighbours(training, queries, args.k, **join, passes=[TrainIdCheck(training.num_rows), stats])
        return time.perf_counter() - start, result, stats.result()

    out = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "storage": args.storage,
        "entities": len(wanted),
        "machine": f"{os.cpu_count()} CPUs",
        "runs": [],
    }
    for r in range(args.repeat):
        t_sep, parts, res_sep, stats_sep = separate()
        t_tog, res_tog, stats_tog = together()
        same_neighbours = all(
            [(x["train_id"], x["score"]) for x in a] == [(x["train_id"], x["score"]) for x in b]
            for a, b in zip(res_sep["u"]["clip"].rows, res_tog["u"]["clip"].rows)
        )
        same_stats = all(
            stats_sep[e].count == stats_tog[e].count
            and stats_sep[e].work_copies == stats_tog[e].work_copies
            and np.allclose(stats_sep[e].centroid, stats_tog[e].centroid, rtol=1e-6, atol=1e-7)
            for e in wanted
        )
        run = {
            "separate_seconds": t_sep,
            "separate_parts": parts,
            "together_seconds": t_tog,
            "ratio": t_sep / t_tog,
            "same_neighbours": same_neighbours,
            "same_entity_stats": same_stats,
        }
        out["runs"].append(run)
        print(
            f"run {r + 1}: separate {t_sep:.1f}s ("
            + ", ".join(f"{k} {v:.1f}s" for k, v in parts.items())
            + f") vs together {t_tog:.1f}s -> {t_sep / t_tog:.2f}x; same neighbours {same_neighbours}, "
            f"same entity stats {same_stats}",
            flush=True,
        )
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(r["same_neighbours"] and r["same_entity_stats"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
