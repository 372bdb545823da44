"""At which SSCD input size does the copy threshold get tested on a planted world? (issue 12, item 4)

The planted worlds are 32 px images; at 32 px SSCD sees many scenes alike (train-train background p95
0.90 on the development world), so `replication` (0.5) never decides anything. For each input size this
embeds the world's training images with SSCD, and prints the train-train background the scan would
measure (each sampled image's nearest *other* training image, exact duplicates by pixel hash excluded,
as raymem.background does).

    python bench/sscd_size.py build/planted/world-<digest> --sizes 32,64,128,224
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

from raymem.config import CopyDetectionConfig  # noqa: E402
from raymem.encoders import CopyDetector  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", help="a drawn world directory (world.jsonl, images/)")
    parser.add_argument("--sizes", default="32,64,128,224")
    parser.add_argument("--sample", type=int, default=600, help="training images whose nearest neighbour is taken")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (Path(args.world) / "world.jsonl").read_text().splitlines()]
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    hashes = np.array([hashlib.sha1(np.asarray(im).tobytes()).hexdigest() for im in images])
    sample = np.random.default_rng(args.seed).choice(len(rows), min(args.sample, len(rows)), replace=False)
    print(f"{len(rows)} training images, {len(set(hashes))} distinct; background over {len(sample)} sampled")
    print("size  background p50   p95    p99")
    for size in map(int, args.sizes.split(",")):
        detector = CopyDetector(CopyDetectionConfig(model="immaculate:sscd", image_size=size))
        emb = np.concatenate([detector.encode_images(images[i : i + 64]) for i in range(0, len(images), 64)])
        sims = emb[sample] @ emb.T
        sims[hashes[sample][:, None] == hashes[None, :]] = -np.inf  # itself and its exact duplicates
        top1 = sims.max(axis=1)
        p50, p95, p99 = np.percentile(top1, [50, 95, 99])
        print(f"{size:4d}  {p50:14.3f}  {p95:5.3f}  {p99:5.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
