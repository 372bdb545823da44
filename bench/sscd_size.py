"""At which SSCD input size does the copy threshold get tested on a planted world? (issue 12, item 4)

The planted worlds are 32 px images; at 32 px SSCD sees many scenes alike (train-train background p95
0.90 on the development world), so `replication` (0.5) never decides anything. For each input size this
embeds the world's training images with SSCD, and prints the train-train background the scan would
measure (each sampled image's nearest *other* training image, exact duplicates by pixel hash excluded,
as raymem.background does).

`--synthetic` prints the same background for images that share no content at all -- independent
white noise, and smooth noise of several scales drawn at 32, 64 and 128 px -- the floor any
procedurally drawn world could reach at that size.

    python bench/sscd_size.py build/planted/world-<digest> --sizes 32,64,128,224
    python bench/sscd_size.py --synthetic --sample 400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.background import percentiles  # noqa: E402
from raymem.config import CopyDetectionConfig  # noqa: E402
from raymem.encoders import CopyDetector  # noqa: E402


def pixel_hashes(images: list[Image.Image]) -> np.ndarray:
    return np.array([hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for im in images])


def background(images: list[Image.Image], hashes: np.ndarray, size: int, sample: np.ndarray) -> dict:
    """The percentiles (raymem.background's) of each sampled image's SSCD cosine to its nearest other
    image, exact duplicates (same `hashes`) left out."""
    detector = CopyDetector(CopyDetectionConfig(model="immaculate:sscd", image_size=size))
    emb = np.concatenate([detector.encode_images(images[i : i + 64]) for i in range(0, len(images), 64)])
    sims = emb[sample] @ emb.T
    sims[hashes[sample][:, None] == hashes[None, :]] = -np.inf  # itself and its exact duplicates
    return percentiles(sims.max(axis=1))


def row(name: str, size: int, measured: dict) -> str:
    return f"{name:25s}  {size:4d}  {measured['p50']:14.3f}  {measured['p95']:5.3f}  {measured['p99']:5.3f}"


def smooth_noise(rng: np.random.Generator, native: int) -> Image.Image:
    """Colour value noise at four scales (3, 8 and 20 cells, and half the image size), drawn at `native` px."""
    img = np.zeros((native, native, 3))
    for cells, weight in ((3, 0.4), (8, 0.3), (20, 0.2), (native // 2, 0.1)):
        grid = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
        img += weight * np.asarray(grid.resize((native, native), Image.BICUBIC)) / 255.0
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def synthetic_sets(n: int, seed: int) -> list[tuple[str, int, list[Image.Image]]]:
    rng = np.random.default_rng(seed)
    sets = [("white noise", 32, [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)])]
    sets += [(f"smooth noise at {px} px", px, [smooth_noise(rng, px) for _ in range(n)]) for px in (32, 64, 128)]
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", nargs="?", help="a drawn world directory (world.jsonl, images/)")
    parser.add_argument("--sizes", default="32,64,128,224")
    parser.add_argument(
        "--sample",
        type=int,
        default=600,
        help="training images whose nearest neighbour is taken; --synthetic: images a set",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="also images that share no content (above)")
    args = parser.parse_args()
    if not args.world and not args.synthetic:
        parser.error("give a world directory, --synthetic, or both")
    sizes = [int(s) for s in args.sizes.split(",")]
    print("images                     size  background p50   p95    p99")
    if args.world:
        rows = [json.loads(line) for line in (Path(args.world) / "world.jsonl").read_text().splitlines()]
        images = [Image.open(r["image"]).convert("RGB") for r in rows]
        hashes = pixel_hashes(images)
        sample = np.random.default_rng(args.seed).choice(len(rows), min(args.sample, len(rows)), replace=False)
        print(f"({len(rows)} training images, {len(set(hashes))} distinct; background over {len(sample)} sampled)")
        for size in sizes:
            print(row("the world", size, background(images, hashes, size, sample)))
    if args.synthetic:
        for name, native, images in synthetic_sets(args.sample, args.seed):
            hashes, everyone = pixel_hashes(images), np.arange(len(images))
            for size in (s for s in sizes if s >= native):  # SSCD input never below the drawing's size
                print(row(name, size, background(images, hashes, size, everyone)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
