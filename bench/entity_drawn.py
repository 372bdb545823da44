"""Does the generator draw an ME prompt's entity? Read from the pixels, not from the labeler's CLIP.

The planted benchmark's truth for an ME prompt is prompt-level: every image of it is expected ME. Whether
the tiny generator drew the entity in a given image decides whether a `none` there is a miss of the
labeler or of the generator. The labeler's own evidence (the presence CLIP) cannot answer that without
circularity, so this reads it from the world's pixels: an entity's look is its palette on its class's
shape, so an image shows entity E when the majority of its k = 5 nearest training images of E's class
(E's own, the class's generic images and the class's other entities), by the L1 distance of the colour
histograms (4 levels a channel) of the box where the world draws its objects, are E's. No threshold to
set; its reliability is measured first, leave-one-out on the training images themselves.

    python bench/entity_drawn.py build/planted/results/world{7,17,18,19,23,24,25,26,27}-default-regions3-regioncases

Each directory is one `raymem bench planted --region-cases` run's results; the script reads its
`summary.json` (world, models, scan) and `images.parquet` (the labels), and the scan's generated images.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.outputs import read_scan_table  # noqa: E402
from raymem.planted.benchmark import ground_truth  # noqa: E402
from raymem.planted.world import CLASSES, cast, region_cases, slug_of  # noqa: E402
from raymem.stats import clopper_pearson, cluster_bootstrap  # noqa: E402

OBJECT_BOX = (4, 6, 28, 31)  # px at 32: where `world.draw` puts a class shape (x 0.35-0.65, base 0.8-0.92)
NEIGHBOURS = 5


def generic_class(caption: str) -> str:
    return next(c for c in CLASSES if re.search(rf"\b{c}\b", caption))


def colour_histogram(path: str | Path) -> np.ndarray:
    x0, y0, x1, y1 = OBJECT_BOX
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)[y0:y1, x0:x1] / 256.0
    levels = (pixels * 4).astype(int)
    bins = np.bincount((levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).ravel(), minlength=64)
    return bins / bins.sum()


class EntityOracle:
    """A world's seed and, per class, every training image's histogram and whose image it is ("" for a
    generic one)."""

    def __init__(self, world_root: Path):
        self.seed = json.loads((world_root / "world.json").read_text())["config"]["seed"]
        entities = [*cast(self.seed)[0], *(e for e, _ in region_cases(self.seed))]
        self.class_of = {e.name: e.cls for e in entities}
        self.owners: dict[str, list[str]] = collections.defaultdict(list)
        histograms: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        for line in (world_root / "world.jsonl").open():
            row = json.loads(line)
            names = row["entities"]
            if names and names[0] not in self.class_of:
                continue  # a poster: no class shape
            cls = self.class_of[names[0]] if names else generic_class(row["caption"])
            self.owners[cls].append(names[0] if names else "")
            histograms[cls].append(colour_histogram(row["image"]))
        self.histograms = {cls: np.stack(h) for cls, h in histograms.items()}

    def shows(self, histogram: np.ndarray, entity: str, leave_out: int | None = None) -> bool:
        cls = self.class_of[entity]
        distance = np.abs(self.histograms[cls] - histogram).sum(axis=1)
        if leave_out is not None:
            distance[leave_out] = np.inf
        nearest = np.argsort(distance)[:NEIGHBOURS]
        return sum(self.owners[cls][i] == entity for i in nearest) > NEIGHBOURS / 2

    def leave_one_out(self, entity: str) -> tuple[int, int, int, int]:
        """(own images shown, own images, other images shown, other images) of the entity's class."""
        cls = self.class_of[entity]
        own = [i for i, o in enumerate(self.owners[cls]) if o == entity]
        other = [i for i, o in enumerate(self.owners[cls]) if o != entity]
        hist = self.histograms[cls]
        return (
            sum(self.shows(hist[i], entity, i) for i in own),
            len(own),
            sum(self.shows(hist[i], entity, i) for i in other),
            len(other),
        )


ENTITY_TEST = re.compile(r"entity '[^']+': .*? at p=([0-9.]+) .*?(?:null_alpha|entity_alpha) ([0-9.]+)\)")


def why_not_me(image: dict, null_drawn: int) -> str:
    """What the labeler's reasons say kept an image from ME."""
    if image["predicted"] == "ME":
        return ""
    if image["predicted"] != "none":
        return f"{image['predicted']} outranks ME"
    test = ENTITY_TEST.search(image["reasons"] or "")
    if test and float(test.group(1)) <= float(test.group(2)):
        return "entity test passed, a requested element not seen" if "missing:" in image["reasons"] else "other"
    null = "the null images draw it too" if null_drawn >= 4 else "the null images mostly do not"
    return f"entity test not passed, {null}"


def world_rows(results_dir: Path) -> tuple[list[dict], list[tuple]]:
    """Every scored image of the run's plain ME prompts (drawn or not, by the oracle, and its label), and
    per prompt (world, prompt, oracle on training images, drawn in its null images)."""
    summary = json.loads((results_dir / "summary.json").read_text())
    world_root = Path(summary["world"])
    scans = world_root.parent / "scans" / Path(summary["models"]).name
    truth = ground_truth(world_root)
    oracle = EntityOracle(world_root)
    entity_of = {slug_of(name): name for name in oracle.class_of}
    me_prompts = {p for p, t in truth.items() if t.get("kind") == "ME" and t["split"] == "eval"}
    generations = read_scan_table(str(scans), summary["scan_id"], "generations").to_pylist()
    drawn, null_drawn = {}, collections.Counter()
    for g in generations:
        if g["parent_prompt_id"] not in me_prompts or g["status"] != "ok" or not g["image_uri"]:
            continue
        shown = oracle.shows(colour_histogram(g["image_uri"]), entity_of[g["parent_prompt_id"]])
        if g["role"] == "scan":
            drawn[g["unit_id"]] = shown
        else:
            null_drawn[g["parent_prompt_id"]] += shown
    seed = oracle.seed
    images = [
        {
            "world": seed,
            "prompt_id": i["prompt_id"],
            "drawn": drawn[i["unit_id"]],
            "predicted": i["predicted"],
            "why": why_not_me(i, null_drawn[i["prompt_id"]]),
        }
        for i in pq.read_table(results_dir / "images.parquet").to_pylist()
        if i["unit_id"] in drawn
    ]
    prompts = [(seed, p, oracle.leave_one_out(entity_of[p]), null_drawn[p]) for p in sorted(me_prompts)]
    return images, prompts


def share(images: list[dict], keep, of) -> str:
    clusters = sorted({(i["world"], i["prompt_id"]) for i in images})
    num = [sum(1 for i in images if (i["world"], i["prompt_id"]) == c and of(i) and keep(i)) for c in clusters]
    den = [sum(1 for i in images if (i["world"], i["prompt_id"]) == c and of(i)) for c in clusters]
    k, n = sum(num), sum(den)
    cp, cb = clopper_pearson(k, n), cluster_bootstrap(num, den)
    return f"{k}/{n} = {k / n:.2f} [{cp[0]:.2f}, {cp[1]:.2f}] (by prompt [{cb[0]:.2f}, {cb[1]:.2f}])" if n else "0/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results directories of `raymem bench planted --region-cases` runs")
    args = parser.parse_args()
    images, prompts = [], []
    for d in args.results:
        more_images, more_prompts = world_rows(Path(d))
        images += more_images
        prompts += more_prompts
    print("the oracle on the training images (leave-one-out), and the generator's null images, per ME prompt:")
    for seed, prompt, (own, n_own, other, n_other), null in prompts:
        scan = [i for i in images if (i["world"], i["prompt_id"]) == (seed, prompt)]
        print(
            f"  world {seed:3d} {prompt:22s} training: own {own}/{n_own}, others {other}/{n_other};"
            f" drawn in {sum(i['drawn'] for i in scan)}/{len(scan)} images, in {null}/8 null images"
        )
    own = sum(p[2][0] for p in prompts), sum(p[2][1] for p in prompts)
    other = sum(p[2][2] for p in prompts), sum(p[2][3] for p in prompts)
    print(f"oracle, pooled: own training images shown {own[0]}/{own[1]}, the class's others {other[0]}/{other[1]}")
    print(f"images of ME prompts that draw the entity: {share(images, lambda i: i['drawn'], lambda i: True)}")
    table = collections.Counter((i["drawn"], i["predicted"]) for i in images)
    for drawn in (True, False):
        row = ", ".join(f"{label} {table[(drawn, label)]}" for label in ("ME", "MI", "MU", "none", "failed"))
        print(f"  {'drawn' if drawn else 'not drawn'}: {row}")
    print("  why a drawn entity's image is not ME (its reasons; 'draw it too': 4 or more of 8 null images):")
    for why, n in collections.Counter(i["why"] for i in images if i["drawn"] and i["why"]).most_common():
        print(f"    {n:4d}  {why}")
    print(f"ME among the images that draw it: {share(images, lambda i: i['predicted'] == 'ME', lambda i: i['drawn'])}")
    print(
        f"none among those that do not: {share(images, lambda i: i['predicted'] == 'none', lambda i: not i['drawn'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
