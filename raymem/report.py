"""`raymem report`: one static HTML page per scan, for the morning after a nightly run.

What each image was asked for and what it got: per-entity label shares and tallies, MU / MI / ME
examples with the prompt text and every stored neighbour (training image, caption, score), the
replication scores against the train-train background and the thresholds, the under-memorization
chart, and sortable, filterable tables (their state lives in the URL: `#sort=entities:rate_MU:desc`).
The page comes from Jinja templates (raymem/templates); this module computes the rows and the charts'
geometry. Images are copied next to the page (local, s3:// or WebDataset members alike), so the report
is a self-contained folder to open, archive or upload.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from raymem import __version__
from raymem import uri as uris
from raymem.column_docs import description
from raymem.outputs import read_manifest, resolve_scan
from raymem.reduce import mi_unspecific
from raymem.results import scan_table

log = logging.getLogger(__name__)

CATEGORIES = ["MU", "MI", "ME", "none"]
CATEGORY_TITLES = {
    "MU": "unintended: copied content nobody asked for",
    "MI": "implicit intended: unnamed but expected elements",
    "ME": "explicit intended: the named entity, rendered from training",
}
COLORS = {"MU": "#b00020", "MI": "#e08000", "ME": "#2a7d2a", "none": "#bbbbbb", "failed": "#444444"}

TALLY = [
    ("n_units", "images"),
    ("n_MU", "MU"),
    ("n_MI", "MI"),
    ("n_ME", "ME"),
    ("n_none", "none"),
    ("n_failed", "failed"),
]
ENTITY_COLUMNS = [
    ("entity", "entity"),
    *TALLY,
    ("rate_MU", "MU rate"),
    ("n_any_MU", "showing MU"),
    ("n_any_ME", "showing ME"),
    ("n_ME_and_MU", "ME and MU"),
    ("n_MI_and_MU", "MI and MU"),
    ("n_memorized_prompts", "memorized prompts"),
    ("train_frequency", "training images"),
    ("render_rate", "render rate"),
    ("entity_not_rendered", "not rendered"),
]
PROMPT_COLUMNS = [
    ("prompt_id", "prompt id"),
    ("prompt", "prompt"),
    ("entity", "entity"),
    *TALLY,
    ("consistency", "consistency"),
    ("max_replication_score", "max replication"),
    ("memorized_prompt", "memorized"),
]


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("raymem", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,  # a missing field is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _columns(table: str, columns: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(key, title, help) per column; the help is the column's documentation (docs/schema.md)."""
    return [(key, title, description(table, key) or "") for key, title in columns]


# -- chart geometry ------------------------------------------------------------------------------------
def _frame(width: int, height: int, left: float, right: float, top: float, base: float) -> dict:
    """A chart's size and plotting area (x from left to right, y from top down to the base line)."""
    return {"width": width, "height": height, "left": left, "right": right, "top": top, "base": base}


def histogram_geometry(
    scores: list[float], marks: dict[str, float | None], background: dict | None, width: int = 680, height: int = 230
) -> dict:
    """Bars of the replication scores on a 0..1 axis (lower when scores go below 0), y ticks in images,
    the background's percentiles as a box under the axis top, dashed lines at the thresholds."""
    values = np.asarray([s for s in scores if s is not None], dtype=float)
    lo = min(0.0, float(np.floor(values.min() * 10) / 10) if len(values) else 0.0)
    hi = 1.0
    counts, edges = np.histogram(values, bins=40, range=(lo, hi))
    top_count = max(1, int(counts.max()) if len(counts) else 1)
    left, right, top, base = 48, width - 12, 34, height - 34

    def x(v: float) -> float:
        return round(left + (v - lo) / (hi - lo) * (right - left), 1)

    def y(c: float) -> float:
        return round(base - c / top_count * (base - top), 1)

    bars = [
        {
            "x": x(edges[i]),
            "y": y(c),
            "w": round(max(0.5, x(edges[i + 1]) - x(edges[i]) - 1), 1),
            "h": round(base - y(c), 1),
            "label": f"{edges[i]:.3f}–{edges[i + 1]:.3f}: {c} images",
        }
        for i, c in enumerate(counts)
        if c
    ]
    step = 0.1 if hi - lo <= 1.2 else 0.2
    xticks = [{"x": x(v), "label": f"{v:.1f}"} for v in np.arange(lo, hi + 1e-9, step)]
    ystep = max(1, int(np.ceil(top_count / 4)))
    yticks = [{"y": y(c), "label": str(c)} for c in range(0, top_count + 1, ystep)]
    colors = ["#b00020", "#e08000", "#2a9d2a", "#555"]
    shown = [(n, v) for n, v in marks.items() if v is not None]
    marks_out = []
    for i, (name, v) in enumerate(shown):
        right_side = x(v) > left + 0.75 * (right - left)  # labels near the right edge go left of the line
        marks_out.append(
            {
                "name": name,
                "value": v,
                "x": x(v),
                "color": colors[i % 4],
                "anchor": "end" if right_side else "start",
                "dx": -3 if right_side else 3,
            }
        )
    box = None
    if background and all(background.get(p) is not None for p in ("p50", "p90", "p95", "p99")):
        box = {
            "x50": x(background["p50"]),
            "x90": x(background["p90"]),
            "x95": x(background["p95"]),
            "x99": x(background["p99"]),
            "y": top - 22,
            "n": background.get("n"),
            "near_duplicated": background.get("near_duplicated"),
        }
    return {
        **_frame(width, height, left, right, top, base),
        "bars": bars,
        "xticks": xticks,
        "yticks": yticks,
        "marks": marks_out,
        "box": box,
    }


def shares_geometry(entities: list[dict], width: int = 680) -> dict:
    """One stacked bar per entity: the shares of its images by primary label (and failed)."""
    left, right, row_h = 170, width - 12, 20
    keys = [("MU", "n_MU"), ("MI", "n_MI"), ("ME", "n_ME"), ("none", "n_none"), ("failed", "n_failed")]
    rows = []
    for i, e in enumerate(sorted(entities, key=lambda e: (-(e.get("rate_MU") or 0), str(e["entity"])))):
        total = sum(e.get(k) or 0 for _, k in keys)
        pos, segments = float(left), []
        for category, key in keys:
            n = e.get(key) or 0
            if not n or not total:
                continue
            w = n / total * (right - left)
            segments.append(
                {"x": round(pos, 1), "w": round(w, 1), "color": COLORS[category], "category": category, "count": n}
            )
            pos += w
        rows.append({"entity": e["entity"], "y": 6 + i * row_h, "total": total, "segments": segments})
    height = 6 + len(rows) * row_h + 32
    ticks = [{"x": round(left + f * (right - left), 1), "label": f"{f:.0%}"} for f in (0, 0.25, 0.5, 0.75, 1.0)]
    legend = [
        {"x": left + i * 70, "color": COLORS[c], "category": c}
        for i, c in enumerate(["MU", "MI", "ME", "none", "failed"])
    ]
    return {"width": width, "height": height, "left": left, "rows": rows, "ticks": ticks, "legend": legend}


def render_rate_geometry(entities: list[dict], width: int = 680, height: int = 230) -> dict:
    """Under-memorization: render rate against training frequency (log scale)."""
    points = [e for e in entities if e.get("render_rate") is not None and e.get("train_frequency") is not None]
    left, right, top, base = 45, width - 15, 10, height - 35
    xmax = max(3.0, float(np.log10(max((e["train_frequency"] for e in points), default=1) + 1)) + 0.2)

    def x(freq: float) -> float:
        return round(left + np.log10(freq + 1) / xmax * (right - left), 1)

    def y(rate: float) -> float:
        return round(top + (1 - rate) * (base - top), 1)

    return {
        **_frame(width, height, left, right, top, base),
        "x200": x(200),
        "y50": y(0.5),
        "yticks": [{"y": y(r), "label": f"{r:.0%}"} for r in (0.0, 0.5, 1.0)],
        "xticks": [{"x": x(10**k - 1), "label": f"{10**k:,}"} for k in range(0, int(xmax) + 1)],
        "points": [
            {
                "entity": e["entity"],
                "x": x(e["train_frequency"]),
                "y": y(e["render_rate"]),
                "rate": e["render_rate"],
                "freq": e["train_frequency"],
                "not_rendered": bool(e.get("entity_not_rendered")),
            }
            for e in points
        ],
    }


# -- rows ---------------------------------------------------------------------------------------------
class _Images:
    """Copies images next to the page once each, as PNG; None when one cannot be read (the page says so)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.copied: dict[str, str | None] = {}

    def __call__(self, uri: str | None, prefix: str) -> str | None:
        if not uri:
            return None
        if uri not in self.copied:
            name = f"{prefix}-{hashlib.sha1(uri.encode()).hexdigest()[:16]}.png"
            self.copied[uri] = self._copy(uri, self.folder / name)
        return self.copied[uri]

    @staticmethod
    def _copy(uri: str, target: Path) -> str | None:
        try:
            import io

            from PIL import Image

            image = Image.open(io.BytesIO(uris.read_bytes(uri))).convert("RGB")
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="PNG")
            return f"images/{target.name}"
        except Exception as err:  # noqa: BLE001 - a missing training image should not sink the report
            log.warning("report: cannot read %s: %s", uri, err)
            return None


def _findings(labels, gens, prompts, neighbors, thresholds, images: _Images, top: int) -> dict[str, list[dict]]:
    """Up to `top` examples per category: MU by replication score, MI by consistency, ME by the entity
    test's p-value; each with its prompt text and every stored neighbour of its copy-detection space."""
    by_unit: dict[str, dict[str, list[dict]]] = {}
    for n in neighbors:
        by_unit.setdefault(n["unit_id"], {}).setdefault(n["space"], []).append(n)
    order = {
        "MU": lambda r: -(r["replication_score"] if r["replication_score"] is not None else -9),
        "MI": lambda r: -(r["consistency"] or 0),
        "ME": lambda r: r["entity_p"] if r["entity_p"] is not None else 9,
    }
    out = {}
    for c in CATEGORIES[:-1]:
        ranked = sorted((r for r in labels if r["status"] == "ok" and r["label"] == c), key=order[c])
        # Every prompt's best image before any prompt's second: the examples show breadth, not one prompt.
        seen: dict[str, int] = {}
        depth = [
            seen.__setitem__(r["prompt_id"], seen.get(r["prompt_id"], -1) + 1) or seen[r["prompt_id"]] for r in ranked
        ]
        chosen = [r for _, _, r in sorted(zip(depth, range(len(ranked)), ranked, strict=True))][:top]
        out[c] = []
        for r in chosen:
            spaces = by_unit.get(r["unit_id"], {})
            space = "sscd" if "sscd" in spaces else "clip"
            floor = thresholds.get("replication") if space == "sscd" else thresholds.get("clip_replication")
            rows = sorted(spaces.get(space, []), key=lambda n: n["rank"])
            out[c].append(
                {
                    **{k: r.get(k) for k in ("unit_id", "prompt_id", "seed", "entity", "reasons", "copy_evidence")},
                    **{k: r.get(k) for k in ("replication_score", "background_p95", "consistency", "entity_p")},
                    "null_images": r.get("null_images"),
                    "label": r["label"] + (f" / {r['subtype']}" if r.get("subtype") else ""),
                    "prompt": prompts.get(r["prompt_id"], {}).get("prompt", ""),
                    "image": images(gens.get(r["unit_id"], {}).get("image_uri"), "generated"),
                    "neighbors": [
                        {
                            "rank": n["rank"],
                            "score": n["score"],
                            "space": space,
                            "train_id": n["train_id"],
                            "caption": n.get("caption"),
                            "image": images(n.get("image_uri"), "training"),
                            # outlined on MU findings only: there, above the threshold means the copied image
                            "outlined": c == "MU"
                            and floor is not None
                            and n["score"] is not None
                            and n["score"] >= floor,
                        }
                        for n in rows
                    ],
                }
            )
    return out


def report_context(root: str, scan_id: str, out: Path, top: int = 12) -> dict:
    manifest = read_manifest(root, scan_id)
    labels = scan_table(root, scan_id, "labels").to_pylist()
    gens = {g["unit_id"]: g for g in scan_table(root, scan_id, "generations").to_pylist()}
    prompts = {p["prompt_id"]: p for p in scan_table(root, scan_id, "prompts").to_pylist()}
    neighbors = scan_table(root, scan_id, "neighbors").to_pylist()
    entities = scan_table(root, scan_id, "entity_tallies").to_pylist()
    tallies = [
        {**p, "prompt": prompts.get(p["prompt_id"], {}).get("prompt")}
        for p in scan_table(root, scan_id, "prompt_tallies").to_pylist()
    ]
    backgrounds = {b["space"]: b for b in scan_table(root, scan_id, "background").to_pylist()}
    thresholds = manifest.get("config", {}).get("thresholds", {})
    counts = manifest.get("counts", {})
    scored = [r for r in labels if r["status"] == "ok"]
    space = "sscd" if "sscd" in backgrounds else "clip"
    charts = _environment().get_template("charts.svg.j2").module
    return {
        "scan": {
            "id": scan_id,
            "root": root,
            "model": manifest.get("model_id"),
            "date": manifest.get("scan_date"),
            "status": manifest.get("status"),
            "units": counts.get("units", len(labels)),
            "failed": counts.get("units_failed", 0),
            "labels": {c: counts.get(f"label_{c}", sum(1 for r in labels if r["label"] == c)) for c in CATEGORIES},
            "implied_controls": (mc := counts.get("implied_controls"))
            and {"passed": mc["beyond_null"], **mc, "unspecific": mi_unspecific(mc)},
        },
        "version": __version__,
        "categories": CATEGORIES,
        "category_titles": CATEGORY_TITLES,
        "thresholds": {k: v for k, v in sorted(thresholds.items()) if not isinstance(v, (dict, list))},
        "entities": entities,
        "entity_columns": _columns("entity_tallies", ENTITY_COLUMNS),
        "prompts": tallies,
        "prompt_columns": _columns("prompt_tallies", PROMPT_COLUMNS),
        "findings": _findings(labels, gens, prompts, neighbors, thresholds, _Images(out / "images"), top),
        "entity_chart": charts.shares(shares_geometry(entities)),
        "histogram": charts.histogram(
            histogram_geometry(
                [r["replication_score"] for r in scored],
                {"replication": thresholds.get("replication"), "verbatim": thresholds.get("verbatim")}
                if space == "sscd"
                else {"clip replication": thresholds.get("clip_replication")},
                backgrounds.get(space),
            )
        ),
        "render_rate": charts.render_rate(render_rate_geometry(entities)),
    }


def write_report(root: str, scan_id: str, out_dir: str, top: int = 12) -> Path:
    scan_id = resolve_scan(root, scan_id)  # `latest` works too
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    page = _environment().get_template("report.html.j2").render(**report_context(root, scan_id, out, top))
    (out / "index.html").write_text(page)
    return out / "index.html"
