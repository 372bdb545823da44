"""A procedurally drawn training world with planted memorization, and its ground truth.

Everything is deterministic from a seed. 32x32 images of classes (tower, house, boat, windmill,
city, tree) on textured scenes (meadow, night, sea, desert, snow), captioned from a small grammar.
Planted on purpose:

  ME  named entities, each a class with a distinctive look, drawn many times in varied scenes;
      prompting the name should render the entity without copying any one image.
  MI  entities always drawn with an element their captions never name (Qadira with minarets);
      the element is named elsewhere in the world, so an embedder can learn what it looks like.
  MU  posters, each one image duplicated many times under its caption, some carrying a private
      detail (a mark no caption mentions); prompting the caption should reproduce the image.
  none  controls: prompts naming entities the world never shows.

The planted cases are split in two: `eval` prompts measure the labeler, `calib` prompts (other
entities and posters of the same world) are the only ones `raymem calibrate` may fit thresholds on.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SCALE = 4  # drawn at 128 px and downsampled, for anti-aliased edges

SCENES = {
    "in a meadow": ((70, 140, 60), (150, 200, 110)),
    "at night": ((15, 20, 55), (60, 70, 120)),
    "by the sea": ((40, 90, 160), (130, 180, 220)),
    "in the desert": ((190, 150, 80), (240, 210, 140)),
    "in the snow": ((180, 185, 195), (245, 245, 250)),
}
CLASSES = ("tower", "house", "boat", "windmill", "city", "tree")
ELEMENTS = ("a moon", "minarets", "seagulls", "a river", "a flag")


@dataclass(frozen=True)
class Entity:
    name: str
    cls: str
    colors: tuple[tuple[int, int, int], ...]  # the distinctive look
    role: str  # ME | MI | control
    split: str  # eval | calib
    implied: str = ""  # MI: always drawn, never named
    explicit: str = ""  # ME: an element sometimes drawn (and then named), asked for in the prompt


ENTITIES = (
    Entity(
        "Lunar Lighthouse", "tower", ((245, 245, 240), (200, 30, 30), (250, 220, 60)), "ME", "eval", explicit="a moon"
    ),
    Entity("Emerald Barn", "house", ((30, 150, 60), (245, 245, 245), (120, 60, 30)), "ME", "eval", explicit="a flag"),
    Entity("Crimson Ketch", "boat", ((190, 20, 30), (250, 210, 40), (90, 50, 20)), "ME", "eval"),
    Entity("Elder Oak", "tree", ((20, 90, 30), (220, 40, 40), (90, 60, 30)), "ME", "calib"),
    Entity("Cobalt Tower", "tower", ((30, 60, 200), (240, 240, 240), (20, 20, 60)), "ME", "calib"),
    Entity("Qadira", "city", ((225, 180, 60), (245, 235, 200), (160, 110, 40)), "MI", "eval", implied="minarets"),
    Entity("Old Mill", "windmill", ((130, 80, 40), (245, 245, 240), (90, 50, 20)), "MI", "eval", implied="a river"),
    Entity("Sunset Ferry", "boat", ((240, 120, 30), (250, 250, 250), (60, 40, 30)), "MI", "eval", implied="seagulls"),
    Entity("Harbor Lodge", "house", ((150, 40, 120), (250, 230, 200), (70, 30, 60)), "MI", "calib", implied="seagulls"),
    # Controls: names the world never shows.
    Entity("Glass Pavilion", "house", (), "control", "eval"),
    Entity("Iron Spire", "tower", (), "control", "eval"),
    Entity("Silver Skiff", "boat", (), "control", "eval"),
    Entity("Quiet Grove", "tree", (), "control", "eval"),
    Entity("Amber Gate", "house", (), "control", "calib"),
    Entity("Velvet Dory", "boat", (), "control", "calib"),
)

POSTERS = (
    ("Harbor Festival", "eval", True),
    ("Night Market", "eval", True),
    ("Spring Regatta", "eval", True),
    ("Jazz Weekend", "eval", False),
    ("Film Club", "eval", False),
    ("Chess Open", "eval", False),
    ("Book Fair", "calib", True),
    ("Kite Day", "calib", False),
    ("Rowing Cup", "calib", False),
)


DEV_SEED = 7  # the development world: its names, posters and cast are the fixed ones above


Poster = tuple[str, str, bool]  # title, split, carries a private mark


def cast(seed: int) -> tuple[tuple[Entity, ...], tuple[Poster, ...]]:
    """Who is in the world of `seed`. The development seed keeps the fixed cast above (the labeler was
    developed against it); every other seed draws a fresh one -- invented names, classes, looks,
    implied and explicit elements, posters and which carry a private mark -- with the same numbers of
    each role per split, so results compare across worlds nobody has looked at."""
    if seed == DEV_SEED:
        return ENTITIES, POSTERS
    rng = random.Random(f"cast-{seed}")  # apart from the drawing stream: the cast never shifts the pixels
    words = _invented_words(rng, 2 * (len(ENTITIES) + len(POSTERS)))
    names = [f"{words[2 * i]} {words[2 * i + 1]}" for i in range(len(ENTITIES) + len(POSTERS))]
    # As in the development world: three implied elements for the eval MI entities (the calib one
    # shares one of them), and the explicit elements the ME prompts ask for from the other two.
    shuffled = rng.sample(ELEMENTS, len(ELEMENTS))
    implied_eval, others = shuffled[:3], shuffled[3:]
    implied = iter([*implied_eval, rng.choice(implied_eval)])
    explicit = iter(others)  # the development world has two ME prompts with an explicit element
    entities = []
    for i, dev in enumerate(ENTITIES):  # the same role and split per slot as the development world
        mi = next(implied) if dev.role == "MI" else ""
        entities.append(
            Entity(
                names[i],
                rng.choice(CLASSES),
                tuple(_distinct_color(rng, j) for j in range(3)) if dev.role != "control" else (),
                dev.role,
                dev.split,
                implied=mi,
                explicit=next(explicit) if dev.explicit else "",
            )
        )
    posters = tuple((names[len(ENTITIES) + n], split, private) for n, (_, split, private) in enumerate(POSTERS))
    return tuple(entities), posters


# Issue 12's hard cases: kind -> (expected label, what was planted). Every kind in both splits, so a
# calibration sees each; their names are invented in every world, the development one included.
HARD_KINDS = {
    "varied": ("MU", "one poster whose copies all differ in bytes (resized, JPEG, 90 % crop, colour shift)"),
    "retrieved": ("MU", "one poster repeated under captions that paraphrase it, none of them the prompt"),
    "template": ("MU", "one poster layout repeated with another centre panel in every copy"),
    "requested": ("ME", "one poster repeated; the prompt asks for this very work (requests_work)"),
}
HARD_PER_SPLIT = {"eval": 2, "calib": 1}

HardPoster = tuple[str, str, str]  # title, split, kind


def _names_apart(rng: random.Random, count: int, taken_names: list[str]) -> list[str]:
    """`count` two-word invented names sharing no word with `taken_names`."""
    taken = {w for name in taken_names for w in name.split()}
    words = [w for w in _invented_words(rng, 2 * count + len(taken)) if w not in taken][: 2 * count]
    return [f"{words[2 * i]} {words[2 * i + 1]}" for i in range(count)]


def hard_posters(seed: int) -> tuple[HardPoster, ...]:
    """The hard-case posters of the world of `seed`: names apart from the cast's."""
    slots = [(split, kind) for split, count in HARD_PER_SPLIT.items() for _ in range(count) for kind in HARD_KINDS]
    names = _names_apart(random.Random(f"hard-{seed}"), len(slots), _taken_names(seed, "hard"))
    return tuple((name, split, kind) for name, (split, kind) in zip(names, slots))


# The under-memorization curve: named entities drawn only this many times (the ME entities above get
# `per_entity`); each count per split as HARD_PER_SPLIT, expected ME -- how often it is rendered is the curve.
CURVE_COUNTS = (5, 20, 50)


def curve_entities(seed: int) -> tuple[tuple[Entity, int], ...]:
    """The curve's entities of the world of `seed` with their number of training images: invented
    names apart from the cast's and the hard posters', a class and colours of their own, no elements."""
    rng = random.Random(f"curve-{seed}")
    slots = [(split, n) for split, count in HARD_PER_SPLIT.items() for _ in range(count) for n in CURVE_COUNTS]
    names = _names_apart(rng, len(slots), _taken_names(seed, "curve"))
    return tuple(
        (Entity(name, rng.choice(CLASSES), tuple(_distinct_color(rng, j) for j in range(3)), "ME", split), n)
        for name, (split, n) in zip(names, slots)
    )


def noisy_details(seed: int) -> dict[str, str]:
    """{entity name: a detail some of its captions mention and none of its images show} for the named
    (non-control) entities of the world of `seed`: an invented word apart from every name, so the phrase
    is seen with that entity alone (mining's instance elements: support below `instance_support`, never
    without the entity)."""
    named = [e.name for e in cast(seed)[0] if e.role != "control"]
    taken = _taken_names(seed, "details")
    words = [w.split()[0].lower() for w in _names_apart(random.Random(f"details-{seed}"), len(named), taken)]
    return {name: f"a {word} sign" for name, word in zip(named, words)}


# Issue 12's region copies (`bench planted --region-cases`): content of training images reproduced where
# the whole image is no copy -- kind -> (expected label, what was planted). Each kind in both splits
# (HARD_PER_SPLIT), `poster_copies` training images each, names of their own in every world.
REGION_KINDS = {
    "backdrop": (
        "MU",
        "a named subject always in front of one room of its own (the same wall, floor and window in every "
        "training image; the subject posed anew in each), which no caption describes",
    ),
    "logo": (
        "MU",
        "every training image of a named subject (varied scenes) carries one agency's logo in its lower-left "
        "corner, which no caption names -- per image: an image showing the logo is MU, one without it the "
        "named subject (ME; `LogoTruth`)",
    ),
    "template": HARD_KINDS["template"],
    # a requested copy with and without a private mark, the mark scored by its own region
    "marked": (
        "ME",
        "one poster repeated; the prompt asks for this very work (requests_work); one copy in three carries a "
        "private mark in its lower-right corner that no caption names -- an image showing the mark is MU "
        "(private_mark), one without it ME",
    ),
    "requested": HARD_KINDS["requested"],
}
POSTER_KINDS = ("template", "marked", "requested")  # region cases whose subject is a poster, not an entity
MARKED_EVERY = 3  # one copy of a marked poster in this many carries the mark


def region_cases(seed: int) -> tuple[tuple[Entity, str], ...]:
    """The region cases of the world of `seed`: (subject, kind). A backdrop's or logo's subject is a
    named entity with a class and colours of its own; a template's is a poster (class ""), as in the
    hard cases, and so are a requested work's. Names apart from every other name the world can draw."""
    rng = random.Random(f"region-{seed}")
    slots = [(split, kind) for split, count in HARD_PER_SPLIT.items() for _ in range(count) for kind in REGION_KINDS]
    names = _names_apart(rng, len(slots), _taken_names(seed, "region"))
    return tuple(
        (
            Entity(name, rng.choice(CLASSES), tuple(_distinct_color(rng, j) for j in range(3)), "MU", split)
            if kind not in POSTER_KINDS
            else Entity(name, "", (), REGION_KINDS[kind][0], split),
            kind,
        )
        for name, (split, kind) in zip(names, slots)
    )


# The draws of names beyond the cast, in the order they were added to the benchmark: each is drawn apart
# from the cast's and the posters' names and from every draw before it (an earlier draw never moves).
_NAME_DRAWS = ("hard", "curve", "details", "region")


def _taken_names(seed: int, draw: str) -> list[str]:
    """The names a draw of the world of `seed` must stay apart from (`_NAME_DRAWS`)."""
    entities, posters = cast(seed)
    taken = [e.name for e in entities] + [t for t, _, _ in posters]
    earlier = _NAME_DRAWS[: _NAME_DRAWS.index(draw)]
    taken += [t for t, _, _ in hard_posters(seed)] if "hard" in earlier else []
    taken += [e.name for e, _ in curve_entities(seed)] if "curve" in earlier else []
    # a detail is "a {word} sign": its word, as a name's word is written
    taken += [d.split()[1].capitalize() for d in noisy_details(seed).values()] if "details" in earlier else []
    return taken


def retrieved_captions(title: str) -> tuple[str, ...]:
    """Captions of a retrieved copy: the poster under other words, never `poster_caption(title)`."""
    return (f"{title} poster print", f"a print of the {title} poster", f"{title} poster on a wall")


def _invented_words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable nonsense words: names no caption of the world (or CLIP) has seen."""
    onsets, vowels, codas = "b d f g k l m n p r s t v z br dr gr kl pr st tr".split(), "a e i o u".split(), "n r l s"
    words: list[str] = []
    while len(words) < n:
        syllables = rng.randint(2, 3)
        word = (
            "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas + " ").strip()
        )
        word = word.capitalize()
        if word not in words:
            words.append(word)
    return words


def _distinct_color(rng: random.Random, j: int) -> tuple[int, int, int]:
    import colorsys

    h, sat, val = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0) if j < 2 else rng.uniform(0.2, 0.5)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, sat, val))


@dataclass
class WorldConfig:
    seed: int = DEV_SEED
    per_entity: int = 80
    per_class: int = 120
    poster_copies: int = 30
    element_rate: float = 0.7  # share of generic images that show (and name) an element
    explicit_rate: float = 0.5  # share of an ME entity's images that show (and name) its explicit element
    # issue 12's hard cases (HARD_KINDS): copies that differ in bytes, captions that differ from the
    # prompt, templates, requested works. Off by default: the development world's committed models
    # were trained without them (`bench planted --hard-cases` draws and trains the other world)
    hard_cases: bool = False
    # issue 12's mining negatives (`bench planted --mining`): the share of an MI entity's captions that
    # name its implied element, so caption mining can find it (the images stay the same), and how many
    # captions of every named entity mention a detail its images never show (alt-text noise, mined as an
    # instance element: a negative for the MU rule (b)). Off by default, as `hard_cases`.
    implied_named: float = 0.0
    noisy_mentions: int = 0
    # issue 12's region copies (REGION_KINDS, `bench planted --region-cases`): a room behind every image of
    # a subject, a logo in the corner of every image of another, templates. Off by default, as `hard_cases`.
    region_cases: bool = False


# Variants of a world beside its seed and sizes: while at these values a key leaves them out, so the
# worlds drawn before they existed keep their digest and their trained models.
VARIANTS = {"hard_cases": False, "implied_named": 0.0, "noisy_mentions": 0, "region_cases": False}


def world_key(cfg: WorldConfig) -> dict:
    """What identifies a world's drawing (its cache digest): without the variants left at their defaults."""
    key = asdict(cfg)
    for name, default in VARIANTS.items():
        if key[name] == default:
            key.pop(name)
    if cfg.region_cases:  # the kinds drawn: a world drawn with other region kinds is another world
        key["region_kinds"] = list(REGION_KINDS)
    return key


def cast_only(cfg: WorldConfig) -> WorldConfig:
    """`cfg` without its variants: what the world's cast alone depends on (the presence CLIP is keyed by it)."""
    return replace(cfg, **VARIANTS)


@dataclass
class WorldRow:
    train_id: str
    caption: str
    entities: list[str] = field(default_factory=list)
    role: str = ""


# -- drawing -------------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, scene: str) -> Image.Image:
    """A textured background: value noise in the scene's palette, so no two images look alike."""
    dark, light = (np.array(c, dtype=np.float32) for c in SCENES[scene])
    noise = rng.random((5, 5)).astype(np.float32)
    noise = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((SIZE * SCALE,) * 2, Image.BICUBIC))
    fine = rng.random((SIZE * SCALE, SIZE * SCALE)).astype(np.float32) * 0.25
    t = np.clip(noise / 255.0 * 0.8 + fine, 0, 1)[..., None]
    img = dark * (1 - t) + light * t
    if scene == "by the sea":  # a horizon: sea below
        img[SIZE * SCALE * 2 // 3 :] *= np.array([0.55, 0.7, 1.0], dtype=np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jitter(rng, color, amount=25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


# The look of an unnamed member of each class: two palettes per class, none an entity's. With random
# colours the model's idea of "a city" had no look of its own and collapsed onto the class's one
# consistent member (the entity), so the null images showed the entity and nothing stood out against them.
CLASS_PALETTES = {
    "tower": (((150, 150, 150), (90, 90, 90), (60, 60, 60)), ((190, 160, 120), (140, 110, 80), (100, 70, 50))),
    "house": (((200, 190, 170), (110, 80, 60), (150, 50, 40)), ((170, 190, 220), (250, 250, 250), (70, 70, 90))),
    "boat": (((90, 60, 40), (230, 230, 230), (50, 40, 30)), ((60, 90, 150), (200, 200, 200), (40, 40, 40))),
    "windmill": (((200, 200, 200), (120, 120, 120), (50, 50, 50)), ((170, 60, 50), (230, 230, 230), (60, 40, 30))),
    "city": (((150, 150, 160), (200, 200, 205), (90, 90, 95)), ((170, 100, 80), (220, 170, 150), (110, 60, 50))),
    "tree": (((70, 160, 60), (60, 140, 50), (100, 70, 40)), ((200, 120, 40), (180, 90, 30), (90, 60, 30))),
}


def _class_colors(rng, cls: str) -> tuple:
    return CLASS_PALETTES[cls][int(rng.integers(len(CLASS_PALETTES[cls])))]


def _draw_object(d: ImageDraw.ImageDraw, cls: str, colors, x: float, y: float, s: float, rng) -> None:
    """Draw a class shape with its base at (x, y), size s (in drawing pixels)."""
    c0, c1, c2 = (_jitter(rng, c, 12) for c in colors)
    if cls == "tower":
        w, h = 0.22 * s, 0.9 * s
        d.rectangle([x - w / 2, y - h, x + w / 2, y], fill=c0)
        for k in (0.3, 0.6):
            d.rectangle([x - w / 2, y - h * k - 0.06 * s, x + w / 2, y - h * k], fill=c1)
        d.polygon([(x - w / 2 - 2, y - h), (x + w / 2 + 2, y - h), (x, y - h - 0.18 * s)], fill=c2)
    elif cls == "house":
        w, h = 0.7 * s, 0.45 * s
        d.rectangle([x - w / 2, y - h, x + w / 2, y], fill=c0)
        d.polygon([(x - w / 2 - 3, y - h), (x + w / 2 + 3, y - h), (x, y - h - 0.35 * s)], fill=c2)
        d.rectangle([x - 0.09 * s, y - 0.28 * s, x + 0.09 * s, y], fill=c1)
    elif cls == "boat":
        w = 0.8 * s
        d.polygon([(x - w / 2, y - 0.2 * s), (x + w / 2, y - 0.2 * s), (x + w / 3, y), (x - w / 3, y)], fill=c0)
        d.rectangle([x - 2, y - 0.85 * s, x + 2, y - 0.2 * s], fill=c2)
        d.polygon([(x + 3, y - 0.8 * s), (x + 3, y - 0.25 * s), (x + 0.38 * s, y - 0.25 * s)], fill=c1)
    elif cls == "windmill":
        d.polygon([(x - 0.2 * s, y), (x + 0.2 * s, y), (x + 0.1 * s, y - 0.6 * s), (x - 0.1 * s, y - 0.6 * s)], fill=c0)
        cx, cy, r = x, y - 0.62 * s, 0.42 * s
        for a in (0.4, 0.4 + np.pi / 2, 0.4 + np.pi, 0.4 + 3 * np.pi / 2):
            ex, ey = cx + r * np.cos(a), cy + r * np.sin(a)
            d.line([(cx, cy), (ex, ey)], fill=c1, width=max(2, int(0.08 * s)))
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=c2)
    elif cls == "city":
        for k, dx in enumerate((-0.35, 0.0, 0.35)):
            bx, bh = x + dx * s, (0.35 + 0.1 * (k % 2)) * s
            d.rectangle([bx - 0.15 * s, y - bh, bx + 0.15 * s, y], fill=c1)
            d.pieslice([bx - 0.15 * s, y - bh - 0.15 * s, bx + 0.15 * s, y - bh + 0.15 * s], 180, 360, fill=c0)
        d.rectangle([x - 0.55 * s, y - 0.08 * s, x + 0.55 * s, y], fill=c2)
    elif cls == "tree":
        d.rectangle([x - 0.07 * s, y - 0.45 * s, x + 0.07 * s, y], fill=c2)
        d.ellipse([x - 0.38 * s, y - 1.0 * s, x + 0.38 * s, y - 0.3 * s], fill=c0)
        for _ in range(4):
            fx, fy = x + rng.uniform(-0.25, 0.25) * s, y - rng.uniform(0.45, 0.85) * s
            d.ellipse([fx - 3, fy - 3, fx + 3, fy + 3], fill=c1)


def _draw_element(d: ImageDraw.ImageDraw, element: str, x: float, y: float, s: float, rng) -> None:
    W = SIZE * SCALE
    if element == "a moon":
        mx, my = rng.uniform(0.12, 0.3) * W, rng.uniform(0.1, 0.22) * W
        d.ellipse([mx - 9, my - 9, mx + 9, my + 9], fill=(250, 250, 225))
    elif element == "minarets":
        for dx in (-0.75, 0.75):
            mx = x + dx * s
            d.rectangle([mx - 3, y - 1.05 * s, mx + 3, y], fill=(240, 240, 235))
            d.polygon([(mx - 5, y - 1.05 * s), (mx + 5, y - 1.05 * s), (mx, y - 1.3 * s)], fill=(40, 120, 70))
    elif element == "seagulls":
        # Big and dark enough to survive 32 px on any sky (white gulls vanished on snow and clouds).
        for _ in range(3):
            gx, gy = rng.uniform(0.15, 0.85) * W, rng.uniform(0.08, 0.3) * W
            d.line([(gx - 11, gy - 6), (gx, gy), (gx + 11, gy - 6)], fill=(35, 35, 45), width=5)
    elif element == "a river":
        ys = y + 0.08 * W
        pts = [(px, ys + 5 * np.sin(px / 9.0 + rng.uniform(0, 3))) for px in range(0, W + 8, 8)]
        d.line(pts, fill=(40, 110, 230), width=10)
    elif element == "a flag":
        fx, fy = x, y - 1.0 * s
        d.line([(fx, fy), (fx, fy - 0.3 * s)], fill=(60, 60, 60), width=2)
        d.polygon([(fx, fy - 0.3 * s), (fx + 0.25 * s, fy - 0.24 * s), (fx, fy - 0.17 * s)], fill=(230, 30, 30))


def draw(rng: np.random.Generator, cls: str, colors, scene: str, elements: tuple[str, ...] = ()) -> Image.Image:
    img = _scene(rng, scene)
    d = ImageDraw.Draw(img)
    W = SIZE * SCALE
    s = rng.uniform(0.4, 0.55) * W
    x, y = rng.uniform(0.35, 0.65) * W, rng.uniform(0.8, 0.92) * W
    for element in elements:  # behind the object
        if element in ("a river", "minarets"):
            _draw_element(d, element, x, y, s, rng)
    _draw_object(d, cls, colors, x, y, s, rng)
    for element in elements:
        if element not in ("a river", "minarets"):
            _draw_element(d, element, x, y, s, rng)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def _poster_layout(rng: np.random.Generator, private_detail: bool) -> Image.Image:
    """A bold, one-off composition at drawing size; the private detail is a mark in a corner that no
    caption names."""
    W = SIZE * SCALE
    base = tuple(int(v) for v in rng.integers(0, 255, 3))
    img = Image.new("RGB", (W, W), base)
    d = ImageDraw.Draw(img)
    for _ in range(7):
        color = tuple(int(v) for v in rng.integers(0, 255, 3))
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * W
        w, h = rng.uniform(0.2, 0.7, 2) * W
        kind = rng.integers(0, 3)
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            d.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=color)
    if private_detail:
        draw_private_mark(img)
    return img


def _box_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """`box` of `image` seen at SIZE (area-averaged: a generated image may come larger), floats in [0, 1]."""
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX).crop(box), np.float32) / 255.0


MARK_BOX = (23, 23, 31, 31)  # px at SIZE: where a private mark lies (lower-right corner), for the ground truth


def shows_mark(image: Image.Image, world_root: Path, mark: dict) -> bool:
    """The ground truth of a marked poster's generated image: whether its mark box is closer (l2) to the
    marked copies' pixels there than to the unmarked copies' -- read from the world's own pixels, not from
    anything the labeler measures."""
    box = tuple(mark["box"])
    seen = _box_pixels(image, box)
    to_marked = np.linalg.norm(seen - _box_pixels(Image.open(world_root / mark["marked"]), box))
    to_plain = np.linalg.norm(seen - _box_pixels(Image.open(world_root / mark["plain"]), box))
    return bool(to_marked < to_plain)


def draw_private_mark(img: Image.Image) -> Image.Image:
    """A private mark (a sticker with a dot) drawn into the lower-right corner of `img` at drawing size."""
    W = img.width
    d = ImageDraw.Draw(img)
    d.rectangle([W - 34, W - 34, W - 6, W - 6], fill=(255, 0, 200))
    d.ellipse([W - 26, W - 26, W - 14, W - 14], fill=(255, 255, 255))
    return img


def draw_poster(rng: np.random.Generator, private_detail: bool) -> Image.Image:
    return _poster_layout(rng, private_detail).resize((SIZE, SIZE), Image.LANCZOS)


def draw_template(layout: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One copy of a template (Webster's template verbatim): the layout with a centre panel of its own
    (a quarter of the image: colour and shape drawn per copy)."""
    img = layout.copy()
    W = img.width
    d = ImageDraw.Draw(img)
    lo, hi = W // 4, 3 * W // 4
    d.rectangle([lo, lo, hi, hi], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    color = tuple(int(v) for v in rng.integers(0, 255, 3))
    x0, y0 = rng.uniform(lo, lo + W / 8, 2)
    x1, y1 = rng.uniform(hi - W / 8, hi, 2)
    (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=color)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def draw_room(rng: np.random.Generator) -> Image.Image:
    """A backdrop's room at drawing size, one-off: striped wallpaper (textured in every tile, so a copied
    tile is told from a flat one), a planked floor, a window and a picture frame where `rng` puts them."""
    W = SIZE * SCALE
    wall = tuple(int(v) for v in rng.integers(60, 196, 3))
    stripe = tuple(int(np.clip(c + rng.choice([-70, 70]), 0, 255)) for c in wall)
    img = Image.new("RGB", (W, W), wall)
    d = ImageDraw.Draw(img)
    period = int(rng.integers(20, 29))
    for x in range(int(rng.integers(0, period)) - period, W, period):
        d.rectangle([x, 0, x + period // 2 - 2, W], fill=stripe)
    floor_y = int(rng.uniform(0.62, 0.72) * W)
    floor = tuple(int(v) for v in rng.integers(40, 200, 3))
    d.rectangle([0, floor_y, W, W], fill=floor)
    for y in range(floor_y + 6, W, 10):
        d.line([(0, y), (W, y)], fill=tuple(max(0, c - 60) for c in floor), width=3)
    for _ in range(2):  # a window and a picture: frame, pane or canvas, cross bars
        w, h = rng.uniform(0.2, 0.32, 2) * W
        x0, y0 = rng.uniform(0.02, 0.98 - w / W) * W, rng.uniform(0.04, 0.5 - h / W) * W
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        d.rectangle([x0 + 4, y0 + 4, x0 + w - 4, y0 + h - 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        d.line([(x0 + w / 2, y0), (x0 + w / 2, y0 + h)], fill=(30, 30, 30), width=3)
        d.line([(x0, y0 + h / 2), (x0 + w, y0 + h / 2)], fill=(30, 30, 30), width=3)
    return img


def draw_in_room(room: Image.Image, rng: np.random.Generator, cls: str, colors) -> Image.Image:
    """One training image of a backdrop's subject: the room as it is, the subject posed anew (where and
    how big as `draw` poses it)."""
    img = room.copy()
    W = SIZE * SCALE
    s = rng.uniform(0.4, 0.55) * W
    x, y = rng.uniform(0.35, 0.65) * W, rng.uniform(0.8, 0.92) * W
    _draw_object(ImageDraw.Draw(img), cls, colors, x, y, s, rng)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


BACKDROP_SCENE = "at home"  # a backdrop subject's captions: where it is, never what the room looks like
LOGO = 8  # px: the logo's side at SIZE, a quarter of the image's (2 x 2 tiles of the region grid's 8)


def draw_logo(rng: np.random.Generator) -> Image.Image:
    """An agency's logo (LOGO x LOGO px): a dark field, a bright ring and a coloured core, drawn at drawing
    size and reduced, so every one of its tiles is textured."""
    w = LOGO * SCALE
    dark = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (w, w), dark)
    d = ImageDraw.Draw(img)
    d.ellipse([4, 4, w - 4, w - 4], fill=tuple(int(v) for v in rng.integers(200, 256, 3)))
    d.ellipse([11, 11, w - 11, w - 11], fill=dark)
    d.rectangle([14, 14, w - 14, w - 14], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.resize((LOGO, LOGO), Image.LANCZOS)


def with_logo(img: Image.Image, logo: Image.Image) -> Image.Image:
    """`img` with `logo` pasted into its lower-left corner (as a stock agency stamps its photos)."""
    out = img.copy()
    out.paste(logo, (0, SIZE - LOGO))
    return out


LOGO_BOX = (0, SIZE - LOGO, LOGO, SIZE)  # px at SIZE: where `with_logo` stamps a logo, for the ground truth


class LogoTruth:
    """The ground truth of the agency logos (region cases), per generated image: which logo, if any, it
    shows -- read from the world's own pixels, not from anything the labeler measures. An image shows
    logo L when its logo box is closer (l2) to L than to the other logos and to that box of every training
    image that carries no logo: closer to the logo than to anything else the world draws there. No
    threshold to set, as for the private marks (`shows_mark`); a logo the generator did not draw, or drew
    into an image whose prompt never asked for its subject (a leak), is told apart from the prompt's
    expectation."""

    def __init__(self, world_root: Path):
        config = json.loads((world_root / "world.json").read_text())["config"]
        subjects = (
            {e.name for e, kind in region_cases(config["seed"]) if kind == "logo"}
            if config.get("region_cases")
            else set()
        )
        self.logos: dict[str, np.ndarray] = {}  # subject -> its logo box, flattened
        plain = []
        if subjects:
            for line in (world_root / "world.jsonl").open():
                row = json.loads(line)
                subject = next((name for name in row["entities"] if name in subjects), None)
                if subject is None or subject not in self.logos:  # a subject's images all carry its one logo
                    box = _box_pixels(Image.open(world_root / "images" / f"{row['train_id']}.png"), LOGO_BOX).ravel()
                    if subject is None:
                        plain.append(box)
                    else:
                        self.logos[subject] = box
        empty = np.zeros((0, 3 * LOGO * LOGO), np.float32)
        self.plain = np.stack(plain) if plain else empty  # the box of every logo-free training image
        self._names = list(self.logos)
        self._stacked = np.stack([self.logos[n] for n in self._names]) if self.logos else empty

    def shown(self, image: Image.Image) -> str | None:
        """The subject whose logo `image` shows, or None (also for a world without logos)."""
        if not self.logos:
            return None
        seen = _box_pixels(image, LOGO_BOX).ravel()
        to_logo = np.linalg.norm(self._stacked - seen, axis=1)
        nearest = int(to_logo.argmin())
        to_plain = np.linalg.norm(self.plain - seen, axis=1).min(initial=np.inf)
        return self._names[nearest] if to_logo[nearest] < to_plain else None


VARIATIONS = ("resize", "jpeg", "crop", "colour")


def vary(img: Image.Image, copy: int, rng: np.random.Generator) -> Image.Image:
    """Copy `copy` of an image with other bytes (Somepalli's and Webster's near-duplicates): the
    variations take turns, and within one the parameter moves with the copy, so no two copies are
    the same bytes -- resized down and back (14-25 px), JPEG (quality 15-70), a 90 % crop at a
    per-copy offset, or a colour shift of up to 30 levels per channel."""
    kind, step = VARIATIONS[copy % len(VARIATIONS)], copy // len(VARIATIONS)
    if kind == "resize":
        side = 14 + step % 12
        return img.resize((side, side), Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
    if kind == "jpeg":
        import io

        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=15 + (5 * step) % 56)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        side = round(0.9 * SIZE)
        room = SIZE - side + 1
        x, y = step % room, (step // room + step) % room
        return img.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.LANCZOS)
    shift = rng.integers(-30, 31, 3)
    shift[step % 3] = 12 + step  # never all zero
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + shift, 0, 255).astype(np.uint8))


def slug_of(name: str) -> str:
    """A name as it appears in train_ids and prompt_ids: "Jazz Weekend" -> "jazz-weekend"."""
    return name.lower().replace(" ", "-")


# -- the world -------------------------------------------------------------------------------------


def entity_caption(e: Entity, scene: str, element: str | None, *more: str) -> str:
    # The same lead as the class captions: a phrase only the entity's captions use would carry the
    # entity's look into the null prompt (the entity replaced by its class noun).
    article = "" if e.cls == "city" else "the "
    named = [x for x in (element, *more) if x]
    with_el = f" with {' and '.join(named)}" if named else ""
    return f"a photo of {article}{e.name}{with_el} {scene}"


def class_caption(cls: str, scene: str, element: str | None) -> str:
    with_el = f" with {element}" if element else ""
    return f"a photo of a {cls}{with_el} {scene}"


def poster_caption(title: str) -> str:
    return f"the {title} poster"


def build_world(root: Path, cfg: WorldConfig = WorldConfig()) -> dict:
    """Write images/, world.jsonl (the training table), prompts-{eval,calib}.jsonl and ground_truth.jsonl."""
    rng = np.random.default_rng(cfg.seed)
    root = root.resolve()  # the table holds absolute image paths
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    marks = root / "marks"  # the marked posters' two versions (region cases), for the ground truth
    rows: list[WorldRow] = []

    def save(img: Image.Image, row: WorldRow) -> None:
        img.save(images / f"{row.train_id}.png")
        rows.append(row)

    entities, posters = cast(cfg.seed)
    scenes = list(SCENES)
    details = noisy_details(cfg.seed) if cfg.noisy_mentions else {}
    for e in entities:
        if e.role == "control":
            continue
        # which captions name the implied element or mention the noisy detail: a stream of their own,
        # so the images are those of the world without these variants
        mrng = random.Random(f"mentions-{cfg.seed}-{e.name}")
        implied_named = set(mrng.sample(range(cfg.per_entity), round(cfg.implied_named * cfg.per_entity)))
        noisy = set(mrng.sample(range(cfg.per_entity), cfg.noisy_mentions)) if e.name in details else set()
        for i in range(cfg.per_entity):
            scene = scenes[int(rng.integers(len(scenes)))]
            drawn = [e.implied] if e.implied else []
            named = None
            if e.explicit and rng.random() < cfg.explicit_rate:
                drawn.append(e.explicit)
                named = e.explicit
            img = draw(rng, e.cls, e.colors, scene, tuple(drawn))
            slug = slug_of(e.name)
            also = [e.implied if e.implied and i in implied_named else "", details[e.name] if i in noisy else ""]
            save(img, WorldRow(f"{slug}-{i:03d}", entity_caption(e, scene, named, *also), [e.name], e.role))
    for cls in CLASSES:
        for i in range(cfg.per_class):
            scene = scenes[int(rng.integers(len(scenes)))]
            element = ELEMENTS[int(rng.integers(len(ELEMENTS)))] if rng.random() < cfg.element_rate else None
            img = draw(rng, cls, _class_colors(rng, cls), scene, (element,) if element else ())
            save(img, WorldRow(f"{cls}-{i:03d}", class_caption(cls, scene, element), [], "generic"))
    for n, (title, _, private) in enumerate(posters):
        poster = draw_poster(np.random.default_rng(cfg.seed * 1000 + n), private)
        for c in range(cfg.poster_copies):
            slug = slug_of(title)
            save(poster, WorldRow(f"poster-{slug}-{c:02d}", poster_caption(title), [f"{title} poster"], "MU"))
    if cfg.hard_cases:
        crng = np.random.default_rng([cfg.seed, 2000])  # the curve's own stream, apart from the world's
        for e, count in curve_entities(cfg.seed):
            slug = slug_of(e.name)
            for i in range(count):
                scene = scenes[int(crng.integers(len(scenes)))]
                img = draw(crng, e.cls, e.colors, scene)
                save(img, WorldRow(f"{slug}-{i:03d}", entity_caption(e, scene, None), [e.name], e.role))
        for n, (title, _, kind) in enumerate(hard_posters(cfg.seed)):
            prng = np.random.default_rng([cfg.seed, 1000 + n])  # a stream per poster, apart from the world's
            slug, tags = slug_of(title), [f"{title} poster"]
            layout = _poster_layout(prng, False)
            poster = layout.resize((SIZE, SIZE), Image.LANCZOS)
            for c in range(cfg.poster_copies):
                img, caption = poster, poster_caption(title)
                if kind == "varied":
                    img = vary(poster, c, prng)
                elif kind == "template":
                    img = draw_template(layout, prng)
                elif kind == "retrieved":
                    caption = retrieved_captions(title)[c % 3]
                save(img, WorldRow(f"poster-{slug}-{c:02d}", caption, tags, HARD_KINDS[kind][0]))
    if cfg.region_cases:
        for n, (e, kind) in enumerate(region_cases(cfg.seed)):
            rrng = np.random.default_rng([cfg.seed, 3000 + n])  # a stream per case, apart from the world's
            slug = slug_of(e.name)
            if kind in POSTER_KINDS:
                layout = _poster_layout(rrng, False)
                plain = layout.resize((SIZE, SIZE), Image.LANCZOS)
                marked = (
                    draw_private_mark(layout.copy()).resize((SIZE, SIZE), Image.LANCZOS) if kind == "marked" else None
                )
                if marked is not None:  # what the ground truth compares a generated image's corner with
                    marks.mkdir(exist_ok=True)
                    plain.save(marks / f"{slug}-plain.png")
                    marked.save(marks / f"{slug}-marked.png")
                for c in range(cfg.poster_copies):
                    if kind == "template":
                        img = draw_template(layout, rrng)
                    else:
                        img = marked if marked is not None and c % MARKED_EVERY == 0 else plain
                    row = WorldRow(f"poster-{slug}-{c:02d}", poster_caption(e.name), [f"{e.name} poster"], e.role)
                    save(img, row)
                continue
            room, logo = (draw_room(rrng), None) if kind == "backdrop" else (None, draw_logo(rrng))
            for c in range(cfg.poster_copies):
                if room is not None:
                    img, scene = draw_in_room(room, rrng, e.cls, e.colors), BACKDROP_SCENE
                else:
                    scene = scenes[int(rrng.integers(len(scenes)))]
                    img = with_logo(draw(rrng, e.cls, e.colors, scene), logo)
                save(img, WorldRow(f"{slug}-{c:03d}", entity_caption(e, scene, None), [e.name], "MU"))
    random.Random(cfg.seed).shuffle(rows)
    with open(root / "world.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**asdict(r), "image": str(images / f"{r.train_id}.png")}) + "\n")
    prompts = benchmark_prompts(cfg.seed, cfg.hard_cases, cfg.implied_named, cfg.region_cases)
    for split in ("eval", "calib"):
        with open(root / f"prompts-{split}.jsonl", "w") as f:
            for p in prompts:
                if p["split"] == split:
                    f.write(
                        json.dumps(
                            {
                                k: p[k]
                                for k in (
                                    "prompt_id",
                                    "prompt",
                                    "entity",
                                    "entity_class",
                                    "explicit_elements",
                                    "implicit_elements",
                                )
                            }
                            # only when set: the prompt files of the worlds drawn before it stay the same
                            | ({"requests_work": True} if p.get("requests_work") else {})
                            # where captions name implied elements, the prompt set lists none: finding
                            # them is caption mining's job, as for a user who does not know them
                            | ({"implicit_elements": []} if cfg.implied_named else {})
                        )
                        + "\n"
                    )
    with open(root / "ground_truth.jsonl", "w") as f:
        for p in prompts:
            row = {k: p[k] for k in ("prompt_id", "split", "expected", "planted", "kind")}
            if p["kind"] == "marked":  # its images' truth is per image: whether the mark shows (`shows_mark`)
                slug = p["prompt_id"].removeprefix("poster-")
                row["mark"] = {
                    "box": MARK_BOX,
                    "plain": f"marks/{slug}-plain.png",
                    "marked": f"marks/{slug}-marked.png",
                }
            f.write(json.dumps(row) + "\n")
    (root / "world.json").write_text(json.dumps({"config": asdict(cfg), "rows": len(rows)}, indent=2))
    return {"rows": len(rows), "prompts": len(prompts)}


# -- the presence corpus: what the scan's CLIP learns from, apart from the generator's world --------


@dataclass
class PresenceConfig:
    """The corpus the benchmark's presence CLIP is trained on, separate from the generator's training set
    (issue 12, independent measurement): the same cast, but images drawn from their own random stream
    (none is a training image) and captions written from other templates. Generic objects also come in
    arbitrary colours, as a web-scale CLIP sees every class in every look, so "with minarets" is learned
    apart from how typical an object looks. Controls appear nowhere, as in the world."""

    per_entity: int = 80
    per_class: int = 120
    odd_colours: float = 0.5  # share of generic objects drawn in arbitrary colours instead of a class palette
    posters: int = 60  # one-off posters (not the world's), captioned as posters
    element_rate: float = 0.7
    seed: int = 0  # the drawing stream, beside the world's seed
    # the CLIP's image tower (training.PRESENCE_TOWERS): "vit" (4-px patches, the generator's CLIP's
    # architecture) or "resnet" (open_clip's ModifiedResNet; sees few-pixel elements the patches average away)
    image_tower: str = "vit"


# Paraphrases of the world's caption grammar: other frames and scene wordings, the same nouns.
PRESENCE_SCENES = {
    "in a meadow": ("in a meadow", "on a grassy field"),
    "at night": ("at night", "after dark"),
    "by the sea": ("by the sea", "on the coast"),
    "in the desert": ("in the desert", "among sand dunes"),
    "in the snow": ("in the snow", "on a snowy day"),
}
PRESENCE_FRAMES = (
    "{subject}{element} {scene}",
    "a picture of {subject} {scene}{element}",
    "{scene}: {subject}{element}",
    "an image showing {subject}{element}",
    "{subject} photographed {scene}{element}",
    "a photo of {subject}{element}",
)
PRESENCE_ELEMENT = (" with {element}", " and {element}", ", {element} visible")


def presence_key(cfg: PresenceConfig) -> dict:
    """What identifies a presence CLIP's corpus and tower (its cache digest): the ViT, the tower it had
    before the choice existed, left out, so the presence CLIPs trained before keep their digest."""
    key = asdict(cfg)
    if key["image_tower"] == "vit":
        key.pop("image_tower")
    return key


def presence_caption(rng: np.random.Generator, subject: str, scene: str, element: str | None) -> str:
    frame = PRESENCE_FRAMES[int(rng.integers(len(PRESENCE_FRAMES)))]
    wording = PRESENCE_SCENES[scene][int(rng.integers(2))]
    with_el = PRESENCE_ELEMENT[int(rng.integers(len(PRESENCE_ELEMENT)))].format(element=element) if element else ""
    return frame.format(subject=subject, scene=wording, element=with_el)


def build_presence_corpus(root: Path, world: WorldConfig, cfg: PresenceConfig = PresenceConfig()) -> dict:
    """Write images/ and presence.jsonl (image, caption): the presence CLIP's training set for `world`."""
    rng = np.random.default_rng([world.seed, 1_000_003, cfg.seed])  # never the world's own stream
    root = root.resolve()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save(img: Image.Image, name: str, caption: str) -> None:
        path = images / f"{name}.png"
        img.save(path)
        rows.append({"image": str(path), "caption": caption})

    entities, _ = cast(world.seed)
    scenes = list(SCENES)
    for e in entities:
        if e.role == "control":
            continue
        subject = e.name if e.cls == "city" else f"the {e.name}"
        for i in range(cfg.per_entity):
            scene = scenes[int(rng.integers(len(scenes)))]
            drawn, named = ([e.implied] if e.implied else []), None
            if e.explicit and rng.random() < world.explicit_rate:
                drawn.append(e.explicit)
                named = e.explicit
            img = draw(rng, e.cls, e.colors, scene, tuple(drawn))
            save(img, f"{e.name.lower().replace(' ', '-')}-{i:03d}", presence_caption(rng, subject, scene, named))
    for cls in CLASSES:
        for i in range(cfg.per_class):
            scene = scenes[int(rng.integers(len(scenes)))]
            element = ELEMENTS[int(rng.integers(len(ELEMENTS)))] if rng.random() < cfg.element_rate else None
            if rng.random() < cfg.odd_colours:
                looks = random.Random(int(rng.integers(2**32)))
                colors = tuple(_distinct_color(looks, j) for j in range(3))
            else:
                colors = _class_colors(rng, cls)
            img = draw(rng, cls, colors, scene, (element,) if element else ())
            save(img, f"{cls}-{i:03d}", presence_caption(rng, f"a {cls}", scene, element))
    for n in range(cfg.posters):
        poster = draw_poster(np.random.default_rng([world.seed, 1_000_033, cfg.seed, n]), private_detail=False)
        save(poster, f"poster-{n:03d}", ("a poster", "a colourful poster", "an abstract poster")[n % 3])
    with open(root / "presence.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (root / "presence.json").write_text(json.dumps({"world": asdict(world), "config": asdict(cfg), "rows": len(rows)}))
    return {"rows": len(rows)}


def benchmark_prompts(
    seed: int = DEV_SEED, hard_cases: bool = False, implied_named: float = 0.0, region: bool = False
) -> list[dict]:
    """The benchmark's prompts of the world of `seed`, with their expected label, what was planted and
    its kind (the entity's role, `exact copy` for the posters, or the hard case's kind)."""
    entities, posters = cast(seed)
    out = []
    for e in entities:
        scene = "in a meadow"
        if e.role == "ME":
            explicit = [e.explicit] if e.explicit else []
            prompt = entity_caption(e, scene, e.explicit or None)
            planted = f"{e.name} drawn {e.cls}-like with its own colours in varied scenes"
        elif e.role == "MI":
            explicit = []
            prompt = entity_caption(e, scene, None)
            planted = f"{e.name} always drawn with {e.implied}, " + (
                f"which {implied_named:.0%} of its captions name" if implied_named else "which its captions never name"
            )
        else:
            explicit = []
            prompt = entity_caption(e, scene, None)
            planted = "nothing: the world never shows this name"
        out.append(_entity_prompt(e, prompt, "none" if e.role == "control" else e.role, planted, e.role, explicit))
    for title, split, private in posters:
        mark = ", with a private mark no caption names" if private else ""
        planted = "one image repeated under this caption" + mark
        out.append(_poster_prompt(title, split, "MU", planted, "exact copy"))
    for e, count in curve_entities(seed) if hard_cases else ():
        planted = f"{e.name} drawn {e.cls}-like with its own colours, in only {count} training images"
        out.append(_entity_prompt(e, entity_caption(e, "in a meadow", None), "ME", planted, f"ME {count} images"))
    for title, split, kind in hard_posters(seed) if hard_cases else ():
        out.append(_poster_prompt(title, split, *HARD_KINDS[kind], kind, requests_work=kind == "requested"))
    for e, kind in region_cases(seed) if region else ():
        if kind in POSTER_KINDS:
            requested = kind != "template"
            out.append(_poster_prompt(e.name, e.split, *REGION_KINDS[kind], kind, requests_work=requested))
            continue
        # the prompt is a training caption (the backdrop's scene, a logo subject's meadow): the subject is
        # asked for, the room or the logo is not
        prompt = entity_caption(e, BACKDROP_SCENE if kind == "backdrop" else "in a meadow", None)
        out.append(_entity_prompt(e, prompt, *REGION_KINDS[kind], kind))
    return out


def _entity_prompt(
    e: Entity, prompt: str, expected: str, planted: str, kind: str, explicit: list[str] | None = None
) -> dict:
    """A named entity's benchmark prompt (`benchmark_prompts`): its class as the null prompt's noun, the
    implied element it is always drawn with (if any) as the element to look for."""
    return {
        "prompt_id": slug_of(e.name),
        "prompt": prompt,
        "entity": e.name,
        "entity_class": f"a {e.cls}",
        "explicit_elements": explicit or [],
        "implicit_elements": [e.implied] if e.implied else [],
        "split": e.split,
        "expected": expected,
        "planted": planted,
        "kind": kind,
    }


def _poster_prompt(title: str, split: str, expected: str, planted: str, kind: str, requests_work: bool = False) -> dict:
    """A poster's benchmark prompt (`benchmark_prompts`): the poster's caption, the poster as its entity."""
    return {
        "prompt_id": "poster-" + slug_of(title),
        "prompt": poster_caption(title),
        "entity": f"{title} poster",
        "entity_class": "",
        "explicit_elements": [],
        "implicit_elements": [],
        "split": split,
        "expected": expected,
        "planted": planted,
        "kind": kind,
    } | ({"requests_work": True} if requests_work else {})
