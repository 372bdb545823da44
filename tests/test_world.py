"""The planted world: deterministic, and planted as its ground truth says."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from raymem.planted.world import (
    DEV_SEED,
    ENTITIES,
    POSTERS,
    SCENES,
    WorldConfig,
    benchmark_prompts,
    build_world,
    cast,
)

SMALL = WorldConfig(per_entity=12, per_class=6, poster_copies=5)


def rows(root):
    return [json.loads(line) for line in (root / "world.jsonl").read_text().splitlines()]


def test_world_is_deterministic(tmp_path):
    build_world(tmp_path / "a", SMALL)
    build_world(tmp_path / "b", SMALL)
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [(r["train_id"], r["caption"]) for r in ra] == [(r["train_id"], r["caption"]) for r in rb]
    for r in ra[:20]:
        a = np.asarray(Image.open(tmp_path / "a" / "images" / f"{r['train_id']}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / "images" / f"{r['train_id']}.png"))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [DEV_SEED, 11])
def test_planted_cases_match_the_ground_truth(tmp_path, seed):
    """The development world and a fresh one (seed 11): the same checks, whatever the cast."""
    config = WorldConfig(**{**SMALL.__dict__, "seed": seed})
    entities, posters = cast(seed)
    build_world(tmp_path, config)
    world = rows(tmp_path)
    captions = " | ".join(r["caption"] for r in world)
    # MU: each poster is one image repeated under its caption; the private mark is never named.
    by_caption = Counter(r["caption"] for r in world if r["role"] == "MU")
    assert set(by_caption.values()) == {SMALL.poster_copies} and len(by_caption) == len(posters)
    for title, _, _ in posters:
        copies = [r for r in world if r["caption"] == f"the {title} poster"]
        pixels = {np.asarray(Image.open(r["image"])).tobytes() for r in copies}
        assert len(pixels) == 1
    assert "mark" not in captions and "magenta" not in captions
    # MI: implied elements are never named with their entity, but are named elsewhere in the world.
    for e in entities:
        named = [r for r in world if e.name in r["entities"]]
        if e.role == "control":
            assert not named and e.name not in captions  # controls: the world never shows them
        if e.implied:
            assert named and not any(e.implied in r["caption"] for r in named)
            assert e.implied in captions
    # Every benchmark prompt has its expected label, and the splits are disjoint.
    truth = [json.loads(line) for line in (tmp_path / "ground_truth.jsonl").read_text().splitlines()]
    assert {t["prompt_id"] for t in truth} == {p["prompt_id"] for p in benchmark_prompts(seed)}
    assert Counter(t["expected"] for t in truth if t["split"] == "eval") == {"MU": 6, "ME": 3, "MI": 3, "none": 4}
    evals = {json.loads(line)["prompt_id"] for line in (tmp_path / "prompts-eval.jsonl").read_text().splitlines()}
    calib = {json.loads(line)["prompt_id"] for line in (tmp_path / "prompts-calib.jsonl").read_text().splitlines()}
    assert evals and calib and not evals & calib


def test_every_other_seed_draws_a_fresh_cast_with_the_same_design():
    """Worlds from a seed: invented names nobody tuned to, the same roles per split as the development
    world, an implied element per MI entity (the calib one shares one) and explicit ones kept apart."""

    def design(cast_):
        entities, posters = cast_
        return sorted((e.role, e.split, bool(e.implied), bool(e.explicit)) for e in entities), sorted(
            (split, private) for _, split, private in posters
        )

    dev_names = {e.name for e in ENTITIES} | {t for t, _, _ in POSTERS}
    seen = set()
    for seed in (1, 11, 12, 99):
        entities, posters = cast(seed)
        assert design((entities, posters)) == design((ENTITIES, POSTERS))
        names = [e.name for e in entities] + [t for t, _, _ in posters]
        assert len(set(names)) == len(names) and not set(names) & dev_names and not set(names) & seen
        seen |= set(names)
        implied = {e.implied for e in entities if e.implied}
        explicit = {e.explicit for e in entities if e.explicit}
        assert len(implied) == 3 and len(explicit) == 2 and not implied & explicit
        assert cast(seed) == (entities, posters)  # deterministic
    assert cast(DEV_SEED) == (ENTITIES, POSTERS)  # the development world is the fixed one


def test_training_is_deterministic(tmp_path):
    """Same world and seed, same weights: the benchmark's cached models can be rebuilt bit for bit."""
    import hashlib

    from raymem.planted.training import TrainConfig, train_world_models

    build_world(tmp_path / "world", WorldConfig(per_entity=2, per_class=2, poster_copies=2))
    cfg = TrainConfig(vae_steps=3, unet_steps=3, clip_steps=3, batch_size=8, clip_batch_size=8)

    def digest(out):
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "training.json")
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    train_world_models(tmp_path / "world", tmp_path / "a", cfg)
    train_world_models(tmp_path / "world", tmp_path / "b", cfg)
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert any(name.endswith(".safetensors") for name in a) and a == b


def test_clip_batches_with_same_subject_partners(tmp_path):
    """bench/presence_training.py's `pairs` variant: half of a batch random, the other half one image of
    the same subject each; training with it runs, and without partners nothing changes (the test above)."""
    import torch

    from raymem.planted.training import TrainConfig, _with_partners, load_world, train_clip

    partners = [[1, 2], [0, 2], [0, 1], [4], [3]]  # never the anchor itself: a copy would fail
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchors = torch.randint(0, 5, (4,), generator=g)
        batch = _with_partners(anchors, partners, g).tolist()
        assert len(batch) == 8 and batch[:4] == anchors.tolist()
        assert all(b in partners[a] for a, b in zip(batch[:4], batch[4:]))
    build_world(tmp_path / "world", WorldConfig(per_entity=2, per_class=2, poster_copies=2))
    pixels, captions = load_world(tmp_path / "world")
    by_caption = [[j for j, c in enumerate(captions) if c.split()[-1] == cap.split()[-1]] for cap in captions]
    model = train_clip(pixels, captions, TrainConfig(clip_steps=4, clip_batch_size=8), by_caption)
    assert model.encode_image(pixels[:2]).shape == (2, 64)


@pytest.mark.parametrize("seed", [DEV_SEED, 11])
def test_the_presence_corpus_is_the_same_world_seen_apart_from_the_generators(tmp_path, seed):
    """Issue 12's independent measurement: the presence CLIP learns from other images (none is a
    training image) and other captions (none is a training caption), showing the same cast and
    elements; controls appear nowhere, and an MI entity's implied element is never named with it."""
    from raymem.planted.world import PresenceConfig, build_presence_corpus

    world_cfg = WorldConfig(**{**SMALL.__dict__, "seed": seed})
    small = PresenceConfig(per_entity=12, per_class=8, posters=4)
    build_world(tmp_path / "world", world_cfg)
    build_presence_corpus(tmp_path / "a", world_cfg, small)
    build_presence_corpus(tmp_path / "b", world_cfg, small)
    corpus = [json.loads(line) for line in (tmp_path / "a" / "presence.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "presence.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in corpus] == [r["caption"] for r in again]  # deterministic
    entities, _ = cast(seed)
    drawn = [e for e in entities if e.role != "control"]
    assert len(corpus) == len(drawn) * small.per_entity + 6 * small.per_class + small.posters

    def pixels(path):
        return np.asarray(Image.open(path)).tobytes()

    training = {pixels(r["image"]) for r in rows(tmp_path / "world")}
    assert not training & {pixels(r["image"]) for r in corpus}  # disjoint images
    assert [pixels(r["image"]) for r in corpus[:10]] == [pixels(r["image"]) for r in again[:10]]
    world_captions = {r["caption"] for r in rows(tmp_path / "world")}
    captions = [r["caption"] for r in corpus]
    assert not world_captions & set(captions)  # paraphrased: no caption is the generator's
    text = " | ".join(captions)
    for e in entities:
        with_name = [c for c in captions if e.name in c]
        if e.role == "control":
            assert not with_name
        else:
            assert len(with_name) == small.per_entity
        if e.implied:
            assert not any(e.implied in c for c in with_name) and e.implied in text


@pytest.mark.parametrize("seed", [DEV_SEED, 11])
def test_hard_cases_are_planted_as_their_ground_truth_says(tmp_path, seed):
    """Issue 12's hard cases: every kind in both splits, under names of their own; near-duplicates that
    are never the same bytes, captions that are never the prompt, templates that share everything but
    their centre, and requested works flagged in the prompt file -- and the world without them as it was."""
    from raymem.planted.world import CURVE_COUNTS, HARD_KINDS, curve_entities, hard_posters, retrieved_captions

    config = WorldConfig(**{**SMALL.__dict__, "seed": seed, "poster_copies": 8, "hard_cases": True})
    build_world(tmp_path / "hard", config)
    build_world(tmp_path / "plain", WorldConfig(**{**SMALL.__dict__, "seed": seed, "poster_copies": 8}))
    world, plain = rows(tmp_path / "hard"), rows(tmp_path / "plain")
    hard, curve = hard_posters(seed), curve_entities(seed)
    assert len(world) == len(plain) + len(hard) * 8 + sum(n for _, n in curve)
    assert {(split, kind) for _, split, kind in hard} == {(s, k) for s in ("eval", "calib") for k in HARD_KINDS}
    entities, posters = cast(seed)
    cast_words = {w for name in [e.name for e in entities] + [t for t, _, _ in posters] for w in name.split()}
    hard_words = {w for title, _, _ in hard for w in title.split()}
    assert not cast_words & hard_words
    # the under-memorization curve: named entities drawn 5, 20 and 50 times, in both splits
    assert sorted((e.split, n) for e, n in curve) == sorted(
        (split, n) for split, k in (("eval", 2), ("calib", 1)) for _ in range(k) for n in CURVE_COUNTS
    )
    for e, n in curve:
        assert not set(e.name.split()) & (cast_words | hard_words) and e.role == "ME" and len(e.colors) == 3
        assert sum(1 for r in world if r["entities"] == [e.name]) == n

    def copies(title):
        found = [r for r in world if r["entities"] == [f"{title} poster"]]
        assert len(found) == 8
        return found, [np.asarray(Image.open(r["image"])).astype(int) for r in found]

    for title, _, kind in hard:
        found, images = copies(title)
        distinct = len({i.tobytes() for i in images})
        captions = {r["caption"] for r in found}
        if kind == "varied":
            # other bytes every copy, yet each much closer to the others than to another poster
            assert distinct == 8 and captions == {f"the {title} poster"}
            other = copies(next(t for t, _, k in hard if k == "requested"))[1][0]
            assert max(np.abs(i - images[0]).mean() for i in images) < 0.5 * np.abs(other - images[0]).mean()
        elif kind == "template":
            assert distinct == 8
            for corner in (np.s_[:5, :5], np.s_[-5:, -5:], np.s_[:5, -5:], np.s_[-5:, :5]):
                assert len({i[corner].tobytes() for i in images}) == 1  # the layout is shared
            # the centre panel is each copy's own
            assert len({i[12:20, 12:20].tobytes() for i in images}) == 8
        elif kind == "retrieved":
            assert distinct == 1 and captions == set(retrieved_captions(title))
            assert f"the {title} poster" not in captions
        else:
            assert distinct == 1 and captions == {f"the {title} poster"}
    truth = {
        json.loads(line)["prompt_id"]: json.loads(line)
        for line in (tmp_path / "hard" / "ground_truth.jsonl").read_text().splitlines()
    }
    prompts = [
        json.loads(line)
        for split in ("eval", "calib")
        for line in (tmp_path / "hard" / f"prompts-{split}.jsonl").read_text().splitlines()
    ]
    for title, split, kind in hard:
        pid = "poster-" + title.lower().replace(" ", "-")
        assert truth[pid]["expected"] == HARD_KINDS[kind][0] and truth[pid]["kind"] == kind
        assert truth[pid]["split"] == split
    for e, n in curve:
        pid = e.name.lower().replace(" ", "-")
        assert (truth[pid]["expected"], truth[pid]["kind"], truth[pid]["split"]) == ("ME", f"ME {n} images", e.split)
    assert {p["prompt_id"] for p in prompts if p.get("requests_work")} == {
        "poster-" + t.lower().replace(" ", "-") for t, _, k in hard if k == "requested"
    }
    # the plain world is drawn as before: the same rows, bytes and prompt files
    same = {r["train_id"] for r in plain}
    assert [r["train_id"] for r in world if r["train_id"] in same] != [] and not any(
        "requests_work" in line for line in (tmp_path / "plain" / "prompts-eval.jsonl").read_text().splitlines()
    )
    for r in plain[:30]:
        twin = tmp_path / "hard" / "images" / f"{r['train_id']}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(r["image"])), np.asarray(Image.open(twin)))


@pytest.mark.parametrize("seed", [DEV_SEED, 11])
def test_region_cases_are_planted_as_their_ground_truth_says(tmp_path, seed):
    """Issue 12's region copies: a room shared by every image of a backdrop's subject (posed anew in each),
    a logo in the same corner of every image of a logo's subject (its scenes varied), templates, requested
    works with and without a private mark on a third of their copies; each kind
    in both splits under names of their own, no caption naming the room or the logo -- and the world
    without them as it was."""
    from raymem.planted.world import (
        HARD_PER_SPLIT,
        LOGO,
        LOGO_BOX,
        MARK_BOX,
        POSTER_KINDS,
        REGION_KINDS,
        SIZE,
        LogoTruth,
        hard_posters,
        region_cases,
        shows_mark,
        slug_of,
        world_key,
    )
    from raymem.regions import tile_stats

    sizes = {**SMALL.__dict__, "seed": seed, "poster_copies": 6}
    build_world(tmp_path / "region", WorldConfig(**{**sizes, "region_cases": True}))
    build_world(tmp_path / "plain", WorldConfig(**sizes))
    world, plain = rows(tmp_path / "region"), rows(tmp_path / "plain")
    cases = region_cases(seed)
    assert len(world) == len(plain) + 6 * len(cases)
    assert Counter((e.split, kind) for e, kind in cases) == {
        (split, kind): count for split, count in HARD_PER_SPLIT.items() for kind in REGION_KINDS
    }
    entities, posters = cast(seed)
    others = [e.name for e in entities] + [t for t, _, _ in (*posters, *hard_posters(seed))]
    words = {w for name in others for w in name.split()}
    assert not words & {w for e, _ in cases for w in e.name.split()}

    def images(found):
        return [np.asarray(Image.open(r["image"])).astype(float) / 255 for r in found]

    truth = {r["prompt_id"]: r for r in map(json.loads, (tmp_path / "region" / "ground_truth.jsonl").open())}
    for e, kind in cases:
        found = sorted(
            (r for r in world if r["entities"] in ([e.name], [f"{e.name} poster"])), key=lambda r: r["train_id"]
        )
        assert len(found) == 6 and {r["role"] for r in found} == {REGION_KINDS[kind][0]}
        pics = images(found)
        if kind in ("marked", "requested"):
            # a requested work: one poster, and for `marked` one copy in three carries the private mark --
            # the only pixels the marked copies change, and what the ground truth tells apart
            distinct = {p.tobytes(): p for p in pics}
            assert len(distinct) == (2 if kind == "marked" else 1)
            assert {r["caption"] for r in found} == {f"the {e.name} poster"}
            if kind == "marked":
                with_mark, without = pics[0], pics[1]  # copies 0 and 3 carry the mark
                assert np.array_equal(pics[3], with_mark) and not np.array_equal(with_mark, without)
                x0, y0, x1, y1 = MARK_BOX
                outside = np.ones(with_mark.shape[:2], bool)
                outside[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2] = False  # the reduction's kernel reaches 2 px out
                assert (
                    np.abs(with_mark - without)[outside].max() == 0
                    and np.abs(with_mark - without)[~outside].max() > 0.5
                )
                mark = truth["poster-" + slug_of(e.name)]["mark"]
                as_image = [Image.fromarray((p * 255).round().astype(np.uint8)) for p in (with_mark, without)]
                assert [shows_mark(i, tmp_path / "region", mark) for i in as_image] == [True, False]
            continue
        assert len({p.tobytes() for p in pics}) == 6  # no two training images the same bytes
        copied = [tile_stats(pics[0], p, 8) for p in pics[1:]]
        shared = [int(((l2 <= 0.1) & (tex >= 0.1)).sum()) for l2, tex in copied]
        captions = {r["caption"] for r in found}
        if kind == "backdrop":
            # the room: the same textured tiles at the same position in every image, far more than distinct
            # images of one scene share (<= 6): a quarter of the image at least; the caption names no room
            assert min(shared) >= 16 and captions == {f"a photo of {'' if e.cls == 'city' else 'the '}{e.name} at home"}
        elif kind == "logo":
            corner = [p[-LOGO:, :LOGO] for p in pics]
            assert all(np.array_equal(c, corner[0]) for c in corner)  # the very same patch ...
            corner_tiles = [8 * row + col for row in (6, 7) for col in (0, 1)]  # its 2 x 2 tiles of the grid
            assert all(((l2[corner_tiles] <= 0.1) & (tex[corner_tiles] >= 0.1)).all() for l2, tex in copied)
            assert len(captions) > 1 and not any("logo" in c for c in captions)  # scenes varied, logo unnamed
        else:
            assert captions == {f"the {e.name} poster"}
    requested = {
        json.loads(line)["prompt_id"]
        for split in ("eval", "calib")
        for line in (tmp_path / "region" / f"prompts-{split}.jsonl").open()
        if json.loads(line).get("requests_work")
    }
    for e, kind in cases:
        pid = ("poster-" if kind in POSTER_KINDS else "") + e.name.lower().replace(" ", "-")
        assert (truth[pid]["expected"], truth[pid]["kind"], truth[pid]["split"]) == (
            REGION_KINDS[kind][0],
            kind,
            e.split,
        )
        assert (pid in requested) == (kind in ("marked", "requested")) and ("mark" in truth[pid]) == (kind == "marked")
    # the world without region cases keeps its images and its digest
    same = {r["train_id"]: r for r in world}
    for r in plain[:30]:
        np.testing.assert_array_equal(
            np.asarray(Image.open(r["image"])), np.asarray(Image.open(same[r["train_id"]]["image"]))
        )
    assert "region_cases" not in world_key(WorldConfig(**sizes))
    # the logos' ground truth, from the world's pixels: every logo subject's training image shows its own
    # logo, no other training image shows one, and neither does a logo subject's image whose corner is
    # painted over -- while a logo pasted into any other image is seen as that subject's (a leak)
    logos = LogoTruth(tmp_path / "region")
    subjects = {e.name for e, kind in cases if kind == "logo"}
    assert set(logos.logos) == subjects and LogoTruth(tmp_path / "plain").logos == {}
    assert LogoTruth(tmp_path / "plain").shown(Image.open(world[0]["image"])) is None
    by_subject = {r["entities"][0]: r for r in world if r["entities"] and r["entities"][0] in subjects}
    plain_rows = [r for r in world if not set(r["entities"]) & subjects]
    for subject, r in by_subject.items():
        stamped = Image.open(r["image"]).convert("RGB")
        assert logos.shown(stamped) == subject
        painted = stamped.copy()
        painted.paste(Image.open(plain_rows[0]["image"]).convert("RGB").crop(LOGO_BOX), LOGO_BOX[:2])
        assert logos.shown(painted) is None
        leaked = Image.open(plain_rows[1]["image"]).convert("RGB")
        leaked.paste(stamped.crop(LOGO_BOX), LOGO_BOX[:2])
        assert logos.shown(leaked) == subject
        # a generated image may come larger than the world's: seen at the world's size
        assert logos.shown(leaked.resize((4 * SIZE, 4 * SIZE), Image.NEAREST)) == subject
    assert not any(logos.shown(Image.open(r["image"])) for r in plain_rows[:200])


def test_the_mining_world_names_implied_elements_and_unseen_details_in_its_captions(tmp_path):
    """`bench planted --mining`: the same images as the world without it; a share of an MI entity's
    captions name its implied element, a few captions of every named entity mention a detail no image
    shows (a word no other caption has), and the prompt files list no implied element."""
    from raymem.planted.world import VARIANTS, noisy_details, world_key

    sizes = {**SMALL.__dict__, "per_entity": 30}
    build_world(tmp_path / "plain", WorldConfig(**sizes))
    build_world(tmp_path / "mining", WorldConfig(**{**sizes, "implied_named": 1 / 3, "noisy_mentions": 3}))
    plain, mining = rows(tmp_path / "plain"), rows(tmp_path / "mining")
    assert [r["train_id"] for r in plain] == [r["train_id"] for r in mining]
    for a, b in zip(plain, mining):
        assert (tmp_path / "plain" / "images" / f"{a['train_id']}.png").read_bytes() == (
            tmp_path / "mining" / "images" / f"{b['train_id']}.png"
        ).read_bytes()
    details = noisy_details(DEV_SEED)
    named = [e for e in ENTITIES if e.role != "control"]
    assert set(details) == {e.name for e in named} and len(set(details.values())) == len(named)
    for e in named:
        captions = [r["caption"] for r in mining if r["entities"] == [e.name]]
        before = [r["caption"] for r in plain if r["entities"] == [e.name]]
        if e.implied:
            assert sum(e.implied in c for c in captions) == 10 and not any(e.implied in c for c in before)
        word = details[e.name].split()[1]
        assert sum(details[e.name] in c for c in captions) == 3
        assert sum(word in r["caption"] for r in mining) == 3  # seen with this entity alone
        # the same image under the same scene: only the mentions were added
        assert all(any(b.endswith(s) and c.endswith(s) for s in SCENES) for b, c in zip(before, captions))
    generic = [(a["caption"], b["caption"]) for a, b in zip(plain, mining) if not a["entities"]]
    assert all(x == y for x, y in generic)  # only the named entities' captions change
    prompts = [
        json.loads(line)
        for split in ("eval", "calib")
        for line in (tmp_path / "mining" / f"prompts-{split}.jsonl").read_text().splitlines()
    ]
    assert prompts and all(p["implicit_elements"] == [] for p in prompts)
    truth = [json.loads(line) for line in (tmp_path / "mining" / "ground_truth.jsonl").read_text().splitlines()]
    assert sum(t["expected"] == "MI" for t in truth) == sum(e.role == "MI" for e in ENTITIES)
    # the world without the variants keeps its digest (and its committed models)
    assert not set(VARIANTS) & set(world_key(WorldConfig(**sizes)))
    assert world_key(WorldConfig(**{**sizes, "noisy_mentions": 3}))["noisy_mentions"] == 3
