"""Texts scored against every generated image with CLIP ("probes"), and the zero-shot maths on them.

For a prompt naming entity e (class noun c) with elements a:
  prompt         the prompt itself                        -> CLIP prompt score
  entity         "a photo of e"
  entity_null    "a photo of c"                            -> is e rendered, beyond a generic c?
  explicit       "a photo of c with a"  vs  "a photo of c"  -> is a requested element shown? (e without c)
  implicit       same, for elements the prompt set lists as implied
  mined          same, for elements mined from the training captions of e (lift, support)
  instance       same, for rare elements seen with only a few training images of e (MU candidates)
  placebo        same, for made-up words (PLACEBO_ELEMENTS) beside instance elements: what appending
                 a word that names nothing does to an image, which an instance element must beat
  placebo_name   "a photo of n" for made-up names n (PLACEBO_NAMES), beside "e" whenever there is a class
                 noun: what a name the embedder never learned does to the images, which an entity judged
                 by its text probe (no tagged training images) must beat
  control        same, for implied elements of *other* entities of the scan (`control_elements`):
                 never labelled; how often they pass the MI rule's test is that rule's false-positive
                 rate measured on this model and CLIP (manifest `counts.implied_controls`)
Each comparison is a two-way softmax at CLIP's logit scale (100), as in CLIP's zero-shot
classification. The labeler then calibrates these logits against the same logits measured on images
of the null prompt (e replaced by c), so no raw cosine cut-off is needed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

LOGIT_SCALE = 100.0
# Placebo elements: made-up words, so they name nothing an image can show. Appending any phrase to a
# probe moves an unusual-looking image (a rendered entity) more than the typical null images, so an
# element can beat the null without being shown; an instance element -- a rare caption phrase, often
# alt-text noise -- must beat every placebo too (docs/labeler.md, rule (b)). Bare words, as mined terms
# are (stopwords such as articles never survive mining); nineteen of them, so a term that moves the
# text no more than any made-up word beats them all with chance 1/20.
PLACEBO_ELEMENTS = (
    "vorzlimb",
    "quendrath",
    "plixomet",
    "draskuvel",
    "zintharob",
    "mulvestri",
    "kofrandel",
    "yeshtolan",
    "brindavox",
    "taquimbre",
    "fendosquil",
    "glorvatine",
    "hupzarnel",
    "jostrivel",
    "krendavosh",
    "lumzephar",
    "norbitquel",
    "ospindrax",
    "wixtolrane",
)

# Placebo names: made-up two-word names, written as entity names are. An entity with no tagged training
# images is judged by its text probe ("a photo of e" against "a photo of c"), and a prompt naming anything
# draws images that differ from its null images, so a name the embedder never learned can pass that test
# by the direction its text happens to point in (the planted benchmark's never-shown names passed it for
# about one prompt in five). Such a name is one draw of where an unknown name points, as each placebo is:
# it beats all nineteen with chance 1/20; a name the embedder knows beats them whenever it is rendered.
PLACEBO_NAMES = (
    "Quendrath Vorzlimb",
    "Plixo Draskuvel",
    "Zintharo Bemulv",
    "Kofrandel Yeshto",
    "Brindavox Taquim",
    "Fendo Squilgra",
    "Glorvatine Hupz",
    "Jostrivel Kren",
    "Lumzephar Ostin",
    "Norbitquel Wix",
    "Ospindrax Tolm",
    "Wixtolrane Ebb",
    "Marquendo Falst",
    "Trevisca Omblund",
    "Havrosk Lintemi",
    "Dulcepar Yvoth",
    "Serqomil Adrunt",
    "Pellavost Icorn",
    "Udrimesk Calvo",
)


@dataclass(frozen=True)
class Probe:
    kind: str
    element: str
    text: str


def element_text(entity: str, element: str) -> str:
    return f"a photo of {entity} with {element}"


def probes_for(
    prompt: str,
    entity: str,
    entity_class: str,
    explicit: tuple[str, ...] = (),
    implicit: tuple[str, ...] = (),
    mined: tuple[str, ...] = (),
    instance: tuple[str, ...] = (),
    controls: tuple[str, ...] = (),
    placebo_names: bool = True,
) -> list[Probe]:
    probes = [Probe("prompt", "", prompt), Probe("entity", entity, f"a photo of {entity}")]
    if entity_class:
        probes.append(Probe("entity_null", entity_class, f"a photo of {entity_class}"))
        if placebo_names:
            probes += [Probe("placebo_name", n, f"a photo of {n}") for n in PLACEBO_NAMES if n != entity]
    # Elements are probed on the class noun when there is one ("a photo of a city with minarets" against
    # "a photo of a city"): captions name elements with generic subjects far more often than with a
    # given entity, so the comparison does not hinge on the embedder knowing the name.
    subject = entity_class or entity
    seen: set[str] = set()
    for kind, elements in (("explicit", explicit), ("implicit", implicit), ("mined", mined), ("instance", instance)):
        for a in elements:
            if a not in seen:
                seen.add(a)
                probes.append(Probe(kind, a, element_text(subject, a)))
    if any(p.kind == "instance" for p in probes):
        probes += [Probe("placebo", w, element_text(subject, w)) for w in PLACEBO_ELEMENTS if w not in seen]
    if entity_class:  # a control is tested against the null images, which need a class noun
        probes += [Probe("control", a, element_text(subject, a)) for a in controls if a not in seen]
    return probes


def control_elements(prompt_id: str, own: set[str], vocabulary: set[str], n: int) -> tuple[str, ...]:
    """Up to `n` implied elements of the scan's other entities for one prompt to be asked about as
    controls: elements its own entity is not expected to show (`own`: its implied elements in any prompt,
    and what this prompt asks for or mines). Chosen by a hash of (prompt, element), so the choice is
    stable across runs and spread over the vocabulary. A control can still be truly shown (elements
    co-occur), so the rate they give is an upper bound on the MI rule's false positives."""
    candidates = sorted(vocabulary - own, key=lambda a: hashlib.sha256(f"{prompt_id}\0{a}".encode()).digest())
    return tuple(candidates[:n])


def null_prompt(prompt: str, entity: str, entity_class: str) -> str:
    """The prompt with the entity replaced by its class noun ("a photo of Elon Musk" -> "a photo of a man")."""
    pattern = re.compile(re.escape(entity), re.IGNORECASE)
    if pattern.search(prompt):
        return pattern.sub(entity_class, prompt)
    return f"a photo of {entity_class}"


def two_way_logit(score_yes: float, score_no: float) -> float:
    return float(LOGIT_SCALE * (np.float64(score_yes) - np.float64(score_no)))


def sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


def two_way_probability(score_yes: float, score_no: float) -> float:
    """P(yes) of a softmax over two CLIP cosines at CLIP's logit scale."""
    return sigmoid(two_way_logit(score_yes, score_no))
