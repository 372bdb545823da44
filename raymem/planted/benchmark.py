"""`raymem bench planted`: the labeler measured on a world whose memorization is known.

Steps, each cached under the work directory and redone only when its inputs change:
  1. draw the world (raymem.planted.world) and its ground truth;
  2. train the world's diffusion pipeline on CPU (raymem.planted.training), and the presence CLIP on
     a separate corpus of the same world (other images, paraphrased captions: the instrument does not
     share the generator's captions);
  3. index the training set with `raymem index` (the presence CLIP, real SSCD weights);
  4. scan the evaluation prompts with the default thresholds -- or, with `calibrate`, with thresholds
     fitted by `raymem calibrate` on a scan of the *calibration* prompts (other entities and posters
     of the same world), never on the evaluation prompts;
  5. compare every image's label with its prompt's expected label: precision and recall per category,
     the confusion matrix, the share of control images labelled none; written to Parquet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raymem.planted.training import PRESENCE_TOWERS, TrainConfig
from raymem.planted.world import PresenceConfig, WorldConfig
from raymem.schema import LABELS
from raymem.stats import clopper_pearson, cluster_bootstrap

log = logging.getLogger(__name__)

TARGETS = {"MU": (0.95, 0.95), "MI": (0.9, 0.9), "ME": (0.9, 0.9)}
CONTROL_NONE_TARGET = 0.95
# Issue 12: a target counts as met only if the lower end of its 95 % interval is at least this too
# (the prompt-clustered interval where there is one: images of one prompt are not independent).
INTERVAL_FLOOR = 0.85


def target_verdict(points: list[tuple[float | None, float, list | None]]) -> str:
    """'target met', or why not, for (estimate, target, interval) triples judged together (a category's
    precision and recall): every estimate at its target and every interval's lower end at INTERVAL_FLOOR."""
    missed = [
        f"{'no estimate' if x is None else f'{x:.3f}'} < {target}" for x, target, _ in points if (x or 0) < target
    ]
    if missed:
        return "MISSED: " + ", ".join(missed)
    low = [ci[0] for _, _, ci in points if ci is not None and ci[0] < INTERVAL_FLOOR]
    if low:
        return f"MISSED: estimate at target, interval's lower end {min(low):.2f} < {INTERVAL_FLOOR}"
    return "target met"


@dataclass
class PlantedConfig:
    work: str = "build/planted"
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds_per_prompt: int = 8
    null_seeds: int = 8
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    calibrate: bool = False
    target_precision: float = 0.9
    models: str | None = None  # use these trained models (pipeline/ and clip/) instead of training
    retrain: bool = False  # train even when the committed models match the world and training configs
    region_neighbours: int = 0  # region-level copy detection: off, as the config default (docs/planted.md)
    # every prompt whose entity implies no element is asked about one its training images never show
    # (a negative for the MI rule; `probed_prompts`)
    negative_probes: bool = True
    # the scan's CLIP: trained on its own corpus (PresenceConfig), or None for the generator's CLIP,
    # trained on the generator's own images and captions (the benchmark before issue 12's item 4)
    presence: PresenceConfig | None = field(default_factory=PresenceConfig)
    # index the training table without its entity tags, as a training set with CLIP embeddings only comes:
    # every entity is then judged by its text probe, never by the centroid of its training images
    untagged: bool = False
    placebo_names: bool = True  # the scan's signals.placebo_names (off: the text probe alone decides)
    mi_needs_entity: bool = False  # the scan's thresholds.mi_needs_entity (default off, as the config's)

    @classmethod
    def quick(cls, **kwargs) -> PlantedConfig:
        """A reduced world and training, for a fast end-to-end check (targets are not expected)."""
        preset = {
            "seeds_per_prompt": 4,
            "null_seeds": 4,
            "num_inference_steps": 10,
            "world": WorldConfig(per_entity=20, per_class=15, poster_copies=8),
            "train": TrainConfig(vae_steps=60, unet_steps=120, clip_steps=60),
            "presence": PresenceConfig(per_entity=20, per_class=15, posters=8),
        }
        return cls(**{**preset, **kwargs})


def planted_config(
    *,
    work: str,
    calibrate: bool = False,
    models: str | None = None,
    retrain: bool = False,
    region_neighbours: int | None = None,
    world_seed: int | None = None,
    quick: bool = False,
    shared_clip: bool = False,
    train_seed: int | None = None,
    hard_cases: bool = False,
    mining: bool = False,
    region_cases: bool = False,
    presence_tower: str = "vit",
    untagged: bool = False,
    placebo_names: bool = True,
    mi_needs_entity: bool = False,
) -> PlantedConfig:
    """The benchmark's config from its command-line options (`raymem bench planted`, bench/planted.py),
    checked against the scan config's own bounds before anything is drawn or trained."""
    from pydantic import ValidationError

    from raymem.config import SignalsConfig, format_validation_error
    from raymem.errors import ConfigError

    if region_neighbours is None:  # not given: on where region copies are planted, off (the default) elsewhere
        region_neighbours = REGION_CASES_NEIGHBOURS if region_cases else 0
    try:
        SignalsConfig(region_neighbours=region_neighbours)
    except ValidationError as err:
        raise ConfigError(format_validation_error("--region-neighbours", err)) from None
    preset = PlantedConfig.quick if quick else PlantedConfig
    cfg = preset(
        work=work,
        calibrate=calibrate,
        models=models,
        retrain=retrain,
        region_neighbours=region_neighbours,
        untagged=untagged,
        placebo_names=placebo_names,
        mi_needs_entity=mi_needs_entity,
    )
    if world_seed is not None:
        cfg.world = replace(cfg.world, seed=world_seed)
    if hard_cases:
        cfg.world = replace(cfg.world, hard_cases=True)
    if region_cases:
        cfg.world = replace(cfg.world, region_cases=True)
    if mining:
        cfg.world = replace(cfg.world, implied_named=MINING_IMPLIED_NAMED, noisy_mentions=MINING_NOISY_MENTIONS)
    if presence_tower not in PRESENCE_TOWERS:
        raise ConfigError(f"--presence-tower: {presence_tower!r} is not one of {', '.join(PRESENCE_TOWERS)}")
    if shared_clip:
        if presence_tower != "vit":
            raise ConfigError("--presence-tower: the presence CLIP's tower means nothing with --shared-clip")
        cfg.presence = None
    else:
        cfg.presence = replace(cfg.presence, image_tower=presence_tower)
    if train_seed is not None:
        cfg.train = replace(cfg.train, seed=train_seed)
    return cfg


# `--region-cases` scans with region detection on at this many neighbours per space unless told otherwise
# (the config's "good start", signals.region_neighbours): the world plants region copies to find.
REGION_CASES_NEIGHBOURS = 3

# `--mining`'s world: a third of an MI entity's captions name its implied element (support ~27 of 80,
# above MINING_MIN_SUPPORT, lift well above 2), and three captions of every named entity mention a detail
# its images never show (support 3: an instance element).
MINING_IMPLIED_NAMED = 1 / 3
MINING_NOISY_MENTIONS = 3


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_world(cfg: PlantedConfig) -> Path:
    from raymem.planted.world import build_world, world_key

    root = Path(cfg.work) / f"world-{_digest(world_key(cfg.world))}"
    if not (root / "world.json").exists():
        log.info("drawing the planted world into %s", root)
        build_world(root, cfg.world)
    return root


def prompts_path(world_root: Path, split: str, probed: bool) -> Path:
    """A split's prompt file: as drawn, or with the negative probes (`probed_prompts` writes it)."""
    return world_root / (f"prompts-{split}-probed.jsonl" if probed else f"prompts-{split}.jsonl")


def probed_prompts(world_root: Path, split: str, seed: int) -> Path:
    """The split's prompts with an implied-element probe on every prompt that has none: an element the
    entity's training images never show (not its explicit one; an entity's images show only its own
    elements). MI must not fire on them -- issue 12's negatives for the MI rule, which otherwise only
    ever probes the entities that do imply an element. The expected labels stay as they are."""
    from raymem.planted.world import ELEMENTS

    out = prompts_path(world_root, split, probed=True)
    if out.exists():
        return out
    rows = [json.loads(line) for line in prompts_path(world_root, split, probed=False).read_text().splitlines()]
    truth = ground_truth(world_root)
    for r in rows:
        # MI prompts list no implied element where the captions name it (mining finds it): never probed
        if not r.get("implicit_elements") and truth[r["prompt_id"]]["expected"] != "MI":
            allowed = [e for e in ELEMENTS if e not in r.get("explicit_elements", [])]
            pick = int(hashlib.sha256(f"{seed}:{r['prompt_id']}".encode()).hexdigest(), 16) % len(allowed)
            r["implicit_elements"] = [allowed[pick]]
            r["negative_probe"] = allowed[pick]
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "negative_probe"}) + "\n" for r in rows))
    (world_root / f"negative-probes-{split}.json").write_text(
        json.dumps({r["prompt_id"]: r["negative_probe"] for r in rows if "negative_probe" in r}, indent=1)
    )
    tmp.replace(out)  # written last: its presence means both files are complete
    return out


def negative_probes(world_root: Path, split: str) -> dict[str, str]:
    """{prompt_id: the probed element} of a split's negative probes (empty when none were made)."""
    path = world_root / f"negative-probes-{split}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_models(models: Path) -> None:
    """A `--models` directory must hold what training writes: pipeline/ and clip/."""
    from raymem.errors import InputError

    for needed in ("pipeline/model_index.json", "clip"):
        if not (models / needed).exists():
            raise InputError(str(models), f"not a trained-models directory: {needed} is missing")


# The development world's models as trained by prepare_models at the default configs (assets/, with
# how they were made); DIGEST names the world and training configs they belong to.
COMMITTED_MODELS = Path(__file__).resolve().parents[2] / "assets" / "planted-models"


def prepare_models(cfg: PlantedConfig, world_root: Path) -> Path:
    if cfg.models:
        return Path(cfg.models)
    from raymem.planted.training import train_world_models

    root = _trained(cfg, f"models-{_digest([world_root.name, asdict(cfg.train)])}", COMMITTED_MODELS)
    if not (root / "training.json").exists():
        log.info("training the world's models into %s (CPU; minutes)", root)
        train_world_models(world_root, root, cfg.train)
    return root


def _trained(cfg: PlantedConfig, name: str, committed: Path) -> Path:
    """Where trained models named `name` live: the committed directory when its DIGEST is `name` (and
    no retraining was asked for), else `name` under the work directory (trained there when missing)."""
    digest = committed / "DIGEST"
    if not cfg.retrain and digest.exists() and digest.read_text().strip() == name:
        log.info("using the committed models of this world and configs (%s)", committed)
        return committed
    return Path(cfg.work) / name


# The development world's presence CLIP, trained by prepare_presence at the default configs; DIGEST
# names the world, corpus and training configs it belongs to.
COMMITTED_PRESENCE = COMMITTED_MODELS / "presence"


def _presence_training(train: TrainConfig, presence: PresenceConfig) -> TrainConfig:
    # only what train_clip reads, so a change to the generator's steps does not retrain the presence CLIP;
    # seeded by the presence corpus, not the generator's training seed: the instrument stays the same
    # while the generator is trained again with other seeds (`--train-seed`)
    return TrainConfig(
        seed=presence.seed,
        clip_steps=train.clip_steps,
        clip_batch_size=train.clip_batch_size,
        lr=train.lr,
        vae_steps=0,
        unet_steps=0,
        threads=train.threads,
    )


def prepare_presence(cfg: PlantedConfig, models: Path) -> Path:
    """The directory whose clip/ the scan embeds with: the presence CLIP (drawn and trained once per
    world and config, or the committed one), or the generator's models when `cfg.presence` is None."""
    if cfg.presence is None:
        return models
    from raymem.planted.training import train_presence_clip
    from raymem.planted.world import build_presence_corpus, cast_only, presence_key, world_key

    train = _presence_training(cfg.train, cfg.presence)
    # the corpus draws the world's cast, never its training images: the world with the hard cases (or
    # with mining's captions) shares the presence CLIP of the world without them
    world = f"world-{_digest(world_key(cast_only(cfg.world)))}"
    name = f"presence-{_digest([world, presence_key(cfg.presence), {**asdict(train), 'threads': 0}])}"
    root = _trained(cfg, name, COMMITTED_PRESENCE)
    if not (root / "training.json").exists():
        if not (root / "corpus" / "presence.json").exists():
            log.info("drawing the presence corpus into %s", root / "corpus")
            build_presence_corpus(root / "corpus", cfg.world, cfg.presence)
        log.info("training the presence CLIP into %s (CPU; minutes)", root)
        train_presence_clip(root / "corpus", root, train, cfg.presence.image_tower)
    return root


def prepare_index(cfg: PlantedConfig, world_root: Path, models: Path) -> Path:
    """`models`: the directory whose clip/ embeds (prepare_presence's answer). Keyed by the entities it
    tags too: a world whose tag list changes gets a new index, not yesterday's."""
    entities = [] if cfg.untagged else tagged_entities(world_root)
    out = Path(cfg.work) / f"index-{_digest([world_root.name, str(models.resolve()), entities])}"
    index_world(world_root, models, out, entities)
    return out


def tagged_entities(world_root: Path) -> list[str]:
    """The entity tags the world's training table is indexed with: the cast, the curve's and the region
    cases' named subjects, and every poster ("<title> poster": the cast's, the hard cases', the region
    cases' templates and requested works)."""
    from raymem.planted.world import POSTER_KINDS, cast, curve_entities, hard_posters, region_cases

    world = json.loads((world_root / "world.json").read_text())["config"]
    cast_entities, posters = cast(world["seed"])
    hard = hard_posters(world["seed"]) if world.get("hard_cases") else ()
    curve = [e for e, _ in curve_entities(world["seed"])] if world.get("hard_cases") else []
    regions = region_cases(world["seed"]) if world.get("region_cases") else ()
    subjects = [e.name for e, kind in regions if kind not in POSTER_KINDS]
    region_posters = [e.name for e, kind in regions if kind in POSTER_KINDS]
    entities = [e.name for e in (*cast_entities, *curve)] + subjects
    return entities + [f"{title} poster" for title in (*(t for t, _, _ in (*posters, *hard)), *region_posters)]


def index_world(world_root: Path, models: Path, out: Path, entities: list[str] | None = None) -> None:
    """`raymem index` over the world's training table with `models`/clip (skipped when done), tagged with
    `entities` (default: `tagged_entities`; [] leaves the table untagged)."""
    from raymem.config import IndexConfig
    from raymem.index import run_index

    if (out / "_index.json").exists():
        return
    entities = tagged_entities(world_root) if entities is None else entities
    run_index(
        IndexConfig.model_validate(
            {
                "input": {
                    "kind": "table",
                    "path": str(world_root / "world.jsonl"),
                    "image_column": "image",
                    "id_column": "train_id",
                },
                "output": str(out),
                "embedding": embedding(models),
                "entities": entities,
                "shard_size": 600,
                "background_sample": 600,
            }
        )
    )


def embedding(models: Path) -> dict:
    # SSCD at the world's native 32 px: upscaling the small images blurs exactly what it keys on.
    return {
        "clip": {"model": f"local-dir:{(models / 'clip').resolve()}", "pretrained": None},
        "copy_detection": {"model": "immaculate:sscd", "image_size": 32},
    }


def scan_config(
    cfg: PlantedConfig,
    world_root: Path,
    models: Path,
    index: Path,
    split: str,
    thresholds: dict,
    presence: Path | None = None,
):
    """The scan of a split: the pipeline of `models`, embedded with `presence`/clip (default: `models`')."""
    from raymem.config import parse_config

    return parse_config(
        {
            "name": f"planted-{split}",
            "model": {"id": str((models / "pipeline").resolve()), "name": "planted"},
            "prompts": str(prompts_path(world_root, split, cfg.negative_probes)),
            "generation": {
                "seeds_per_prompt": cfg.seeds_per_prompt,
                "num_inference_steps": cfg.num_inference_steps,
                "guidance_scale": cfg.guidance_scale,
                "height": 32,
                "width": 32,
                "batch_size": 16,
            },
            "embedding": embedding(presence or models),
            "training": {"embeddings": str(index)},
            "join": {"k": 20},
            "thresholds": thresholds,
            "signals": {
                "null_seeds": cfg.null_seeds,
                # on in the world whose captions name implied elements (`--mining`), off elsewhere: there
                # the prompt files list the implied elements and no caption names one
                "mine_elements": mining_on(cfg),
                "pixel_size": 32,
                "pixel_tiles": 4,
                "region_neighbours": cfg.region_neighbours,
                "placebo_names": cfg.placebo_names,
            },
            # One output tree per trained model, so a retrained model never shares tables with an old one.
            "output": {"uri": str(Path(cfg.work) / "scans" / models.resolve().name), "scan_date": "2026-01-01"},
        }
    )


# Caption mining's support floor for an implied element in the planted worlds. The config default (50)
# is sized for web-scale training sets; a planted entity has `per_entity` (80) images, so the floor is
# scaled to the world: 10 of 80, the same count at which an element stops being instance-specific
# (`instance_support`). Chosen from the world's sizes, before any mining scan was read.
MINING_MIN_SUPPORT = 10


def mining_on(cfg: PlantedConfig) -> bool:
    """Whether the benchmark scans with caption mining: in the world whose captions are drawn for it."""
    return bool(cfg.world.implied_named or cfg.world.noisy_mentions)


def base_thresholds(cfg: PlantedConfig) -> dict:
    """The thresholds a run starts from (the config defaults, the mining floor where mining is on, and
    `mi_needs_entity` when asked for)."""
    base: dict = {"min_support": MINING_MIN_SUPPORT} if mining_on(cfg) else {}
    return base | ({"mi_needs_entity": True} if cfg.mi_needs_entity else {})


def noisy_prompts(world: WorldConfig) -> dict[str, str]:
    """{prompt_id: detail} of the prompts whose entity's captions mention a detail it never shows."""
    from raymem.planted.world import noisy_details, slug_of

    if not world.noisy_mentions:
        return {}
    return {slug_of(name): detail for name, detail in noisy_details(world.seed).items()}


def mining_report(mined: dict[str, dict], world: WorldConfig, truth: dict[str, dict]) -> list[dict]:
    """What caption mining found per named entity of the scanned split, against what the world's captions
    hold: the implied element an MI entity's captions name (found: its words among the mined implied
    terms), the unseen detail (mined as an instance element: expected, the labeler must then not call it
    shown), and implied terms mined for an entity that implies nothing (spurious)."""
    from raymem.captions import caption_terms
    from raymem.planted.world import cast, noisy_details, slug_of

    entities, _ = cast(world.seed)
    details = noisy_details(world.seed) if world.noisy_mentions else {}
    rows = []
    for e in entities:
        if e.role == "control" or slug_of(e.name) not in truth or e.name not in mined:
            continue
        implied = [a["element"] for a in mined[e.name]["implied"]]
        instance = [a["element"] for a in mined[e.name]["instance"]]
        detail_terms = caption_terms(details.get(e.name))
        rows.append(
            {
                "entity": e.name,
                "role": e.role,
                "implied": e.implied or None,
                "implied_found": bool(e.implied) and bool(caption_terms(e.implied) & set(implied)),
                # an ME entity's explicit element is mined too; its prompt names it, so it is never probed
                "spurious_implied": [] if e.implied else [t for t in implied if t not in caption_terms(e.explicit)],
                "detail": details.get(e.name),
                "detail_mined": bool(detail_terms & set(instance)),
                "mined_implied": implied,
                "mined_instance": instance,
            }
        )
    return rows


def ground_truth(world_root: Path) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in map(json.loads, (world_root / "ground_truth.jsonl").read_text().splitlines())}


def evaluate(
    labels: list[dict],
    truth: dict[str, dict],
    world_seed: int | None = None,
    probes: dict[str, str] | None = None,
    train_seed: int = 0,
    noisy: dict[str, str] | None = None,
    seen: dict[str, dict] | None = None,
) -> dict:
    """Per image: its label against its expected label (`probes`: the prompts asked about an element
    their entity does not imply, `probed_prompts`; `noisy`: the prompts whose entity's captions mention
    a detail its images never show, `noisy_details`; `seen`: what each image's pixels show of the marks
    and logos, `image_truth`, which `expected_label` reads beside the prompt's truth), and the kind of
    case its prompt plants."""
    seen = seen or {}
    images = []
    for r in labels:
        prompt = truth[r["prompt_id"]]
        pixels = seen.get(r["unit_id"], {})
        images.append(
            {
                "world_seed": world_seed,
                "train_seed": train_seed,
                "kind": prompt.get("kind", ""),  # absent in worlds drawn before kinds existed
                "unit_id": r["unit_id"],
                "prompt_id": r["prompt_id"],
                "seed": r["seed"],
                "expected": expected_label(prompt, pixels),
                "predicted": r["label"] or "failed",
                "shows_mark": pixels.get("shows_mark"),
                "shows_logo": pixels.get("shows_logo"),
                "logo": pixels.get("logo"),
                # a control into which the generator drew a logo is no negative: it shows a copied patch
                "control": prompt["planted"].startswith("nothing") and not pixels.get("shows_logo"),
                "negative_probe": (probes or {}).get(r["prompt_id"]),
                "noisy_detail": (noisy or {}).get(r["prompt_id"]),
                "instance_element": "instance_element" in (r.get("flags") or ()),
                "reasons": r["reasons"],
            }
        )
    return score_images(images)


def expected_label(prompt: dict, pixels: dict) -> str:
    """An image's expected label: its prompt's (`ground_truth.jsonl`), unless its pixels say otherwise
    (`image_truth`) -- an image that shows a private mark or an agency's logo is MU, whatever its prompt
    asked for; a logo subject's image without the logo shows the subject the prompt names, as the ME
    prompts' entities do."""
    if pixels.get("shows_mark") or pixels.get("shows_logo"):
        return "MU"
    if prompt.get("kind") == "logo" and pixels.get("shows_logo") is False:
        return "ME"
    return prompt["expected"]


def image_truth(world_root: Path, truth: dict[str, dict], generations: list[dict]) -> dict[str, dict]:
    """{unit_id: what the image's pixels show} for the scored scan images: for a marked poster's images
    whether they show its private mark (`shows_mark`, `world.shows_mark`), and in a world with logos, for
    every image, whether it shows one and whose (`shows_logo`, `logo`; `world.LogoTruth`) -- read from
    the world's own pixels, never from what the labeler measured."""
    import io

    from PIL import Image

    from raymem import uri as uris
    from raymem.planted.world import LogoTruth, shows_mark
    from raymem.schema import ROLE_SCAN, STATUS_OK

    logos = LogoTruth(world_root)
    out = {}
    for g in generations:
        mark = truth.get(g["prompt_id"], {}).get("mark")
        if not (g["role"] == ROLE_SCAN and g["status"] == STATUS_OK and g["image_uri"]) or not (mark or logos.logos):
            continue
        image = Image.open(io.BytesIO(uris.read_bytes(g["image_uri"])))
        pixels = {}
        if mark:
            pixels["shows_mark"] = shows_mark(image, world_root, mark)
        if logos.logos:
            pixels["logo"] = logos.shown(image)
            pixels["shows_logo"] = pixels["logo"] is not None
        out[g["unit_id"]] = pixels
    return out


def _cluster(image: dict) -> tuple[int, str]:
    """The resampling unit of the intervals: one prompt of one world."""
    return (image.get("world_seed") or 0, image["prompt_id"])


def _counts(images: list[dict], clusters: list[tuple[int, str]], keep) -> list[int]:
    """Per cluster, in the given order, how many of its images `keep` accepts."""
    counts = Counter(_cluster(i) for i in images if keep(i))
    return [counts[c] for c in clusters]


def score_images(images: list[dict]) -> dict:
    """Precision, recall and the confusion matrix of image rows (`evaluate`'s), from one world or
    pooled over several; intervals resample whole prompts of whole worlds."""
    metrics = []
    prompts = sorted({_cluster(i) for i in images})
    for c in LABELS:
        tp = sum(1 for i in images if i["expected"] == c and i["predicted"] == c)
        predicted = sum(1 for i in images if i["predicted"] == c)
        expected = sum(1 for i in images if i["expected"] == c)

        def per_prompt(keep):
            return _counts(images, prompts, keep)

        tp_p = per_prompt(lambda i, c=c: i["expected"] == c and i["predicted"] == c)
        metrics.append(
            {
                "category": c,
                "expected": expected,
                "predicted": predicted,
                "true_positives": tp,
                "precision": tp / predicted if predicted else None,
                "recall": tp / expected if expected else None,
                # 95 % intervals: exact over images, and by resampling whole prompts (a prompt's images
                # are not independent: they share the prompt, the entity and how well the model draws it)
                "precision_ci": clopper_pearson(tp, predicted),
                "recall_ci": clopper_pearson(tp, expected),
                "precision_ci_prompts": cluster_bootstrap(tp_p, per_prompt(lambda i, c=c: i["predicted"] == c)),
                "recall_ci_prompts": cluster_bootstrap(tp_p, per_prompt(lambda i, c=c: i["expected"] == c)),
            }
        )
    columns = [*LABELS, "failed"]
    confusion = [
        {
            "expected": e,
            **{f"predicted_{p}": sum(1 for i in images if i["expected"] == e and i["predicted"] == p) for p in columns},
        }
        for e in LABELS
    ]

    def negatives(rows: list[dict], correct) -> dict:
        """A share of negatives labelled correctly: exact interval over images, and by prompt."""
        keys = sorted({_cluster(i) for i in rows})
        ok = sum(1 for i in rows if correct(i))
        by_prompt = [_counts(rows, keys, keep) for keep in (correct, lambda i: True)]
        return {
            "images": len(rows),
            "correct": ok,
            "rate": ok / len(rows) if rows else None,
            "ci": clopper_pearson(ok, len(rows)),
            "ci_prompts": cluster_bootstrap(*by_prompt),
        }

    # per kind of planted case (exact copies, the hard cases, each role): the share labelled as expected;
    # a marked poster's images apart by whether they show the mark, a logo subject's by whether they show
    # the logo, and any other image that shows a logo apart as a leak (their truth differs)
    def kind_of(i: dict) -> str:
        kind, mark, logo = i.get("kind") or "", i.get("shows_mark"), i.get("shows_logo")
        if not kind:
            return ""
        if mark is not None:
            return kind + (" (mark shown)" if mark else " (no mark)")
        if kind == "logo" and logo is not None:
            return kind + (" (logo shown)" if logo else " (no logo)")
        return kind + (" (logo leaked)" if logo else "")

    kinds = {
        kind: negatives(rows, lambda i: i["predicted"] == i["expected"])
        for kind in sorted({kind_of(i) for i in images} - {""})
        for rows in [[i for i in images if kind_of(i) == kind]]
    }
    controls = negatives([i for i in images if i["control"]], lambda i: i["predicted"] == "none")
    # the MI rule's negatives: images of prompts asked about an element their entity never shows
    probe_negatives = negatives([i for i in images if i.get("negative_probe")], lambda i: i["predicted"] != "MI")
    # the MU rule (b)'s negatives: images of entities whose captions mention a detail nobody drew
    instance_negatives = negatives([i for i in images if i.get("noisy_detail")], lambda i: not i["instance_element"])
    return {
        "images": images,
        "metrics": metrics,
        "confusion": confusion,
        "control_none_rate": controls["rate"],
        "controls": controls,
        "probe_negatives": probe_negatives,
        "instance_negatives": instance_negatives,
        "kinds": kinds,
    }


def pool_results(results_dirs: list[str | Path]) -> dict:
    """One score over several benchmark runs (`images.parquet` of each results directory): the
    issue's "over >= 3 world seeds", each prompt of each world one cluster. Each world and training
    seed at most once, so a run scanned twice (defaults and calibrated) cannot be pooled with itself;
    a world trained with several seeds pools them in the same clusters (its prompts)."""
    images, seen = [], {}
    for d in map(Path, results_dirs):
        path = d / "images.parquet"
        if not path.exists():
            raise ValueError(f"{path}: no images.parquet (not a `raymem bench planted` results directory)")
        rows = pq.read_table(path).to_pylist()
        for seed in {(r.get("world_seed"), r.get("train_seed") or 0) for r in rows}:
            if seed[0] is None:
                raise ValueError(
                    f"{path}: rows without world_seed (written before pooling existed; re-run the benchmark)"
                )
            if seed in seen:
                world = f"world seed {seed[0]}" + (f" (training seed {seed[1]})" if seed[1] else "")
                raise ValueError(f"{path}: {world} is already pooled from {seen[seed]}")
            seen[seed] = d
        images += rows
    result = score_images(images)
    result["world_seeds"] = sorted({world for world, _ in seen})
    result["runs"] = sorted(seen)
    return result


def run_name(cfg: PlantedConfig) -> str:
    """The results directory of one benchmark run: its world, training seed, thresholds and settings."""
    name = f"world{cfg.world.seed}" + (f"-train{cfg.train.seed}" if cfg.train.seed else "")
    name += f"-{'calibrated' if cfg.calibrate else 'default'}"
    name += f"-regions{cfg.region_neighbours}" if cfg.region_neighbours else ""
    name += "-hard" if cfg.world.hard_cases else ""
    name += "-mining" if mining_on(cfg) else ""
    name += "-regioncases" if cfg.world.region_cases else ""
    name += "-untagged" if cfg.untagged else ""
    name += "" if cfg.placebo_names else "-noplacebonames"
    name += "-mineedsentity" if cfg.mi_needs_entity else ""
    if cfg.presence is None:
        return name + "-sharedclip"
    return name + (f"-{cfg.presence.image_tower}clip" if cfg.presence.image_tower != "vit" else "")


def targets_report(result: dict) -> list[str]:
    lines = []
    for m in result["metrics"]:
        p, r = m["precision"], m["recall"]
        target = TARGETS.get(m["category"])
        met = (
            ""
            if target is None
            else " ("
            + target_verdict(
                [
                    (p, target[0], m.get("precision_ci_prompts") or m.get("precision_ci")),
                    (r, target[1], m.get("recall_ci_prompts") or m.get("recall_ci")),
                ]
            )
            + ")"
        )
        lines.append(
            f"{m['category']:5s} precision {_f(p)} {_ci(m.get('precision_ci'))} recall {_f(r)} "
            f"{_ci(m.get('recall_ci'))} ({m['true_positives']}/{m['predicted']} predicted, {m['expected']} expected)"
            f"{met}; by prompt: precision {_ci(m.get('precision_ci_prompts'))}, "
            f"recall {_ci(m.get('recall_ci_prompts'))}"
        )
    for name, what in (
        ("controls", "controls labelled none"),
        ("probe_negatives", "negative implied-element probes not labelled MI"),
        ("instance_negatives", "images of entities with unseen caption details not flagged instance_element"),
    ):
        neg = result.get(name) or {}
        if not neg.get("images"):
            continue
        verdict = target_verdict([(neg["rate"], CONTROL_NONE_TARGET, neg.get("ci_prompts") or neg["ci"])])
        lines.append(
            f"{what}: {_f(neg['rate'])} {_ci(neg['ci'])} ({neg['correct']}/{neg['images']}; {verdict}); "
            f"by prompt {_ci(neg.get('ci_prompts'))}"
        )
    mined = result.get("mining") or []
    if mined:
        mi = [m for m in mined if m["implied"]]
        lines.append(
            f"caption mining: implied element found for {sum(m['implied_found'] for m in mi)}/{len(mi)} MI "
            f"entities; unseen details mined as instance elements for {sum(m['detail_mined'] for m in mined)}/"
            f"{sum(1 for m in mined if m['detail'])}; spurious implied terms on "
            f"{sum(1 for m in mined if m['spurious_implied'])}/{len(mined) - len(mi)} other entities"
        )
    kinds = result.get("kinds") or {}
    if kinds:
        lines.append("labelled as expected, per kind of planted case:")
    for kind, share in kinds.items():
        lines.append(
            f"  {kind:12s} {_f(share['rate'])} {_ci(share['ci'])} ({share['correct']}/{share['images']}); "
            f"by prompt {_ci(share.get('ci_prompts'))}"
        )
    for fit in result.get("calibration") or []:
        verdict = (f"not fitted ({fit['not_fitted']}), thresholds kept; " if fit.get("not_fitted") else "") + (
            "target not reached"
            if not fit["target_met"]
            else "target reached, not shown by the pilot"
            if fit["unproven"]
            else "target reached"
        )
        lines.append(
            f"calibration pilot, {fit['category']:4s}: precision {_f(fit['precision'])} {_ci(fit['precision_ci'])} "
            f"({fit['correct']}/{fit['predicted']}), recall {_f(fit['recall'])}, {fit['images']} images of "
            f"{fit['prompts']} prompt{'' if fit['prompts'] == 1 else 's'}: {verdict}"
        )
    header = "expected \\ predicted  " + "  ".join(f"{c:>6s}" for c in [*LABELS, "failed"])
    lines.append(header)
    for row in result["confusion"]:
        lines.append(f"{row['expected']:20s}  " + "  ".join(f"{row[f'predicted_{c}']:6d}" for c in [*LABELS, "failed"]))
    return lines


def pilot_fit(inputs, pilot: dict[str, str], fitted, target: float) -> list[dict]:
    """Per category, the fitted thresholds on the calibration pilot they were fitted to: precision with
    its exact interval, recall, the prompts behind it, whether the pilot shows the target at all, and why
    a category was not fitted (`not_fitted`: too few pilot prompts of it)."""
    from raymem.calibrate import (
        MIN_FIT_PROMPTS,
        precision_interval,
        precision_recall,
        reaches_target,
        too_few_prompts,
        unproven,
    )
    from raymem.label import label_units

    after = precision_recall(label_units(inputs, fitted), pilot)
    doubtful = unproven(after, target)
    unfitted = too_few_prompts(inputs, pilot, MIN_FIT_PROMPTS)
    return [
        {
            "category": category,
            "images": pr["n"],
            "prompts": pr["prompts"],
            "correct": pr["correct"],
            "predicted": pr["predicted"],
            "precision": pr["precision"],
            "precision_ci": precision_interval(pr),
            "recall": pr["recall"],
            "target_met": reaches_target(pr, target),
            "unproven": category in doubtful,
            "not_fitted": unfitted.get(category),
        }
        for category, pr in after.items()
        if pr["n"]
    ]


def _ci(ci) -> str:
    return "[  -  ]" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _f(x) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def run_benchmark(cfg: PlantedConfig) -> dict:
    from raymem import runtime
    from raymem.calibrate import fit
    from raymem.config import ThresholdsConfig
    from raymem.label_inputs import LabelInputs
    from raymem.pipeline import run_scan

    if cfg.models:
        check_models(Path(cfg.models))  # before anything is drawn or written
    timings = {}
    cfg.work = str(Path(cfg.work).resolve())
    t0 = time.perf_counter()
    world_root = prepare_world(cfg)
    timings["world_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    models = prepare_models(cfg, world_root)
    timings["models_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    presence = prepare_presence(cfg, models)
    timings["presence_s"] = time.perf_counter() - t0
    with runtime.ray_session():
        t0 = time.perf_counter()
        index = prepare_index(cfg, world_root, presence)
        timings["index_s"] = time.perf_counter() - t0
        truth = ground_truth(world_root)
        if cfg.negative_probes:  # the prompt files scan_config names
            for split in ("calib", "eval"):
                probed_prompts(world_root, split, cfg.world.seed)
        thresholds: dict = base_thresholds(cfg)
        calibration: list[dict] = []
        if cfg.calibrate:
            t0 = time.perf_counter()
            calib_cfg = scan_config(cfg, world_root, models, index, "calib", thresholds, presence)
            calib = run_scan(calib_cfg)
            inputs = LabelInputs.read(calib_cfg.output.uri, calib.scan_id)
            parent = {g["unit_id"]: g["parent_prompt_id"] for g in inputs.generations}
            seen = image_truth(world_root, truth, inputs.generations)  # marks and logos: truth per image
            pilot = {uid: expected_label(truth[parent[uid]], seen.get(uid, {})) for uid in inputs.scored_scan_units()}
            fitted, _ = fit(inputs, pilot, ThresholdsConfig(**thresholds), cfg.target_precision)
            thresholds = json.loads(fitted.model_dump_json())
            calibration = pilot_fit(inputs, pilot, fitted, cfg.target_precision)
            timings["calibrate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_cfg = scan_config(cfg, world_root, models, index, "eval", thresholds, presence)
        scan = run_scan(eval_cfg)
        timings["scan_s"] = time.perf_counter() - t0
    from raymem.outputs import read_scan_table

    labels = read_scan_table(eval_cfg.output.uri, scan.scan_id, "labels").to_pylist()
    probes = negative_probes(world_root, "eval") if cfg.negative_probes else {}
    noisy = noisy_prompts(cfg.world)
    generations = read_scan_table(eval_cfg.output.uri, scan.scan_id, "generations").select(
        ["unit_id", "prompt_id", "role", "status", "image_uri"]
    )
    seen = image_truth(world_root, truth, generations.to_pylist())
    result = evaluate(labels, truth, cfg.world.seed, probes, cfg.train.seed, noisy, seen)
    mined = mining_report(scan.counts.get("mined_elements") or {}, cfg.world, truth) if mining_on(cfg) else []
    out = Path(cfg.work) / "results" / run_name(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(result["metrics"]), out / "metrics.parquet")
    pq.write_table(pa.Table.from_pylist(result["confusion"]), out / "confusion.parquet")
    pq.write_table(pa.Table.from_pylist(result["images"]), out / "images.parquet")
    summary = {
        "scan_id": scan.scan_id,
        "thresholds": thresholds or "config defaults",
        "calibration": calibration,
        "timings": timings,
        "metrics": result["metrics"],
        "control_none_rate": result["control_none_rate"],
        "controls": result["controls"],
        "probe_negatives": result["probe_negatives"],
        "instance_negatives": result["instance_negatives"],
        "mining": mined,
        "kinds": result["kinds"],
        "models": str(models),
        "presence_clip": str(presence / "clip"),
        "world": str(world_root),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    result.update(summary=summary, results_dir=str(out), mining=mined, calibration=calibration)
    return result
