"""The demos: the planted world scanned with its trained models (`raymem demo`), and the tiny world.

`prepare_planted_demo(cfg)` draws the planted development world's training set and indexes it at the
paths configs/demo.yaml names, with the models committed under assets/planted-models; `truth_table`
puts each prompt's planted memorization beside what the scan found.

The tiny world (`raymem demo --tiny`, configs/tiny.yaml, the tests' world): `build_demo(cfg)` writes,
under the directory the tiny config points at:
  sd-tiny/         a Stable-Diffusion-style diffusers pipeline (random weights, `save_pretrained`),
                   with the real CLIP BPE tokenizer taken from open_clip's bundled vocabulary
  clip-tiny/       a tiny open_clip model as a 'local-dir:' checkpoint (random weights)
  train/images/    procedurally drawn training images, plus planted copies of two images the scan
                   will generate (one verbatim, one resized + JPEG-compressed)
  train/embeddings/  their embeddings in raymem's training Parquet schema (3 files)
  prompts.jsonl    the prompt set
Everything loads back through the same `from_pretrained` / open_clip / Parquet paths as production
models. No network is used. The random-weight models make the ME/MI signals meaningless; the planted
copies make MU real (SSCD, with real weights, finds them).
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

from raymem.config import ScanConfig
from raymem.tiny import build_tiny_clip, build_tiny_pipeline

log = logging.getLogger(__name__)

DEMO_SEED = 1234

# Prompt set of the demo: entity, its class noun, explicit and implicit elements.
DEMO_PROMPTS = [
    (
        "lighthouse",
        "a photo of the Lunar Lighthouse at dusk",
        "Lunar Lighthouse",
        "a lighthouse",
        ["dusk sky"],
        ["rocky shore"],
    ),
    ("captain", "a portrait of Captain Mira", "Captain Mira", "a woman", ["captain's hat"], ["ship wheel"]),
    ("mill", "the Old Mill in autumn", "Old Mill", "a windmill", ["autumn leaves"], []),
    ("mosque-city", "a view of the mosque city of Qadira at sunset", "Qadira", "a city", ["sunset"], ["minarets"]),
    ("teapot", "a blue teapot on a wooden table", "blue teapot", "a teapot", ["wooden table"], []),
    ("kite", "a red kite over a beach", "red kite", "a kite", ["beach"], ["clouds"]),
]
# (prompt_id, seed, transform) of generated images planted into the training set.
PLANTED = [("lighthouse", 0, "verbatim"), ("captain", 1, "resized-jpeg")]

_ENTITY_STYLE = {
    "Lunar Lighthouse": ((240, 240, 230), "tower"),
    "Captain Mira": ((200, 150, 110), "circle"),
    "Old Mill": ((150, 100, 60), "cross"),
    "Qadira": ((230, 200, 120), "domes"),
    "blue teapot": ((40, 80, 200), "blob"),
    "red kite": ((210, 30, 40), "diamond"),
}


# -- training world ----------------------------------------------------------------------------------
def draw_scene(rng: random.Random, entity: str, size: int = 96) -> Image.Image:
    """A simple scene: background gradient, ground, and the entity's signature shape."""
    color, shape = _ENTITY_STYLE[entity]
    sky = tuple(rng.randint(60, 220) for _ in range(3))
    img = Image.new("RGB", (size, size), sky)
    d = ImageDraw.Draw(img)
    horizon = rng.randint(size // 2, size * 3 // 4)
    d.rectangle([0, horizon, size, size], fill=tuple(rng.randint(20, 140) for _ in range(3)))
    x, y = rng.randint(size // 5, size * 3 // 5), rng.randint(size // 6, size // 2)
    s = rng.randint(size // 6, size // 3)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color)
    if shape == "tower":
        d.rectangle([x, y, x + s // 3, horizon], fill=jitter)
        d.rectangle([x, y + s // 2, x + s // 3, y + s // 2 + 4], fill=(200, 30, 30))
    elif shape == "circle":
        d.ellipse([x, y, x + s, y + s], fill=jitter)
    elif shape == "cross":
        d.rectangle([x + s // 2 - 2, y, x + s // 2 + 2, y + s], fill=jitter)
        d.rectangle([x, y + s // 2 - 2, x + s, y + s // 2 + 2], fill=jitter)
    elif shape == "domes":
        for i in range(3):
            d.pieslice([x + i * s // 2, y, x + i * s // 2 + s // 2, y + s // 2], 180, 360, fill=jitter)
    elif shape == "blob":
        d.ellipse([x, y + s // 4, x + s, y + s], fill=jitter)
        d.rectangle([x + s, y + s // 2, x + s + s // 4, y + s // 2 + 3], fill=jitter)
    else:
        d.polygon([(x + s // 2, y), (x + s, y + s // 2), (x + s // 2, y + s), (x, y + s // 2)], fill=jitter)
    return img


def build_training_world(cfg: ScanConfig, root: Path, per_entity: int = 60, seed: int = DEMO_SEED) -> Path:
    """Training images + captions + entity tags, the planted copies, and their embeddings Parquet."""
    from raymem.diffusion import NoiseNormRecorder, load_pipeline, sample

    rng = random.Random(seed)
    image_dir = root / "train" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    images: list[Image.Image] = []
    prompts = {p[0]: p for p in DEMO_PROMPTS}
    for entity in _ENTITY_STYLE:
        spec = next(p for p in DEMO_PROMPTS if p[2] == entity)
        for i in range(per_entity):
            img = draw_scene(rng, entity)
            words = rng.sample(spec[4] + spec[5] + ["daylight", "a field", "the sea", "a street"], 2)
            train_id = f"{spec[0]}-{i:03d}"
            rows.append({"train_id": train_id, "caption": f"{entity} with {words[0]} and {words[1]}"})
            images.append(img)

    # Planted copies: the scan's own generations for these units, put into the training set.
    import torch

    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    recorder = NoiseNormRecorder(pipe, 1)
    for prompt_id, seed_, transform in PLANTED:
        spec = prompts[prompt_id]
        generated = sample(pipe, recorder, [spec[1]], [seed_], cfg.generation).images[0]
        img = Image.fromarray(generated)
        if transform == "resized-jpeg":
            img = img.resize((img.width * 2, img.height * 2), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        rows.append({"train_id": f"planted-{prompt_id}-seed{seed_}", "caption": spec[1]})
        images.append(img)
    recorder.close()

    for row, img in zip(rows, images):
        path = image_dir / f"{row['train_id']}.png"
        img.save(path)
        row["image"] = str(path)
    random.Random(seed + 1).shuffle(rows)  # planted rows land inside a shard, not at its end
    table = root / "train" / "images.jsonl"
    table.write_text("".join(json.dumps({k: r[k] for k in ("train_id", "image", "caption")}) + "\n" for r in rows))
    # Embedded by `raymem index`, the same path a real training set takes.
    return index_training_table(cfg, table, entities=list(_ENTITY_STYLE))


def index_training_table(cfg: ScanConfig, table: Path, entities: list[str]) -> Path:
    from raymem.config import IndexConfig
    from raymem.index import run_index

    index_cfg = IndexConfig.model_validate(
        {
            "input": {"kind": "table", "path": str(table), "image_column": "image", "id_column": "train_id"},
            "output": cfg.training.embeddings,
            "embedding": cfg.embedding.model_dump(mode="json"),
            "entities": entities,
            "shard_size": 150,
            "background_sample": 300,
        }
    )
    run_index(index_cfg)
    return Path(cfg.training.embeddings)


def write_prompts(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for pid, prompt, entity, cls, explicit, implicit in DEMO_PROMPTS:
            f.write(
                json.dumps(
                    {
                        "prompt_id": pid,
                        "prompt": prompt,
                        "entity": entity,
                        "entity_class": cls,
                        "explicit_elements": explicit,
                        "implicit_elements": implicit,
                    }
                )
                + "\n"
            )
    return path


def _local_dir(spec: str) -> Path:
    return Path(spec[len("local-dir:") :]) if spec.startswith("local-dir:") else Path(spec)


def build_demo(cfg: ScanConfig, force: bool = False) -> None:
    """Build every asset `cfg` (configs/tiny.yaml) points at; skipped when already built."""
    model_dir = Path(cfg.model.id)
    clip_dir = _local_dir(cfg.embedding.clip.model)
    done = Path(cfg.training.embeddings) / "_DEMO_COMPLETE"
    if done.exists() and not force:
        return
    log.info("building the offline demo assets (tiny models, training world) ...")
    build_tiny_pipeline(model_dir)
    build_tiny_clip(clip_dir)
    write_prompts(Path(cfg.prompts))
    build_training_world(cfg, model_dir.parent)
    done.write_text("ok\n")


def prepare_planted_demo(cfg: ScanConfig) -> Path:
    """The planted world and its index where `cfg` (configs/demo.yaml) reads them; returns the world's
    directory. The models are the committed ones (`cfg.model.id`'s parent holds pipeline/ and clip/)."""
    from raymem.planted.benchmark import check_models, index_world
    from raymem.planted.world import WorldConfig, build_world

    models = Path(cfg.model.id).parent
    check_models(models)
    world = Path(cfg.prompts).parent
    if not (world / "ground_truth.jsonl").exists():
        log.info("drawing the planted world's training set into %s", world)
        build_world(world, WorldConfig())
    index_world(world, models, Path(cfg.training.embeddings))
    return world


def truth_table(labels: list[dict], world: Path) -> tuple[list[dict], list[str]]:
    """Per prompt: what was planted, the label it should get, and the labels its images got; plus one
    line per category (images labelled as planted / images planted), scored as the benchmark scores."""
    from collections import Counter

    from raymem.planted.benchmark import evaluate, ground_truth

    truth = ground_truth(world)
    result = evaluate(labels, truth)
    found: dict[str, Counter] = {}
    for image in result["images"]:
        found.setdefault(image["prompt_id"], Counter())[image["predicted"]] += 1
    rows = [
        {
            "prompt_id": pid,
            "expected": truth[pid]["expected"],
            "found": ", ".join(f"{k} {n}" for k, n in found[pid].most_common()),
            "planted": truth[pid]["planted"],
        }
        for pid in sorted(found, key=lambda p: (truth[p]["expected"], p))
    ]
    lines = [
        f"{m['category']:4s} {m['true_positives']:3d} of {m['expected']:3d} images labelled as planted"
        for m in result["metrics"]
        if m["expected"]
    ]
    return rows, lines
