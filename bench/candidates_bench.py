"""Two-stage copy detection: candidates/s of one fetch + embed actor against a single-process loop.

Serves `--images` procedurally drawn PNGs (`--size` px) from a local HTTP server on 127.0.0.1 that
answers each request after `--latency-ms` (a stand-in for a distant web server), then SSCD-embeds
them two ways, in one run on one machine:

  baseline   one process, one image at a time: fetch (urllib), decode, embed
  raymem     `FetchEmbed` (the Ray stage's callable class) on batches of `--batch` URIs: threaded
             fetches bounded per host (`--per-host`), then batched SSCD

Printed: candidates/s of each and their ratio, and the share of time the raymem side spends
fetching. Both produce the same embeddings (checked). Ray itself is not started: this measures the
actor's work, not scheduling.

    python bench/candidates_bench.py                       # ~1 minute on 2 cores
    python bench/candidates_bench.py --model immaculate:sscd --image-size 288 --images 400
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def draw_images(root: Path, n: int, size: int) -> list[str]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(40, 220, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16, size // 4))
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        names.append(f"img{i:05d}.jpg")
        (root / names[-1]).write_bytes(buf.getvalue())
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=384, help="side of the served images (px)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="server delay per request")
    ap.add_argument("--model", default="immaculate:sscd_distilled")
    ap.add_argument("--image-size", type=int, default=288, help="SSCD input size")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--per-host", type=int, default=16)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=2, help="intra-op threads of the copy detector")
    args = ap.parse_args()

    import pyarrow as pa

    from raymem.config import CandidatesConfig, CopyDetectionConfig
    from raymem.copy_candidates import FetchEmbed, uri_key
    from raymem.encoders import CopyDetector
    from raymem.schema import embedding_matrix
    from tests.servers import ImageServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = draw_images(root, args.images, args.size)
        cd = CopyDetectionConfig(
            model=args.model,
            image_size=args.image_size,
            candidates=CandidatesConfig(threads=args.threads, per_host=args.per_host, timeout_s=30.0),
        )
        with ImageServer(root, delay_s=args.latency_ms / 1000) as server:
            urls = [f"{server.url}/files/{n}" for n in names]

            # baseline: one image at a time, in one process
            detector = CopyDetector(cd, "cpu", threads=args.cpus)
            from PIL import Image

            start = time.perf_counter()
            base = []
            for url in urls:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    data = resp.read()
                base.append(detector.encode_images([Image.open(io.BytesIO(data)).convert("RGB")])[0])
            base_s = time.perf_counter() - start
            base = np.stack(base)

            # raymem: the stage's callable class on batches; the fetches alone are timed in a first pass
            actor = FetchEmbed(cd, cache_uri=None, cpus=args.cpus)
            batches = [urls[i : i + args.batch] for i in range(0, len(urls), args.batch)]
            start = time.perf_counter()
            for chunk in batches:
                actor.fetcher.fetch_many(chunk)
            fetch_only_s = time.perf_counter() - start
            start = time.perf_counter()
            out = [actor(pa.table({"uri_key": [uri_key(u) for u in c], "uri": c})) for c in batches]
            raymem_s = time.perf_counter() - start
    table = pa.concat_tables(out)
    assert set(table.column("status").to_pylist()) == {"ok"}
    ours = embedding_matrix(table.column("sscd_embedding"))
    max_diff = float(np.abs(ours - base).max())
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "images": args.images,
        "size_px": args.size,
        "latency_ms": args.latency_ms,
        "model": args.model,
        "sscd_input": args.image_size,
        "baseline_candidates_per_s": round(args.images / base_s, 1),
        "raymem_candidates_per_s": round(args.images / raymem_s, 1),
        "ratio": round(base_s / raymem_s, 2),
        "raymem_fetch_only_candidates_per_s": round(args.images / fetch_only_s, 1),
        "max_abs_embedding_difference": max_diff,
    }
    assert max_diff < 1e-3, "the two paths must give the same embeddings"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
