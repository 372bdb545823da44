"""Is the presence CLIP's blindness to small elements its training? (issue 12: what limits MI)

bench/presence_readout.py found that the planted benchmark's presence CLIP cannot see a flag (its
zero-shot text probe at chance) and barely sees a moon, on images of its world. This script asks
whether that is the training recipe rather than the world's 32 px: it trains the presence CLIP of a
world again in variants, on the same presence corpus (`world.build_presence_corpus`), and prints per
element, over the world's generic training images (no entity; 12-17 % name each element):

- the AUC of the zero-shot text probe the scan uses ("a photo of a <class> with <element>" against
  "a photo of a <class>", the class read from the caption), and
- the AUC of the best linear read-out (LDA, two-fold cross-validated) of "the caption names the element"
  from the CLIP embedding: what any rule on the embedding could reach.

Variants: `baseline` (the benchmark's recipe: 1,100 steps, batch 64; for the development world the
committed weights), `longer` (the same recipe, `--longer` times the steps), `pairs` (the baseline's
steps, half of every batch random and the other half one image of the same subject each: hard negatives
that differ only in scene, colours or element; `training.train_clip(partners=...)`) and `resnet` (the
baseline's recipe and text tower, the image tower open_clip's ModifiedResNet instead of the ViT with
4-px patches: convolutions see a few-pixel blob where a patch embedding averages it away).

    python bench/presence_training.py [--world-seed 7] [--longer 3] [--work build/presence-training]

Minutes on 2 cores: baseline 5-6 (0 for seed 7), longer 6 x N, pairs 6; resnet 1.5 alone (93 s for
world 24 through the benchmark; 13-21 minutes at the lowest priority beside a test run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from presence_readout import auc, readout_scores, text_probe_scores  # noqa: E402

from raymem.config import ClipConfig  # noqa: E402
from raymem.encoders import ClipEncoder  # noqa: E402
from raymem.planted.benchmark import COMMITTED_PRESENCE, PlantedConfig, _presence_training  # noqa: E402
from raymem.planted.training import CLIP_CONFIG, RESNET_CLIP_CONFIG  # noqa: E402
from raymem.planted.world import ELEMENTS, WorldConfig, build_presence_corpus, build_world  # noqa: E402

log = logging.getLogger("presence_training")


def subject_partners(corpus: Path) -> list[list[int]]:
    """Per corpus image, the images of the same subject (an entity, a class, the posters): the corpus
    names its files `<subject>-<n>.png`."""
    rows = [json.loads(line) for line in (corpus / "presence.jsonl").read_text().splitlines()]
    subjects = [Path(r["image"]).stem.rsplit("-", 1)[0] for r in rows]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(subjects):
        groups.setdefault(s, []).append(i)
    return [groups[s] for s in subjects]


def train_variant(
    corpus: Path, out: Path, steps: int, partners: list[list[int]] | None = None, model_cfg: dict = CLIP_CONFIG
) -> Path:
    from raymem.planted.training import load_world, save_clip, train_clip

    if not (out / "clip" / "open_clip_model.safetensors").exists():
        cfg = PlantedConfig()
        train = _presence_training(cfg.train, cfg.presence)
        train.clip_steps = steps
        log.info("training %s (%d steps%s)", out.name, steps, ", same-subject pairs" if partners else "")
        pixels, captions = load_world(corpus, "presence.jsonl")
        save_clip(train_clip(pixels, captions, train, partners, model_cfg), out / "clip", model_cfg)
    return out / "clip"


def element_aucs(world: Path, clip_dir: Path) -> dict[str, tuple[float, float]]:
    """{element: (text-probe AUC, CLIP linear read-out AUC)} over the world's generic training images."""
    from PIL import Image

    rows = [json.loads(line) for line in (world / "world.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["role"] == "generic"]
    captions = [r["caption"] for r in rows]
    encoder = ClipEncoder(ClipConfig(model=f"local-dir:{clip_dir}", pretrained=None))
    x = encoder.encode_images([np.asarray(Image.open(r["image"]).convert("RGB")) for r in rows]).astype(np.float64)
    fold = np.random.default_rng(0).integers(0, 2, len(rows))
    every = np.ones(len(rows), bool)
    out = {}
    for element in ELEMENTS:
        y = np.array([element in c for c in captions])
        probe = text_probe_scores(encoder, x, captions, element)  # every generic caption names its class
        out[element] = (auc(probe, y), auc(readout_scores(x, y, every, fold), y))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-seed", type=int, default=7)
    parser.add_argument("--longer", type=int, default=3, help="the `longer` variant's steps, times the baseline's")
    parser.add_argument("--steps", type=int, help="the baseline's steps (default: the benchmark's, 1,100)")
    parser.add_argument("--work", default="build/presence-training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("presence_training", "raymem.planted.training"):
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = PlantedConfig()
    world_cfg = WorldConfig(seed=args.world_seed)
    work = Path(args.work) / f"world{args.world_seed}"
    if not (work / "world" / "world.json").exists():
        build_world(work / "world", world_cfg)
    corpus = work / "corpus"
    if not (corpus / "presence.json").exists():
        build_presence_corpus(corpus, world_cfg, cfg.presence)
    steps = args.steps or cfg.train.clip_steps
    committed = world_cfg == WorldConfig() and steps == cfg.train.clip_steps and COMMITTED_PRESENCE.exists()
    variants = {
        "baseline": COMMITTED_PRESENCE / "clip"
        if committed
        else train_variant(corpus, work / f"baseline{steps}", steps, None),
        f"longer (x{args.longer})": train_variant(
            corpus, work / f"longer{steps * args.longer}", steps * args.longer, None
        ),
        "pairs": train_variant(corpus, work / f"pairs{steps}", steps, subject_partners(corpus)),
        "resnet": train_variant(corpus, work / f"resnet{steps}", steps, model_cfg=RESNET_CLIP_CONFIG),
    }
    print(f"world {args.world_seed}: AUC over its generic training images, text probe / CLIP linear read-out")
    print(f"{'variant':16s}" + "".join(f"{e:>14s}" for e in ELEMENTS))
    for name, clip_dir in variants.items():
        aucs = element_aucs(work / "world", clip_dir)
        print(f"{name:16s}" + "".join(f"{aucs[e][0]:>8.2f} /{aucs[e][1]:.2f}" for e in ELEMENTS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
