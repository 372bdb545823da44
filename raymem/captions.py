"""Caption text: the terms of a caption (for mining elements) and the entities it names (for tagging)."""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    """a an the and or of in on at to with without for from by as is are was were be been being it its this that
    these those there here some any all no not very into onto over under near behind beside between while
    his her their our your my he she they we you i me him them us photo image picture view close up""".split()
)


def tag_entities(caption: str | None, entities: list[str]) -> list[str]:
    """Entity names that occur in the caption as whole words (case-insensitive)."""
    if not caption:
        return []
    low = caption.lower()
    return [e for e in entities if re.search(rf"(?<!\w){re.escape(e.lower())}(?!\w)", low)]


def caption_terms(caption: str | None) -> set[str]:
    """Lower-case words (no stopwords) and bigrams of adjacent content words."""
    if not caption:
        return set()
    words = re.findall(r"[a-z][a-z'-]*[a-z]|[a-z]", caption.lower())
    content = [w if w not in STOPWORDS and len(w) > 1 else None for w in words]
    terms = {w for w in content if w}
    terms |= {f"{a} {b}" for a, b in zip(content, content[1:]) if a and b}
    return terms
