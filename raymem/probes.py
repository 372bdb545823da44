"""Texts scored against every generated image with CLIP ("probes"), and what the labeler reads from them.

For a prompt naming entity e (class noun c) with elements a:
  prompt         the prompt itself                      -> CLIP prompt score
  entity         "a photo of e"
  entity_null    "a photo of c"                          -> is e rendered, beyond a generic c?
  explicit/implicit  "a photo of e with a"  vs  entity   -> is a shown? (zero-shot, 2-way softmax)
Zero-shot presence is a softmax at CLIP's logit scale (100) over the pair, as in CLIP's own zero-shot
classification; a fixed raw-cosine cut-off would not transfer between CLIP models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Probe:
    kind: str  # prompt | entity | entity_null | explicit | implicit
    element: str
    text: str


def probes_for(
    prompt: str, entity: str, entity_class: str, explicit: tuple[str, ...], implicit: tuple[str, ...]
) -> list[Probe]:
    probes = [Probe("prompt", "", prompt), Probe("entity", entity, f"a photo of {entity}")]
    if entity_class:
        probes.append(Probe("entity_null", entity_class, f"a photo of {entity_class}"))
    probes += [Probe("explicit", a, f"a photo of {entity} with {a}") for a in explicit]
    probes += [Probe("implicit", a, f"a photo of {entity} with {a}") for a in implicit if a not in explicit]
    return probes


def two_way_probability(score_yes: float, score_no: float) -> float:
    """P(yes) of a softmax over two CLIP cosines at CLIP's logit scale."""
    z = LOGIT_SCALE * (np.float64(score_yes) - np.float64(score_no))
    return float(1.0 / (1.0 + np.exp(-z)))
