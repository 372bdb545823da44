"""The nearest-neighbour join: top-k of every generated image against the training embeddings.

Exact mode streams the training table (any `raymem.sources` layout; local or s3://) through Ray
Data (CPU: tasks in reused worker processes; GPU: an actor per GPU), sharded by the source's
fragments: work items of ~`join.batch_rows` rows that each scorer reads itself, so embeddings never
cross the object store. A scorer holds the query matrices (put once in the object store), reads the
next item in a thread while it scores the current one with one matrix product per query tile (numpy
sgemm on CPUs, torch on its GPU when Ray gave it one), checks the embeddings (dimension, NaN/inf,
zero norm), and returns only the item's top-k per query. On CPUs that multiply bfloat16 in hardware
(`join.first_pass`), a bfloat16 product scores every row first and only the rows within its proven
error bound of a top-k are re-scored in float32: the same exact top-k for about a third of the
multiply. The driver folds candidates into a running (Q, k) top-k with vectorised sorts. Peak memory
is bounded by the item size and Q * k, never by the number of training rows.

FAISS mode searches per shard the IVF indexes `raymem index --faiss` built next to the shards, and
merges the per-shard top-k the same way: approximate, with recall measured at index time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_limits

from raymem import runtime
from raymem.candidates import CANDIDATES, Queries, candidates_table
from raymem.errors import InputError
from raymem.passes import TablePass, fold_all, indexed, packed_row, run_passes, struct_of, unpacked
from raymem.schema import META_COLUMNS, NEIGHBORS, SPACE_COLUMNS
from raymem.sources import TrainingTable, checked_matrix, source_for, to_text

__all__ = ["Queries", "RunningTopK", "nearest_neighbours", "neighbors_table"]

log = logging.getLogger(__name__)

# Scores per query tile: bounds the (tile, batch) score matrix to ~256 MiB of float32.
MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


def bfloat16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX): there the bfloat16 product
    takes about a third of sgemm's time; elsewhere it is emulated and slower than float32."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def bfloat16_error_bound(dim: int, norms: float = 1.0) -> float:
    """The largest |bfloat16 score - float32 score| of two `dim`-vectors whose norms multiply to at most
    `norms`: both inputs rounded to bfloat16 (unit roundoff u = 2^-8, so 2u + u^2 of sum |q_i x_i|, which
    is at most the norms' product), their products summed in float32 (dim * 2^-24), the sum rounded to
    bfloat16 (u); 25 % margin on top."""
    u = 2.0**-8
    return 1.25 * (3 * u + 3 * u * u + dim * 2.0**-24) * norms


def float32_error_bound(dim: int, norms: float = 1.0) -> float:
    """The largest difference between two float32 computations of the same `dim`-dot product summed in
    different orders (sgemm's blocking, exact_scores' einsum): each within dim * 2^-24 of the exact sum
    of |q_i x_i| <= the norms' product; 25 % margin on top."""
    return 1.25 * 2 * dim * 2.0**-24 * norms


# checked_matrix leaves a training row unnormalised only when its squared norm is within 1e-3 of 1
ROW_NORM_MAX = float(np.sqrt(1.001))

# `join.first_pass: auto` uses the bfloat16 pass only for joins of at least this many multiply-adds
# (training rows x queries x dimension): below it, importing torch in each join worker (2-3 s of a core)
# costs about what the pass saves. Measured on 2 cores (docs/join.md, 2026-12-02): float32 faster at
# 1.6e11, level at 5.4e11, bfloat16 twice as fast at 1.6e12.
AUTO_FIRST_PASS_MACS = 10**12
# The same for a join whose workers were warmed beforehand (`warm_join_workers`, as a scan does while it
# generates): torch's import is off the join, so the pass repays itself on smaller joins. Measured on
# 2 cores (docs/join.md, 2026-12-02, later), warmed bfloat16 against float32: 0.70 vs 0.60 s at 1.6e10,
# 0.93-1.47 vs 1.36-1.74 s at 5.2e10, 2.1-2.6 vs 4.2-5.0 s at 1.6e11.
AUTO_FIRST_PASS_MACS_WARMED = 5 * 10**10


def first_pass_for(first_pass: str, training_rows: int, queries: dict[str, Queries], warmed: bool = False) -> str:
    """`join.first_pass` as the join's scorers get it: `auto` stays `auto` (each then checks its own
    CPU) only for joins large enough to repay the pass (smaller ones when the workers were `warmed`)."""
    return first_pass_for_macs(first_pass, join_macs(training_rows, queries), warmed)


def join_macs(training_rows: int, queries: dict[str, Queries]) -> int:
    """The multiply-adds of a join: training rows x queries x dimension, over every query set and space."""
    return training_rows * sum(len(qs.ids) * m.shape[1] for qs in queries.values() for m in qs.matrices.values())


def first_pass_for_macs(first_pass: str, macs: int, warmed: bool = False) -> str:
    """`first_pass_for` of a join of `macs` multiply-adds (known before its queries are)."""
    if first_pass != "auto":
        return first_pass
    return "auto" if macs >= (AUTO_FIRST_PASS_MACS_WARMED if warmed else AUTO_FIRST_PASS_MACS) else "none"


def wants_first_pass(first_pass: str) -> bool:
    """Whether a CPU scorer given `first_pass` (as `first_pass_for` returns it) builds the bfloat16 pass."""
    return first_pass == "bfloat16" or (first_pass == "auto" and bfloat16_native())


def torch_imported() -> bool:
    """Whether this process has imported torch (a warmed join worker): a first pass then costs ~10 ms."""
    return "torch" in sys.modules


def warm_first_pass(threads: int, first_pass: str = "bfloat16") -> int:
    """Import torch and check its bfloat16 product in this worker process (a Ray task of
    `warm_join_workers`), so that a join scorer later built here has its first pass at once; nothing
    where the scorer would not build it (`auto` on a CPU without bfloat16 in hardware). The pid."""
    if not wants_first_pass(first_pass):
        return os.getpid()
    try:
        BFloat16FirstPass(threads)
    except Exception as err:  # the join's own scorer says so again, and scores in float32
        log.warning("join: bfloat16 first pass unavailable (%s)", err)
    return os.getpid()


def warm_join_workers(plan: runtime.JoinPlan, first_pass: str, macs: int) -> list:
    """Start warming the worker processes a CPU join of `macs` multiply-adds will run in (one Ray task
    per join task it runs at once; `warm_first_pass`), when the join will use the bfloat16 first pass.
    A scan calls this while its images are being generated: importing torch costs each join worker
    2-3 s of a core, which a cold join pays beside its first items (docs/join.md). Returns the tasks'
    refs, nothing to wait for: a join in a worker that missed the warming imports torch itself.

    Ray hands a task the worker that went idle last, so a join that follows the warming with no other
    tasks in between runs in the warmed workers."""
    import ray

    first_pass = first_pass_for_macs(first_pass, macs, warmed=True)
    if plan.num_gpus or first_pass == "none":
        return []
    warm = ray.remote(warm_first_pass).options(**plan.remote_args(), name="warm_join_workers")
    return [warm.remote(plan.threads, first_pass) for _ in range(plan.actors)]  # `auto`: each checks its CPU


class BFloat16FirstPass:
    """The bfloat16 product of a CPU join scorer (torch, whose CPU kernels accumulate bfloat16 products
    in float32). A self-check on random rows refuses a backend whose error exceeds the bound."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.queries: dict[tuple, tuple] = {}  # key -> (the query matrix in bfloat16, its row norms)
        # Reused for every item: written into fresh memory (page faults on 128 MiB each time) the product
        # of a 65,536-row item took twice as long, and the conversion to bfloat16 three times (docs/join.md).
        self.buffers: dict[str, object] = {}
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, 256)).astype(np.float32) for n in (64, 512))
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        approx, bound = self.scores(("self-check",), a, self.rows(b))
        error = float(np.abs(approx.float().numpy() - a @ b.T).max())
        if error > bound:
            raise RuntimeError(f"bfloat16 products off by {error:.4f}, beyond the bound: not used")

    def _buffer(self, name: str, shape: tuple[int, int]):
        """A bfloat16 `shape` view of the reusable buffer `name` (grown when too small)."""
        size = shape[0] * shape[1]
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < size:
            flat = self.buffers[name] = self.torch.empty(size, dtype=self.torch.bfloat16)
        return flat[:size].view(shape)

    def rows(self, x: np.ndarray):
        """`x` in bfloat16: a view of a reused buffer, valid until the next call."""
        out = self._buffer("rows", x.shape)
        with warnings.catch_warnings():  # a read-only array (Arrow's buffer) is only read, into a copy
            warnings.simplefilter("ignore", UserWarning)
            out.copy_(self.torch.from_numpy(x))
        return out

    def scores(self, key: tuple, q: np.ndarray, rows, start: int = 0, stop: int | None = None):
        """The bfloat16 scores of queries `q[start:stop]` against `rows` (a torch tensor), and the bound on
        their error; the scores are a view of a reused buffer, valid until the next call. `q` is converted
        once and cached under `key` whole: the query tiles change with each batch's size, so a tile is a
        slice of the cached matrix, never a cache entry of its own."""
        cached = self.queries.get(key)
        if cached is None:
            # a writable copy (the queries come read-only from the object store; torch warns on those)
            qb = self.torch.from_numpy(np.array(q, dtype=np.float32, order="C")).to(self.torch.bfloat16)
            cached = self.queries[key] = (qb, np.linalg.norm(q, axis=1))
        qb, norms = cached
        stop = len(q) if stop is None else min(stop, len(q))
        bound = bfloat16_error_bound(q.shape[1], float(norms[start:stop].max()) * ROW_NORM_MAX)
        tile = qb[start:stop]
        out = self._buffer("scores", (len(tile), rows.shape[0]))
        self.torch.mm(tile, rows.T, out=out)
        return out, bound


def exact_scores(q: np.ndarray, x: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65_536):
    """float32 dot products of the (query row, training row) pairs, in chunks (bounded gathers)."""
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        out[start : start + chunk] = np.einsum("ij,ij->i", q[r], x[c])
    return out


class TopKScorer:
    """Ray Data callable class: a batch of training rows in, the rows of that batch that can still be in
    some query's top-k out (at most the batch's top-k per query, ties kept)."""

    def __init__(self, queries_ref, k: int, threads: int = 1, first_pass: str = "none"):
        import ray

        queries = ray.get(queries_ref) if isinstance(queries_ref, ray.ObjectRef) else queries_ref
        self.device = "cpu"
        if ray.is_initialized() and ray.get_gpu_ids():
            import torch  # only GPU actors pay for importing torch

            if torch.cuda.is_available():
                self.device = "cuda"
        self.threads = threads
        self.k = k
        self._first_pass: BFloat16FirstPass | None = None
        self._warming = None
        self.rows_first_pass = 0  # rows this scorer scored through the bfloat16 first pass
        if self.device == "cpu" and wants_first_pass(first_pass):
            if torch_imported():  # a warmed worker (warm_join_workers): the pass is built in ~10 ms
                self._first_pass = self._built(lambda: BFloat16FirstPass(threads))
            else:
                # Only then does a CPU scorer import torch: 2-3 s, in a thread, while the first items are
                # scored in float32 (the results are the same either way; only the speed changes).
                warmer = concurrent.futures.ThreadPoolExecutor(1, "bfloat16-first-pass")
                self._warming = warmer.submit(BFloat16FirstPass, threads)
                warmer.shutdown(wait=False)  # its one task still runs; the thread ends with it

        def place(m):
            m = np.ascontiguousarray(m, dtype=np.float32)
            if self.device == "cuda":
                import torch

                return torch.from_numpy(m).to("cuda")
            return m

        self.query_sets = [
            (name, {s: place(m) for s, m in qs.matrices.items()}, self._self_keys(qs)) for name, qs in queries.items()
        ]
        # Per (query set, space): the k best scores this scorer has seen per query. Their k-th is a floor
        # below which no later row can enter that query's top-k, so most scores are discarded by one
        # compare instead of a top-k selection (CPU path).
        self.best: dict[tuple[str, str], np.ndarray] = {}

    @property
    def first_pass(self) -> BFloat16FirstPass | None:
        """The bfloat16 first pass once it is ready; None while torch is still being imported, when it was
        not asked for, or when it failed its self-check."""
        if self._warming is not None and self._warming.done():
            self._take_first_pass()
        return self._first_pass

    def warmed(self) -> BFloat16FirstPass | None:
        """The first pass, waiting for it to be ready (tests; a join never waits)."""
        if self._warming is not None:
            self._take_first_pass()
        return self._first_pass

    def _take_first_pass(self) -> None:
        warming, self._warming = self._warming, None
        self._first_pass = self._built(warming.result)

    @staticmethod
    def _built(build) -> BFloat16FirstPass | None:
        try:
            return build()
        except Exception as err:  # an unusable bfloat16 backend costs speed, never results
            log.warning("join: bfloat16 first pass unavailable (%s); scoring in float32", err)
            return None

    @staticmethod
    def _self_keys(qs: Queries) -> dict[str, list[int]] | None:
        """For background queries: id or image hash -> the query rows that must not match it."""
        if not qs.exclude_self:
            return None
        keys: dict[str, list[int]] = {}
        for i, (tid, h) in enumerate(zip(qs.ids, qs.hashes or [None] * len(qs.ids))):
            keys.setdefault(f"id:{tid}", []).append(i)
            if h:
                keys.setdefault(f"hash:{h}", []).append(i)
        return keys

    def _masks(self, batch: pa.Table, keys: dict[str, list[int]]) -> list[tuple[int, int]]:
        """(query row, batch row) pairs to exclude: the query itself and exact duplicates of it."""
        pairs = []
        ids = to_text(batch.column("train_id")).to_pylist()
        hashes = batch.column("image_hash").to_pylist() if "image_hash" in batch.column_names else [None] * len(ids)
        for j, (tid, h) in enumerate(zip(ids, hashes)):
            for key in (f"id:{tid}", f"hash:{h}" if h else None):
                for qi in keys.get(key, ()) if key else ():
                    pairs.append((qi, j))
        return pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        parts = []
        first_pass = self.first_pass  # one scoring path for the whole batch
        self.rows_first_pass += n if first_pass is not None else 0
        for name, mats, self_keys in self.query_sets:
            masks = self._masks(batch, self_keys) if self_keys is not None else []
            for space, q in mats.items():
                col = SPACE_COLUMNS[space]
                if col not in batch.column_names or n == 0:
                    continue
                x = checked_matrix(batch, col, q.shape[1])
                k = min(self.k, n)
                best = self.best.setdefault((name, space), np.full((q.shape[0], self.k), -np.inf, np.float32))
                tile = max(1, MAX_SCORE_ELEMENTS // n)
                xb = first_pass.rows(x) if first_pass is not None else None
                for start in range(0, q.shape[0], tile):
                    tile_masks = [(qi - start, j) for qi, j in masks if start <= qi < start + tile]
                    qt = q[start : start + tile]
                    if self.device == "cuda":
                        rows, vals, idx = self._topk_cuda(qt, x, k, tile_masks)
                        parts.append((name, space, rows + start, vals, idx))
                        continue
                    if xb is not None:
                        approx, bound = first_pass.scores((name, space), q, xb, start, start + tile)
                    else:
                        with threadpool_limits(limits=self.threads, user_api="blas"):
                            approx = qt @ x.T
                        bound = float32_error_bound(q.shape[1], float(np.linalg.norm(qt, axis=1).max()) * ROW_NORM_MAX)
                    for qi, j in tile_masks:
                        approx[qi, j] = -float("inf")
                    # Both paths report the same float32 scores (exact_scores of the kept entries): a join
                    # whose first pass becomes ready part-way gives what either path alone gives, ties included.
                    rows, idx, vals = top_rows_bounded(
                        approx,
                        k,
                        best[start : start + tile],
                        bound,
                        lambda r, c, qt=qt, x=x: exact_scores(qt, x, r, c),
                    )
                    parts.append((name, space, rows + start, vals, idx))
        return candidates_table(batch, parts)

    def _topk_cuda(self, q, x: np.ndarray, k: int, masks=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        scores = q @ torch.from_numpy(x).to(q.device).T
        for qi, j in masks:
            scores[qi, j] = -float("inf")
        vals, idx = torch.topk(scores, k, dim=1)
        rows = np.repeat(np.arange(vals.shape[0], dtype=np.int32), k)
        return rows, vals.cpu().numpy().reshape(-1), idx.cpu().numpy().reshape(-1)


def top_rows(scores: np.ndarray, k: int, best: np.ndarray, block: int = 1024) -> tuple[np.ndarray, ...]:
    """(query row, column, score) of every score that can be in its row's top-k: at most the top-k
    of each row of `scores`, ties at the k-th kept, and only scores at or above the row's floor.

    `best` (rows, >= k) holds the best scores seen so far per row (updated in place); its k-th is the
    floor. Exact: the floor, and the k-th largest of this matrix's block maxima (k distinct entries
    reach it), are each at most the row's true k-th best, so nothing dropped could be in the top-k.
    Costs about one pass over `scores` (block maxima) plus work on the few blocks that reach the floor.
    """
    return top_rows_bounded(scores, k, best, 0.0, lambda rows, cols: scores[rows, cols], block)


def top_rows_bounded(approx, k: int, best: np.ndarray, error: float, rescore, block: int = 1024):
    """`top_rows` from approximate scores: `approx` (numpy, or the first pass's torch tensor) is within
    +-`error` of the true scores, and `rescore(rows, cols)` returns the true scores of those entries.
    Every entry whose approximate score could still belong to its row's top-k is re-scored exactly, the
    rest are dropped.

    Exact: an entry whose true score reaches the row's k-th best has approx >= (k-th best - error); the
    k-th best is at least the floor in `best`, and at least (k-th largest approximate block maximum -
    error) since k distinct entries have an approximate score that high. So every entry below both
    lowered floors is provably out of the top-k, and the kept ones carry their true scores."""
    rows, cols = _candidates(approx, k, best[:, best.shape[1] - 1] - error, error, block)
    return _keep_top(rows, cols, rescore(rows, cols), approx.shape[0], k, best)


def _candidates(scores, k: int, floor: np.ndarray, error: float, block: int):
    """(row, column) of every entry at or above the row's floor, or above its k-th largest block maximum
    less 2 x `error` (one pass for the block maxima, then only the blocks that reach the floor)."""
    q, n = scores.shape
    # a masked entry (-inf: a query and itself) is never a candidate, even before any floor is known
    floor = np.maximum(floor, -np.finfo(np.float32).max)
    block = max(1, min(block, n // k))
    nb = n // block
    if isinstance(scores, np.ndarray):
        # a view of the full blocks (a reshape of the column slice would copy the matrix)
        s0, s1 = scores.strides
        body = np.lib.stride_tricks.as_strided(scores, (q, nb, block), (s0, block * s1, s1), writeable=False)
        maxima = body.max(axis=2)

        def blocks(qi, bi):
            return body[qi, bi]

        def tail():
            return scores[:, nb * block :]
    else:  # a torch tensor (the bfloat16 first pass): reduce there, convert only the blocks looked at
        import torch

        body = scores.contiguous().as_strided((q, nb, block), (n, block, 1))
        maxima = body.amax(dim=2).float().numpy()

        def blocks(qi, bi):
            return body[torch.from_numpy(qi), torch.from_numpy(bi)].float().numpy()

        def tail():
            return scores[:, nb * block :].float().numpy()

    if nb >= k:  # the k-th largest block maximum: k distinct scores reach it
        floor = np.maximum(floor, np.partition(maxima, nb - k, axis=1)[:, nb - k] - 2 * error)
    qi, bi = np.nonzero(maxima >= floor[:, None])
    r, c = np.nonzero(blocks(qi, bi) >= floor[qi][:, None])
    rows, cols = qi[r], bi[r] * block + c
    if nb * block < n:  # the columns past the last full block
        tr, tc = np.nonzero(tail() >= floor[:, None])
        rows, cols = np.concatenate([rows, tr]), np.concatenate([cols, tc + nb * block])
    return rows, cols


def _keep_top(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, q: int, k: int, best: np.ndarray):
    """Of the candidate (row, column, score)s, each row's top k with ties at the k-th, folded into `best`."""
    kk = best.shape[1]
    # keep each row's top k, with ties at the k-th
    order = np.lexsort((-vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(q))
    rank = np.arange(len(rows)) - starts[rows]
    counts = np.bincount(rows, minlength=q)
    kth = np.full(q, -np.inf, np.float32)
    full = counts >= k
    kth[full] = vals[starts[full] + k - 1]
    keep = vals >= kth[rows]
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # fold the kept scores into `best`
    top = rank[keep] < kk
    merged = np.full((q, kk), -np.inf, np.float32)
    merged[rows[top], rank[keep][top]] = vals[top]
    both = np.concatenate([best, merged], axis=1)
    best[:] = -np.sort(-both, axis=1)[:, :kk]
    return rows.astype(np.int32), cols.astype(np.int64), vals.astype(np.float32)


class RunningTopK:
    """Per-query top-k kept on the driver: (Q, k) scores and ids, plus the kept rows' metadata.

    Candidates are folded with one lexicographic sort (query, -score, train_id): results never
    depend on the order batches arrive in, ties included.
    """

    def __init__(self, num_queries: int, k: int, exclude: list[str] | None = None):
        self.num_queries, self.k = num_queries, k
        self.scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        self.ids = np.full((num_queries, k), None, dtype=object)
        self.paths = np.full((num_queries, k), None, dtype=object)
        self.meta: dict[str, dict] = {}
        self.exclude = np.asarray(exclude, dtype=object) if exclude is not None else None

    def add(self, query: np.ndarray, score: np.ndarray, ids: np.ndarray, paths: np.ndarray, meta: list[dict]) -> None:
        query, score = np.asarray(query, np.int64), np.asarray(score, np.float32)
        ids, paths = np.asarray(ids, dtype=object), np.asarray(paths, dtype=object)
        if self.exclude is not None or not np.isfinite(score).all():  # masked by the scorer: -inf
            keep = np.isfinite(score)
            if self.exclude is not None:
                keep &= ids != self.exclude[query]
            query, score, ids, paths = query[keep], score[keep], ids[keep], paths[keep]
            meta = [m for m, k in zip(meta, keep) if k]
        held = np.isfinite(self.scores)
        q_all = np.concatenate([np.nonzero(held)[0], query])
        s_all = np.concatenate([self.scores[held], score])
        id_all = np.concatenate([self.ids[held], ids])
        path_all = np.concatenate([self.paths[held], paths])
        uniq, id_rank = np.unique(id_all.astype(str), return_inverse=True)
        order = np.lexsort((id_rank, -s_all, q_all))
        q_all, s_all, id_all, path_all, id_rank = (a[order] for a in (q_all, s_all, id_all, path_all, id_rank))
        same = (q_all[1:] == q_all[:-1]) & (id_rank[1:] == id_rank[:-1])
        if same.any():
            i = int(np.flatnonzero(same)[0])
            where = (path_all[i], path_all[i + 1])
            if where[0] != where[1]:
                raise InputError(
                    str(where[1]), f"duplicate train_id '{id_all[i]}' (also in {where[0]})", field="train_id"
                )
            raise InputError(str(where[0]), f"duplicate train_id '{id_all[i]}'", field="train_id")
        starts = np.searchsorted(q_all, np.arange(self.num_queries))
        rank = np.arange(len(q_all)) - starts[q_all]
        keep = rank < self.k
        self.scores.fill(-np.inf)
        self.ids.fill(None)
        self.paths.fill(None)
        self.scores[q_all[keep], rank[keep]] = s_all[keep]
        self.ids[q_all[keep], rank[keep]] = id_all[keep]
        self.paths[q_all[keep], rank[keep]] = path_all[keep]
        for tid, m in zip(ids, meta):
            self.meta.setdefault(tid, m)
        if len(self.meta) > 4 * self.num_queries * self.k:  # forget rows that fell out of every top-k
            live = set(self.ids[np.isfinite(self.scores)])
            self.meta = {t: m for t, m in self.meta.items() if t in live}

    @property
    def rows(self) -> list[list[dict]]:
        out = []
        for q in range(self.num_queries):
            row = []
            for j in range(self.k):
                if not np.isfinite(self.scores[q, j]):
                    break
                tid = self.ids[q, j]
                row.append(
                    {
                        **self.meta.get(tid, {}),
                        "train_id": tid,
                        "score": float(self.scores[q, j]),
                        "path": self.paths[q, j],
                    }
                )
            out.append(row)
        return out


DEFAULT_FRAGMENT_ROWS = 65_536


class FragmentScorer(TopKScorer):
    """Ray Data callable class: fragments in, their top-k per query out; the next fragment is read
    in a thread while the current one is scored (pyarrow and BLAS both release the GIL)."""

    def __init__(
        self,
        queries_ref,
        k: int,
        layout: str,
        columns: list[str],
        batch_rows: int | None,
        threads: int = 1,
        first_pass: str = "none",
        passes: list[TablePass] = (),
    ):
        super().__init__(queries_ref, k, threads, first_pass)
        self.source = source_for(layout)
        self.columns, self.batch_rows = columns, batch_rows
        self.passes = list(passes)
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One row: the training rows scored, the candidates, and each pass's partials (`raymem.passes`)."""
        items = batch.to_pylist()
        pending = self.reader.submit(self.source.read, items[0], self.columns) if items else None
        out, scored, first_pass_before = [], 0, self.rows_first_pass
        partials: dict[str, list[pa.Table]] = {p.name: [] for p in self.passes}
        for i, item in enumerate(items):
            table = pending.result()
            scored += table.num_rows
            pending = self.reader.submit(self.source.read, items[i + 1], self.columns) if i + 1 < len(items) else None
            for p in self.passes:  # on the rows as read: the pass sees what a read of its own would
                partials[p.name].append(p.partial(table, item))
            step = self.batch_rows or max(1, table.num_rows)
            for start in range(0, table.num_rows, step):
                out.append(super().__call__(table.slice(start, step)))
        parts = {
            "candidates": pa.concat_tables(out) if out else CANDIDATES.empty_table(),
            **{p.name: pa.concat_tables(partials[p.name]) for p in self.passes},
        }
        types = {"candidates": struct_of(CANDIDATES), **{p.name: struct_of(p.partial_schema) for p in self.passes}}
        return packed_row(parts, types, rows_scored=scored, rows_first_pass=self.rows_first_pass - first_pass_before)


@runtime.reraise_user_errors
def nearest_neighbours(
    training: TrainingTable,
    queries: dict[str, Queries],
    k: int,
    *,
    batch_rows: int | None = None,
    plan: runtime.JoinPlan | None = None,
    mode: str = "exact",
    nprobe: int = 16,
    first_pass: str = "auto",
    passes: list[TablePass] = (),
    stats: dict | None = None,
    warmed: bool = False,
) -> dict[str, dict[str, RunningTopK]]:
    """Top-k for every query set and space: {query_set: {space: RunningTopK}}. `passes` run on the rows
    the exact join reads (on a read of their own in FAISS mode, which reads no rows); each is finished
    when this returns, and its spill removed whatever happens. `stats`, when given, gets the training
    rows scored and how many of them went through the bfloat16 first pass. `warmed`: the caller started
    `warm_join_workers` for this join (`auto` then uses the pass from its lower threshold)."""
    import ray

    plan = plan or runtime.JoinPlan.fixed(1, num_gpus=0.0, num_cpus=1.0)
    passes = list(passes)
    queries_ref = ray.put(queries)
    try:
        if mode == "faiss":
            from raymem.faiss_index import faiss_candidates

            run_passes(training, passes, fragment_rows=DEFAULT_FRAGMENT_ROWS, name="table_passes")
            passes = []
            candidates = faiss_candidates(training, queries_ref, k, nprobe, actors=plan.actors)
        else:
            columns = ["train_id", *[SPACE_COLUMNS[s] for s in training.dims], *META_COLUMNS]
            columns = list(dict.fromkeys([*columns, *(c for p in passes for c in p.columns)]))
            source = source_for(training.layout)
            items = indexed(source.fragments(training, batch_rows or DEFAULT_FRAGMENT_ROWS))
            for p in passes:
                p.start(items, source)
            per_call = 4  # fragments per call: enough to overlap reading with scoring
            candidates = runtime.map_stage(
                "join",
                items,
                FragmentScorer,
                plan,
                constructor_kwargs={
                    "queries_ref": queries_ref,
                    "k": k,
                    "layout": training.layout,
                    "columns": columns,
                    "batch_rows": batch_rows,
                    "threads": plan.threads,
                    "first_pass": first_pass_for(first_pass, training.num_rows, queries, warmed),
                    "passes": passes,
                },
                batch_size=per_call,
                blocks=max(1, min(len(items), -(-len(items) // per_call))),
                reuse_workers=True,  # the floors only prune: any scorer instance gives the same candidates
            )
        result = {
            name: {
                space: RunningTopK(len(qs.ids), k, exclude=qs.ids if qs.exclude_self else None)
                for space in qs.matrices
                if space in training.dims
            }
            for name, qs in queries.items()
        }
        progress = runtime.Progress("join", training.num_rows, "training rows")
        first_passed = 0
        for batch in candidates:
            scored = _column_sum(batch, "rows_scored")
            first_passed += _column_sum(batch, "rows_first_pass")
            if "candidates" in batch.column_names:  # the exact join: one row per call
                fold_all(batch, passes)
                batch = unpacked(batch, "candidates")
            try:
                fold(batch, result)
            except InputError:
                # A train_id in two top-k lists: the id check (when it rides along) has seen both rows
                # (a call's ids are folded before its candidates) and names them, with their rows.
                for p in passes:
                    p.finish()
                raise
            progress.advance(scored)
        progress.done = training.num_rows  # every fragment was scored (a fragment's rows are not in its result)
        progress.finish()
        if mode != "faiss":
            log.info(
                "join: %d of %d training rows scored through the bfloat16 first pass", first_passed, training.num_rows
            )
            if stats is not None:
                stats.update(rows_scored=training.num_rows, rows_first_pass=first_passed)
        for p in passes:
            p.finish()
        return result
    finally:
        for p in passes:
            p.close()


def _column_sum(batch: pa.Table, column: str) -> int:
    """A count over one result batch: `rows_scored` (the training rows behind it) or `rows_first_pass`
    (FragmentScorer marks them; FAISS results do not)."""
    if column not in batch.column_names:
        return 0
    return int(pc.sum(batch.column(column)).as_py() or 0)


def fold(batch: pa.Table, result: dict[str, dict[str, RunningTopK]]) -> None:
    query_set = batch.column("query_set").to_numpy(zero_copy_only=False)
    space = batch.column("space").to_numpy(zero_copy_only=False)
    query = batch.column("query").to_numpy()
    score = batch.column("score").to_numpy()
    ids = batch.column("train_id").to_numpy(zero_copy_only=False)
    paths = (
        batch.column("path").to_numpy(zero_copy_only=False)
        if "path" in batch.column_names
        else np.full(len(ids), None, dtype=object)
    )
    meta_cols = [c for c in META_COLUMNS if c in batch.column_names]
    for name in np.unique(query_set):
        for sp in np.unique(space[query_set == name]):
            sel = np.flatnonzero((query_set == name) & (space == sp))
            meta_table = batch.select(meta_cols).take(pa.array(sel)) if meta_cols else None
            meta = meta_table.to_pylist() if meta_table is not None else [{}] * len(sel)
            result[name][sp].add(query[sel], score[sel], ids[sel], paths[sel], meta)


def neighbors_table(scan_id: str, by_space: dict[str, tuple[list[str], list[list[dict]], str]]) -> pa.Table:
    """The published `neighbors` table: one row per (unit, space, rank), from each space's
    (query ids, rows per query by rank, how they were found: join | candidates)."""
    rows = [
        {
            "scan_id": scan_id,
            "unit_id": ids[qi],
            "space": space,
            "rank": rank,
            **{c: r.get(c) for c in META_COLUMNS},
            "train_id": r["train_id"],
            "score": r["score"],
            "via": via,
            "pair_scores": r.get("pair_scores"),
        }
        for space, (ids, per_query, via) in by_space.items()
        for qi, kept in enumerate(per_query)
        for rank, r in enumerate(kept, start=1)
    ]
    return pa.Table.from_pylist(rows, schema=NEIGHBORS)
