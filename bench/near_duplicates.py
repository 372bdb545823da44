"""Can any image descriptor group a planted world's near-duplicates without merging distinct images?

The labeler's breadth gate counts near-duplicates of one training image once; two training images are
near-duplicates only above what distinct training images already reach (the train-train background).
On the planted worlds (32 px drawings) SSCD's background p95 is ~0.94, and the varied and template
posters' copies fall apart into many "distinct" images (docs/planted.md, hard cases). This script asks
whether another descriptor would do better, on a world's own training images:

  distinct   for every training image, its closest image of another group (each poster's copies are
             one group, every other image its own): p0 / p1 / p5 of that distance -- how close
             distinct images come;
  groups     for every planted poster (varied, template, exact, retrieved): the single-link distance
             that connects all of its copies (the worst edge of their minimum spanning tree) -- what
             grouping them needs.

A descriptor separates the two when every group connects at a distance distinct images do not reach
(worst edge below the distinct p1, as a link must sit above 99 % of them to keep a look from passing
for one copied image). Descriptors: perceptual hashes (imagehash: pHash, wavelet, average, difference;
Hamming distance of 64 bits), normalised grey thumbnails (1 - correlation) and, with --index, SSCD
(1 - cosine) from the world's index.

    python bench/near_duplicates.py build/planted/world-<key> [--index build/planted/index-<key>]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from scipy.sparse.csgraph import minimum_spanning_tree

HASHES = {
    "phash": imagehash.phash,
    "whash": imagehash.whash,
    "average_hash": imagehash.average_hash,
    "dhash": imagehash.dhash,
}


def poster_group(train_id: str) -> str:
    """The planted world names every copy of a poster `poster-<slug>-<NN>`."""
    return train_id.rsplit("-", 1)[0] if train_id.startswith("poster-") else train_id


def hamming(images: list[Image.Image], fn) -> np.ndarray:
    bits = np.array([fn(im).hash.reshape(-1) for im in images], dtype=np.uint8)
    return (bits[:, None, :] != bits[None, :, :]).sum(-1).astype(np.float64)


def thumbnail(images: list[Image.Image], side: int) -> np.ndarray:
    """1 - correlation of grey thumbnails (brightness and contrast shifts removed)."""
    grey = [im.convert("L").resize((side, side), Image.BILINEAR) for im in images]
    x = np.array([np.asarray(g, np.float64).ravel() for g in grey])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return 1.0 - x @ x.T


def sscd(index: Path, train_ids: list[str]) -> np.ndarray:
    table = pq.read_table(index, columns=["train_id", "sscd_embedding"])
    by_id = dict(zip(table.column("train_id").to_pylist(), table.column("sscd_embedding").to_pylist()))
    e = np.array([by_id[t] for t in train_ids], np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return 1.0 - e @ e.T


def measure(dist: np.ndarray, groups: np.ndarray, planted: dict[str, str]) -> dict:
    same = groups[:, None] == groups[None, :]
    nearest_other = np.where(same, np.inf, dist).min(1)
    p0, p1, p5 = (float(np.percentile(nearest_other, q)) for q in (0, 1, 5))
    worst = {}
    for group, kind in planted.items():
        idx = np.flatnonzero(groups == group)
        if len(idx) < 2:
            continue
        tree = minimum_spanning_tree(dist[np.ix_(idx, idx)] + 1e-9).toarray()  # +eps: zero-distance edges count
        worst.setdefault(kind, []).append(float(tree[tree > 0].max()) if (tree > 0).any() else 0.0)
    return {"distinct_p0": p0, "distinct_p1": p1, "distinct_p5": p5, "group_worst_edge": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("world", type=Path, help="a planted world directory (world.jsonl, ground_truth.jsonl)")
    ap.add_argument("--index", type=Path, help="the world's index directory (adds SSCD)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.world / "world.jsonl").open()]
    truth = [json.loads(line) for line in (args.world / "ground_truth.jsonl").open()]
    groups = np.array([poster_group(r["train_id"]) for r in rows])
    planted = {t["prompt_id"]: t.get("kind", t["expected"]) for t in truth if t["prompt_id"].startswith("poster-")}
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    descriptors = {name: (lambda fn=fn: hamming(images, fn)) for name, fn in HASHES.items()}
    descriptors |= {f"thumbnail{s}": (lambda s=s: thumbnail(images, s)) for s in (8, 16)}
    if args.index:
        descriptors["sscd"] = lambda: sscd(args.index, [r["train_id"] for r in rows])
    results = {}
    print(f"{len(rows)} training images, {len(planted)} planted posters; distances (lower = closer)")
    for name, compute in descriptors.items():
        m = results[name] = measure(compute(), groups, planted)
        print(f"\n{name}: distinct images' nearest other image p0 {m['distinct_p0']:.3f}, p1 {m['distinct_p1']:.3f}")
        for kind, edges in sorted(m["group_worst_edge"].items()):
            apart = sum(e >= m["distinct_p1"] for e in edges)
            print(
                f"  {kind:<12} link needed {', '.join(f'{e:.3f}' for e in edges)}; "
                f"{apart}/{len(edges)} need a link distinct images reach (>= their p1)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
