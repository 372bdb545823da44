"""Join benchmarks J1-J3 and the IVF mode, measured in one run on one machine.

    python bench/join_bench.py                      # J1, J2, IVF at 1,000,000 rows
    python bench/join_bench.py --j3                 # also J3: 10,000,000 rows (writes ~20 GB)
    python bench/join_bench.py --storage packed     # the main table with packed embeddings

J1  raymem's exact join over N x 512 float32 rows in Parquet, 1,024 queries, k = 10, in rows/s,
    against FAISS IndexFlatIP searching the same rows already in memory with the same thread count.
    Timed twice with the bfloat16 first pass: in a cold worker (the join imports torch itself, as a join
    run on its own does) and in warmed workers (join.warm_join_workers, as a scan's join runs).
J2  the same join against the time numpy's sgemm takes for the same multiply-adds (no I/O, no top-k).
J3  peak memory of the driver and every Ray process (summed RSS and PSS, sampled every 0.2 s) at
    10 x N rows against N rows.
IVF recall@10 of `join.mode: faiss` (per-shard IVF indexes, nprobe 16) against the exact join, and its
    speed-up.
Data are unit vectors around 2,000 random centres, written once under --work as `raymem index` writes
them (100,000 rows per file, 65,536-row row groups; embeddings stored as --storage, `list` by default);
queries are drawn the same way. The same rows are also joined in the other layouts (--packed, --npy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def _name_the_blas_kernels() -> None:
    """faiss-cpu's bundled OpenBLAS (0.3.15) does not recognise newer CPUs and falls back to its slowest
    kernels (`Prescott`, SSE3): J1 would then be measured against a crippled FAISS (4-5x slower than its
    sgemm on a 2026 Xeon). Name the kernel family the CPU has, before any BLAS loads; numpy's OpenBLAS
    picks the same one on its own. An OPENBLAS_CORETYPE already set is kept."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return
    kernels = "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None
    if kernels:
        os.environ.setdefault("OPENBLAS_CORETYPE", kernels)


_name_the_blas_kernels()

import numpy as np  # noqa: E402  (after the BLAS kernels are named)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_FILE = 100_000


def cluster_centers(dim: int, n: int = 2000) -> np.ndarray:
    c = np.random.default_rng(1234).standard_normal((n, dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(rng, centers: np.ndarray, n: int, spread: float = 0.04) -> np.ndarray:
    """Unit vectors around random centres (cosine ~0.5 to their centre): real embeddings cluster, and
    IVF recall on structureless noise would say nothing about real data."""
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal(
        (n, centers.shape[1]), dtype=np.float32
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_table(root: Path, rows: int, dim: int, seed: int = 0, storage: str = "list") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.outputs import parquet_options
    from raymem.schema import stored_embedding_array

    if storage != "list":
        root = root.with_name(f"{root.name}-{storage}")

    done = root / "_COMPLETE_v3"  # v3: embedding columns uncompressed, as raymem writes them now
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = cluster_centers(dim)
    for f, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        x = clustered(rng, centers, n)
        table = pa.table(
            {
                "train_id": pa.array([f"r{start + i}" for i in range(n)]),
                "clip_embedding": stored_embedding_array(x, dim, storage),
            }
        )
        # Written as `raymem index` writes: embedding columns without dictionary encoding.
        pq.write_table(table, root / f"part-{f:05d}.parquet", row_group_size=65_536, **parquet_options(table.schema))
    done.write_text("ok\n")
    return root


class MemorySampler:
    """Peak summed RSS and PSS of this process and all its descendants (Ray's raylet, workers, ...)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc, self.interval = psutil.Process(os.getpid()), interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            each = []
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                    each.append((info.rss, p.name()))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if rss > self.peak_rss:  # what the peak is made of: the largest processes, in MiB
                self.peak_processes = [f"{name} {r / 2**20:.0f}" for r, name in sorted(each, reverse=True)[:6]]
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_join(
    uri: str | Path,
    queries: np.ndarray,
    k: int,
    mode: str = "exact",
    nprobe: int = 16,
    first_pass: str = "auto",
    warmed: bool = False,
):
    """Join `queries` against the training table at `uri` (a path, or `clip-retrieval:<root>`). `warmed`:
    first warm the join's workers as a scan does while its images are generated (not timed)."""
    import ray

    from raymem import runtime
    from raymem.config import ActorRange
    from raymem.join import Queries, join_macs, nearest_neighbours, warm_join_workers
    from raymem.sources import inspect_training

    training = inspect_training(str(uri), {"clip": queries.shape[1]})
    plan = runtime.plan_join(ActorRange(1, 1), runtime.ClusterResources.current())
    q = {"q": Queries([f"q{i}" for i in range(len(queries))], {"clip": queries})}
    if warmed:
        ray.get(warm_join_workers(plan, first_pass, join_macs(training.num_rows, q)))
    with MemorySampler() as mem:
        mem.driver_rss_at_start = mem.proc.memory_info().rss
        start = time.perf_counter()
        result = nearest_neighbours(
            training,
            q,
            k,
            batch_rows=None,
            plan=plan,
            mode=mode,
            nprobe=nprobe,
            first_pass=first_pass,
            warmed=warmed,
        )
        seconds = time.perf_counter() - start
    return result["q"]["clip"], seconds, mem, training


def clip_retrieval_copy(parquet_root: Path, root: Path, dtype: str) -> Path:
    """The same rows in the clip-retrieval / LAION layout: img_emb/img_emb_N.npy (float32 or float16, as
    LAION ships them) beside metadata/metadata_N.parquet (key, caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymem.schema import embedding_matrix

    done = root / "_COMPLETE"
    if done.exists():
        return root
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    for n, f in enumerate(sorted(parquet_root.glob("part-*.parquet"))):
        table = pq.read_table(f)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", embedding_matrix(table.column("clip_embedding")).astype(dtype))
        ids = table.column("train_id")
        meta = pa.table({"key": ids, "caption": pa.array([f"caption {i}" for i in ids.to_pylist()])})
        pq.write_table(meta, root / "metadata" / f"metadata_{n}.parquet", row_group_size=65_536)
    done.write_text("ok\n")
    return root


def faiss_flat_search(files: list[str], queries: np.ndarray, k: int, shard_rows: int) -> tuple[float, np.ndarray]:
    """FAISS IndexFlatIP over the rows of `files`, held in memory `shard_rows` at a time: seconds spent in
    search (loading and adding not counted), and each query's top-k train_ids merged over the shards."""
    import faiss
    import pyarrow.parquet as pq

    from raymem.schema import embedding_matrix

    seconds, best_scores, best_ids = 0.0, None, None
    groups, group, rows = [], [], 0
    for f in files:
        group.append(f)
        rows += pq.read_metadata(f).num_rows
        if rows >= shard_rows:
            groups.append(group)
            group, rows = [], 0
    groups += [group] if group else []
    for group in groups:
        tables = [pq.read_table(f, columns=["train_id", "clip_embedding"]) for f in group]
        x = np.concatenate([embedding_matrix(t.column("clip_embedding")) for t in tables])
        ids = np.concatenate([t.column("train_id").to_numpy(zero_copy_only=False) for t in tables])
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        start = time.perf_counter()
        scores, idx = index.search(queries, k)
        seconds += time.perf_counter() - start
        shard_ids = ids[idx]
        if best_scores is None:
            best_scores, best_ids = scores, shard_ids
        else:
            both_s, both_i = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, shard_ids], 1)
            order = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            best_scores, best_ids = np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)
        del x, index, tables
    # Hand Arrow's freed buffers back to the system: the driver's resident memory is part of J3, and the
    # 2 GB this baseline read would otherwise stay with the next join (J3 1.3-1.6 instead of ~1.1).
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    return seconds, best_ids


def sgemm_seconds(queries: np.ndarray, rows: int, dim: int, rng) -> float:
    """numpy sgemm of the join's multiply-adds, in 65,536-row blocks already in memory."""
    block = rng.standard_normal((65_536, dim), dtype=np.float32)
    full, rest = divmod(rows, 65_536)
    start = time.perf_counter()
    for _ in range(full):
        queries @ block.T
    if rest:
        queries @ block[:rest].T
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--j3", action="store_true", help="also run J3 at 10x the rows")
    parser.add_argument("--no-ivf", action="store_true")
    parser.add_argument(
        "--npy",
        default="float32,float16",
        help="also join the same rows in the clip-retrieval layout with these .npy dtypes ('' for none)",
    )
    parser.add_argument(
        "--storage",
        default="list",
        choices=["list", "packed", "packed-float16"],
        help="embedding storage of the main table (J1, J2, J3)",
    )
    parser.add_argument(
        "--packed",
        default="packed,packed-float16",
        help="also join the same rows stored packed (raymem index's embedding_storage; '' for none)",
    )
    parser.add_argument(
        "--first-pass",
        default="auto",
        choices=["auto", "none", "bfloat16"],
        help="join.first_pass of the timed joins; with auto or bfloat16 the float32-only join is timed too",
    )
    parser.add_argument("--work", default="build/bench-join")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import faiss
    import ray
    from threadpoolctl import threadpool_info

    from raymem.join import Queries, bfloat16_native, first_pass_for

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.work).absolute()
    t0 = time.perf_counter()
    small = make_table(work / f"rows-{args.rows}", args.rows, args.dim, storage=args.storage)
    print(f"data: {args.rows} x {args.dim} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(1)
    queries = clustered(rng, cluster_centers(args.dim), args.queries)
    # One first pass for every timed join: `auto` would pick float32 at 1 M rows and bfloat16 at 10 M
    # (torch's libraries then sit in the join actor), and J3 would compare two configurations.
    largest = 10 * args.rows if args.j3 else args.rows
    first_pass = args.first_pass
    if first_pass == "auto":
        chosen = first_pass_for("auto", largest, {"q": Queries(["q"] * args.queries, {"clip": queries})})
        first_pass = "bfloat16" if chosen == "auto" and bfloat16_native() else "none"
    print(f"first pass: {first_pass} (--first-pass {args.first_pass})", flush=True)
    out = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "threads": args.threads,
        "machine": f"{os.cpu_count()} CPUs",
        "storage": args.storage,
        "first_pass": first_pass,
        "bfloat16_native": bfloat16_native(),
        "blas": [
            f"{i['internal_api']} {i.get('version')} {i.get('architecture')} ({Path(i['filepath']).name})"
            for i in threadpool_info()
        ],
    }

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    # A scan's join runs after its generation stage has started Ray Data; a 1,000-row join first pays
    # the first-use costs (reported) so that the timed join is the one a scan pays.
    tiny = make_table(work / "rows-1000", 1000, args.dim)
    _, t_first, _, _ = run_join(tiny, queries, args.k)
    _, t_fixed, _, _ = run_join(tiny, queries, args.k)
    out["first_ray_data_join_1000_rows_seconds"], out["fixed_seconds_1000_rows"] = t_first, t_fixed
    print(f"fixed cost: a 1,000-row join {t_fixed:.2f}s (the first in this process {t_first:.2f}s)", flush=True)
    t_np_before = sgemm_seconds(queries, args.rows, args.dim, rng)
    exact, t_ray, mem_small, training = run_join(small, queries, args.k, first_pass=first_pass)
    out["raymem_seconds"] = t_ray
    out["raymem_rows_per_s"] = args.rows / t_ray
    out["peak_rss_bytes"], out["peak_pss_bytes"] = mem_small.peak_rss, mem_small.peak_pss
    print(f"raymem exact join: {t_ray:.2f}s = {args.rows / t_ray:,.0f} rows/s", flush=True)

    # J2: numpy sgemm for the same multiply-adds, in the same 65,536-row blocks, data already in memory.
    # Timed before and after the join and averaged: on a shared VM the GEMM speed drifts over minutes.
    t_np = (sgemm_seconds(queries, args.rows, args.dim, rng) + t_np_before) / 2
    out["numpy_sgemm_seconds"], out["J2_ratio"] = t_np, t_np / t_ray
    print(
        f"numpy sgemm, same multiply-adds: {t_np:.2f}s (before the join {t_np_before:.2f}s) -> "
        f"J2 = {t_np / t_ray:.2f} (target >= 0.7)",
        flush=True,
    )
    # The join as a scan runs it: a scan warms its join workers while its images are generated
    # (join.warm_join_workers: torch imported, the first pass checked), so its join does not pay torch's
    # import. The join above ran in a cold worker and paid it.
    t_warm = None
    if first_pass != "none":
        warm, t_warm, _, _ = run_join(small, queries, args.k, first_pass=first_pass, warmed=True)
        same = np.mean([list(warm.ids[i]) == list(exact.ids[i]) for i in range(args.queries)])
        out.update(raymem_warmed_seconds=t_warm, J2_warmed_ratio=t_np / t_warm)
        print(
            f"raymem exact join in warmed workers (as in a scan): {t_warm:.2f}s -> J2 = {t_np / t_warm:.2f}; "
            f"same top-{args.k} as the cold join for {same:.1%} of queries",
            flush=True,
        )

    def compare(key: str, label: str, uri, join_first_pass: str) -> None:
        """The same rows joined another way: its time, its J2, and how many queries get the timed
        join's top-k (ids, in order)."""
        got, seconds, _, _ = run_join(uri, queries, args.k, first_pass=join_first_pass)
        same = np.mean([list(got.ids[i]) == list(exact.ids[i]) for i in range(args.queries)])
        out[f"{key}_seconds"], out[f"{key}_J2_ratio"] = seconds, t_np / seconds
        print(
            f"raymem exact join, {label}: {seconds:.2f}s -> J2 = {t_np / seconds:.2f}; same top-{args.k} "
            f"(ids, in order) as the timed {args.storage} join for {same:.1%} of queries",
            flush=True,
        )

    # The same join scored in float32 only (no bfloat16 first pass): what the first pass buys.
    if first_pass != "none":
        compare("float32_only", "float32 only", small, "none")
    # The same rows stored otherwise: packed (one fixed-size binary value per row, no list levels to
    # decode) or a list, and in the clip-retrieval layout (.npy embeddings, no Parquet decode).
    for storage in filter(None, args.packed.split(",")):
        if storage != args.storage:
            root = make_table(work / f"rows-{args.rows}", args.rows, args.dim, storage=storage)
            compare(storage, f"Parquet {storage}", root, first_pass)
    for dtype in filter(None, args.npy.split(",")):
        root = clip_retrieval_copy(small, work / f"rows-{args.rows}-npy-{dtype}", dtype)
        compare(f"npy_{dtype}", f"clip-retrieval layout ({dtype} .npy)", f"clip-retrieval:{root}", first_pass)

    # J1: FAISS IndexFlatIP on the same rows held in memory, same thread count.
    faiss.omp_set_num_threads(args.threads)
    t_faiss, faiss_ids = faiss_flat_search(training.files, queries, args.k, args.rows)
    agree = np.mean([set(faiss_ids[i]) == set(exact.ids[i]) for i in range(args.queries)])
    out.update(
        faiss_flat_seconds=t_faiss,
        faiss_rows_per_s=args.rows / t_faiss,
        J1_ratio=t_faiss / t_ray,
        exact_agreement_with_faiss_flat=float(agree),
    )
    warmed = f", in warmed workers {t_faiss / t_warm:.2f}" if t_warm else ""
    if t_warm:
        out["J1_warmed_ratio"] = t_faiss / t_warm
    print(
        f"FAISS IndexFlatIP in memory: {t_faiss:.2f}s -> J1 = {t_faiss / t_ray:.2f}{warmed} (target >= 1.0); "
        f"same top-{args.k} for {agree:.1%} of queries",
        flush=True,
    )

    if not args.no_ivf:
        from raymem.config import FaissConfig
        from raymem.faiss_index import build_indexes

        start = time.perf_counter()
        build_indexes(training, FaissConfig(enabled=True))
        t_build = time.perf_counter() - start
        approx, t_ivf, _, _ = run_join(small, queries, args.k, mode="faiss", nprobe=16)
        recall = np.mean([len(set(approx.ids[i]) & set(exact.ids[i])) / args.k for i in range(args.queries)])
        out.update(
            ivf_build_seconds=t_build, ivf_seconds=t_ivf, ivf_speedup=t_ray / t_ivf, ivf_recall_at_k=float(recall)
        )
        print(
            f"IVF (nprobe 16): {t_ivf:.2f}s, speed-up {t_ray / t_ivf:.2f}x, recall@{args.k} {recall:.3f} "
            f"(index build {t_build:.1f}s, not included)",
            flush=True,
        )

    if args.j3:
        big_rows = 10 * args.rows
        t0 = time.perf_counter()
        big = make_table(work / f"rows-{big_rows}", big_rows, args.dim, seed=2, storage=args.storage)
        print(f"data: {big_rows} x {args.dim} ready in {time.perf_counter() - t0:.1f}s", flush=True)
        exact_big, t_big, mem_big, training_big = run_join(big, queries, args.k, first_pass=first_pass)
        out.update(
            j3_rows=big_rows,
            j3_seconds=t_big,
            j3_peak_rss_bytes=mem_big.peak_rss,
            j3_peak_pss_bytes=mem_big.peak_pss,
            J3_rss_ratio=mem_big.peak_rss / mem_small.peak_rss,
            J3_pss_ratio=mem_big.peak_pss / mem_small.peak_pss,
            J2_ratio_at_j3_rows=10 * t_np / t_big,  # sgemm time is linear in the rows
            peak_processes=mem_small.peak_processes,
            j3_peak_processes=mem_big.peak_processes,
            driver_rss_at_start=mem_small.driver_rss_at_start,
            j3_driver_rss_at_start=mem_big.driver_rss_at_start,
        )
        print(
            f"J3: peak RSS {mem_big.peak_rss / 2**30:.2f} GiB at {big_rows:,} rows vs "
            f"{mem_small.peak_rss / 2**30:.2f} GiB at {args.rows:,} -> {out['J3_rss_ratio']:.2f} (target <= 1.2); "
            f"PSS {out['J3_pss_ratio']:.2f}; {big_rows / t_big:,.0f} rows/s; J2 = {10 * t_np / t_big:.2f}",
            flush=True,
        )
        # J1 at 10 x the rows: the 20 GB do not fit in memory beside the page cache, so FAISS searches
        # them as in-memory IndexFlatIP shards of --rows rows (only the searches timed) and the shards'
        # top-k are merged -- FAISS's in-memory speed over the same rows, and the exactness check.
        t_faiss_big, faiss_big = faiss_flat_search(training_big.files, queries, args.k, args.rows)
        agree = np.mean([set(faiss_big[i]) == set(exact_big.ids[i]) for i in range(args.queries)])
        out.update(
            faiss_flat_seconds_at_j3_rows=t_faiss_big,
            J1_ratio_at_j3_rows=t_faiss_big / t_big,
            exact_agreement_with_faiss_flat_at_j3_rows=float(agree),
        )
        print(
            f"FAISS IndexFlatIP, {big_rows:,} rows in in-memory shards of {args.rows:,}: {t_faiss_big:.2f}s "
            f"-> J1 = {t_faiss_big / t_big:.2f}; same top-{args.k} for {agree:.1%} of queries",
            flush=True,
        )
    ray.shutdown()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
