"""Is an implied element's signal specific to that element? (the MI rule on a planted world)

For every prompt of a planted scan, the paired shift of each world element's zero-shot logit
("a photo of <class> with <element>" against "a photo of <class>") between the scan image and the
null image of the same seed, averaged over seeds -- for the prompt's implied element and for all the
others. The MI rule tests only the implied element; if every element shifts alike, the test measures
how unusual the entity looks to CLIP, not the element. With `--index` it also prints the training
side: per element, how much the entity's tagged training images exceed the class's generic images
(in s.d. of the generic images).

    python bench/element_shifts.py OUTPUT_ROOT SCAN_ID CLIP_DIR [--index INDEX_DIR --world WORLD_DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.config import ClipConfig  # noqa: E402
from raymem.encoders import ClipEncoder  # noqa: E402
from raymem.label_inputs import LabelInputs  # noqa: E402
from raymem.planted.world import ELEMENTS  # noqa: E402


def element_directions(encoder: ClipEncoder, cls: str) -> np.ndarray:
    texts = encoder.encode_texts([f"a photo of {cls}"] + [f"a photo of {cls} with {e}" for e in ELEMENTS])
    return 100 * (texts[1:] - texts[0])  # (elements, d): logit direction of each element over the class


def scan_side(root: str, scan_id: str, encoder: ClipEncoder) -> None:
    inputs = LabelInputs.read(root, scan_id)
    images: dict[str, dict[str, dict[int, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for i, g in enumerate(inputs.generations):
        if g["status"] == "ok":
            images[g.get("parent_prompt_id") or g["prompt_id"]][g["role"]][g["seed"]] = inputs.clip[i]
    print(f"scan side: mean paired logit shift, scan image - null image of the same seed ({scan_id})")
    print(f"{'prompt':26s} {'class':10s} {'probed':10s} " + " ".join(f"{e[:9]:>9s}" for e in ELEMENTS))
    for pid, ctx in sorted(inputs.contexts.items()):
        scan, null = images[pid].get("scan", {}), images[pid].get("null", {})
        seeds = sorted(set(scan) & set(null))
        if not ctx.entity_class or not seeds:
            continue
        shift = element_directions(encoder, ctx.entity_class) @ np.stack([scan[s] - null[s] for s in seeds]).T
        probed = ",".join(p.element for p in ctx.probes if p.kind == "implicit")
        cells = " ".join(f"{x:9.2f}" for x in shift.mean(1))
        print(f"{pid[:26]:26s} {ctx.entity_class[:10]:10s} {probed[:10]:10s} {cells}")


def training_side(index: str, world: str, encoder: ClipEncoder) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(glob.glob(f"{index}/part-*.parquet")))
    emb = np.stack(table.column("clip_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    tags, ids = table.column("entities").to_pylist(), table.column("train_id").to_pylist()
    print("\ntraining side: entity's tagged images - the class's generic images, in s.d. of the generic images")
    print(f"{'prompt':26s} {'class':10s} {'implied':10s} " + " ".join(f"{e[:9]:>9s}" for e in ELEMENTS))
    for split in ("calib", "eval"):
        for p in map(json.loads, Path(world, f"prompts-{split}.jsonl").read_text().splitlines()):
            cls = p.get("entity_class")
            if not cls:
                continue
            mine = np.array([p["entity"] in (t or []) for t in tags])
            generic = np.array([i.startswith(cls.split()[-1] + "-") for i in ids])  # "a tower" -> tower-017
            implied = ",".join(p["implicit_elements"])
            if not mine.any():
                print(f"{p['prompt_id'][:26]:26s} {cls[:10]:10s} {implied[:10]:10s} (no training images)")
                continue
            logits = emb @ element_directions(encoder, cls).T
            z = (logits[mine].mean(0) - logits[generic].mean(0)) / logits[generic].std(0)
            print(f"{p['prompt_id'][:26]:26s} {cls[:10]:10s} {implied[:10]:10s} " + " ".join(f"{x:9.2f}" for x in z))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("scan_id")
    parser.add_argument("clip_dir")
    parser.add_argument("--index")
    parser.add_argument("--world")
    args = parser.parse_args()
    encoder = ClipEncoder(ClipConfig(model=f"local-dir:{args.clip_dir}", pretrained=None))
    scan_side(args.root, args.scan_id, encoder)
    if args.index and args.world:
        training_side(args.index, args.world, encoder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
