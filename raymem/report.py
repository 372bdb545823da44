"""`raymem report`: one static HTML page per scan, for the morning after a nightly run.

Per-entity and per-prompt tables, a histogram of replication scores against the train-train
background and the thresholds, and for the top findings each generated image beside its nearest
training image with the scores and the labeler's reasons. Images are copied next to the page
(local, s3:// or WebDataset members alike), so the report is a self-contained folder to open, archive
or upload.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

from raymem import uri as uris
from raymem.outputs import read_manifest, resolve_scan
from raymem.results import scan_table

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem}
td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.mu{color:#b00020;font-weight:600}
.finding{display:flex;gap:1rem;margin:1rem 0;padding:.75rem;border:1px solid #eee;border-radius:6px}
.finding img{width:192px;height:192px;object-fit:contain;background:#f4f4f4;
image-rendering:pixelated}
.finding figure{margin:0;text-align:center;font-size:.75rem}.reasons{font-size:.8rem;flex:1}
.meta{color:#666;font-size:.85rem}
"""

CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `raymem report: images ${ok}/${imgs.length}`;
});
"""


# The category counts both tally tables (per entity, per prompt) show.
TALLY_COLUMNS = [
    ("n_units", "images"),
    ("n_MU", "MU"),
    ("n_MI", "MI"),
    ("n_ME", "ME"),
    ("n_none", "none"),
    ("n_failed", "failed"),
]


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            cls = ' class="mu"' if key in ("n_MU", "rate_MU") and (r.get(key) or 0) > 0 else ""
            cells.append(f"<td{cls}>{_fmt(r.get(key))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def histogram_svg(scores: list[float], marks: dict[str, float], width: int = 640, height: int = 180) -> str:
    """Replication scores as an SVG histogram, with vertical lines at the given marks."""
    values = np.asarray([s for s in scores if s is not None], dtype=float)
    lo, hi = min(-0.1, float(values.min()) if len(values) else 0.0), 1.0
    counts, edges = np.histogram(values, bins=40, range=(lo, hi))
    top = max(1, int(counts.max()) if len(counts) else 1)
    pad, bw = 30, (width - 40) / len(counts)
    bars = "".join(
        f'<rect x="{pad + i * bw:.1f}" y="{height - 20 - (c / top) * (height - 40):.1f}" width="{bw - 1:.1f}" '
        f'height="{(c / top) * (height - 40):.1f}" fill="#4a78c2">'
        f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )

    def x(v: float) -> float:
        return pad + (v - lo) / (hi - lo) * (width - 40)

    colors = ["#b00020", "#e08000", "#2a9d2a", "#555"]
    lines = []
    for i, (name, v) in enumerate(marks.items()):
        if v is None:
            continue
        color, right = colors[i % 4], x(v) > 0.75 * width  # labels near the right edge go left of the line
        anchor, dx = ("end", -3) if right else ("start", 3)
        lines.append(
            f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="10" y2="{height - 20}" stroke="{color}" '
            f'stroke-dasharray="4 3"/>'
            f'<text x="{x(v) + dx:.1f}" y="{20 + 12 * i}" font-size="10" fill="{color}" text-anchor="{anchor}">'
            f"{html.escape(name)} {v:.2f}</text>"
        )
    axis = (
        f'<line x1="{pad}" x2="{width - 10}" y1="{height - 20}" y2="{height - 20}" stroke="#999"/>'
        f'<text x="{pad}" y="{height - 5}" font-size="10">{lo:.1f}</text>'
        f'<text x="{width - 25}" y="{height - 5}" font-size="10">1.0</text>'
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="replication scores">{bars}{lines}{axis}</svg>'
    )


def render_rate_svg(entities: list[dict], width: int = 640, height: int = 220) -> str:
    """Under-memorization: each entity's measured render rate against its training frequency (log
    scale), with the 200-image line (MIMETIC2) and the one-half line below which it is 'not rendered'."""
    points = [e for e in entities if e.get("render_rate") is not None and e.get("train_frequency") is not None]
    if not points:
        return "<p>No entity has both a training frequency (entity tags) and scored images.</p>"
    left, bottom, top_pad = 45, 35, 10
    xmax = max(3.0, float(np.log10(max(e["train_frequency"] for e in points) + 1)) + 0.2)

    def x(freq: float) -> float:
        return left + np.log10(freq + 1) / xmax * (width - left - 15)

    def y(rate: float) -> float:
        return top_pad + (1 - rate) * (height - bottom - top_pad)

    dots = "".join(
        f'<circle cx="{x(e["train_frequency"]):.1f}" cy="{y(e["render_rate"]):.1f}" r="5" '
        f'fill="{"#b00020" if e.get("entity_not_rendered") else "#4a78c2"}">'
        f"<title>{html.escape(str(e['entity']))}: rendered in {e['render_rate']:.0%} of images, "
        f"{e['train_frequency']} training images</title></circle>"
        for e in points
    )
    ticks = "".join(
        f'<text x="{x(10**k - 1):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{10**k:,}</text>'
        for k in range(0, int(xmax) + 1)
    )
    guides = (
        f'<line x1="{x(200):.1f}" x2="{x(200):.1f}" y1="{top_pad}" y2="{height - bottom}" stroke="#e08000" '
        f'stroke-dasharray="4 3"/><text x="{x(200) + 3:.1f}" y="{top_pad + 10}" font-size="10" fill="#e08000">'
        f"200 images</text>"
        f'<line x1="{left}" x2="{width - 15}" y1="{y(0.5):.1f}" y2="{y(0.5):.1f}" stroke="#999" '
        f'stroke-dasharray="4 3"/>'
    )
    axes = (
        f'<line x1="{left}" x2="{width - 15}" y1="{height - bottom}" y2="{height - bottom}" stroke="#555"/>'
        f'<line x1="{left}" x2="{left}" y1="{top_pad}" y2="{height - bottom}" stroke="#555"/>'
        f'<text x="{left - 5}" y="{y(1) + 4:.1f}" font-size="10" text-anchor="end">100%</text>'
        f'<text x="{left - 5}" y="{y(0.5) + 4:.1f}" font-size="10" text-anchor="end">50%</text>'
        f'<text x="{left - 5}" y="{y(0) + 4:.1f}" font-size="10" text-anchor="end">0%</text>'
        f'<text x="{(width + left) / 2:.1f}" y="{height - 5}" font-size="11" text-anchor="middle">'
        f"tagged training images (log scale)</text>"
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="render rate against training frequency">'
        f"{guides}{axes}{ticks}{dots}</svg>"
    )


def _copy_image(uri: str | None, target: Path) -> str | None:
    """Copy an image next to the report as PNG; None when it cannot be read (the page says so)."""
    if not uri:
        return None
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


def write_report(root: str, scan_id: str, out_dir: str, top: int = 12) -> Path:
    scan_id = resolve_scan(root, scan_id)  # `latest` works too
    manifest = read_manifest(root, scan_id)
    labels = scan_table(root, scan_id, "labels").to_pylist()
    gens = {g["unit_id"]: g for g in scan_table(root, scan_id, "generations").to_pylist()}
    neighbors = scan_table(root, scan_id, "neighbors").to_pylist()
    entity = scan_table(root, scan_id, "entity_tallies").to_pylist()
    prompts = scan_table(root, scan_id, "prompt_tallies").to_pylist()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    cfg = manifest.get("config", {})
    t = cfg.get("thresholds", {})
    background = next((r["background_p95"] for r in labels if r.get("background_p95") is not None), None)
    scored = [r for r in labels if r["status"] == "ok"]
    svg = histogram_svg(
        [r["replication_score"] for r in scored],
        {"background p95": background, "replication": t.get("replication"), "verbatim": t.get("verbatim")},
    )
    space_of = {n["unit_id"]: n["space"] for n in neighbors if n["rank"] == 1 and n["space"] == "sscd"}
    top_neighbor = {}
    for n in neighbors:
        if n["rank"] == 1 and (n["space"] == space_of.get(n["unit_id"], "clip")):
            top_neighbor[n["unit_id"]] = n
    order = {"MU": 0, "MI": 1, "ME": 2, "none": 3}
    findings = sorted(scored, key=lambda r: (order.get(r["label"], 9), -(r["replication_score"] or -1)))[:top]
    cards = []
    for i, r in enumerate(findings):
        g, n = gens.get(r["unit_id"], {}), top_neighbor.get(r["unit_id"], {})
        gen_src = _copy_image(g.get("image_uri"), out / "images" / f"finding-{i:03d}-generated.png")
        train_src = _copy_image(n.get("image_uri"), out / "images" / f"finding-{i:03d}-training.png")

        def figure(src, caption):
            img = f'<img src="{src}" alt="{html.escape(caption)}">' if src else "<p>(image not readable)</p>"
            return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"

        label = r["label"] + (" / " + r["subtype"] if r.get("subtype") else "")
        css = "mu" if r["label"] == "MU" else ""
        scores = (
            f"replication {_fmt(r['replication_score'], 3)} &nbsp; pixel l2 {_fmt(r.get('pixel_l2'), 3)}"
            f" &nbsp; consistency {_fmt(r['consistency'])}"
        )
        cards.append(
            '<div class="finding">'
            + figure(gen_src, f"generated: {r['prompt_id']} seed {r['seed']}")
            + figure(train_src, f"nearest training: {n.get('train_id', '-')}")
            + f'<div class="reasons"><b class="{css}">{html.escape(label)}</b> &nbsp; {scores}'
            + f"<p>{html.escape(r['reasons'] or '')}</p>"
            + f'<p class="meta">{html.escape(n.get("caption") or "")}</p></div></div>'
        )
    counts = manifest.get("counts", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>raymem report</title>
<style>{CSS}</style><script>{CHECK_SCRIPT}</script></head><body>
<h1>raymem scan {html.escape(scan_id)}</h1>
<p class="meta">model {html.escape(str(manifest.get("model_id")))} · date {manifest.get("scan_date")} · config
{html.escape(str(manifest.get("config_hash", ""))[:12])} · status {manifest.get("status")} ·
{counts.get("units", "?")} images ({counts.get("units_failed", 0)} failed) · MU {counts.get("label_MU", 0)} ·
MI {counts.get("label_MI", 0)} · ME {counts.get("label_ME", 0)} · none {counts.get("label_none", 0)}</p>
<h2>Entities</h2>{
        _table(
            entity,
            [
                ("entity", "entity"),
                *TALLY_COLUMNS,
                ("rate_MU", "MU rate"),
                ("n_any_MU", "showing MU"),
                ("n_any_ME", "showing ME"),
                ("n_ME_and_MU", "ME and MU"),
                ("n_MI_and_MU", "MI and MU"),
                ("n_memorized_prompts", "memorized prompts"),
                ("train_frequency", "training images"),
                ("render_rate", "render rate"),
                ("entity_not_rendered", "not rendered"),
            ],
        )
    }
<p class="meta">MU / MI / ME / none count each image once, by its primary label (MU &gt; MI &gt; ME);
"showing" counts every image that shows a category at all, and "ME and MU" those that show both
(the requested entity on copied content).</p>
<h2>Under-memorization: render rate against training frequency</h2>{render_rate_svg(entity)}
<p class="meta">Share of each entity's images that render it (tested against the null images), against
its tagged training images; red: rendered in fewer than half (not rendered). The dashed line at 200
images is MIMETIC2's imitation threshold.</p>
<h2>Replication scores against the background</h2>{svg}
<p class="meta">Top-1 copy-detection similarity of every scored image; dashed lines: the train–train
nearest-neighbour background (95th percentile) and the replication / verbatim thresholds.</p>
<h2>Top findings</h2>{"".join(cards) or "<p>No scored images.</p>"}
<h2>Prompts</h2>{
        _table(
            prompts,
            [
                ("prompt_id", "prompt"),
                ("entity", "entity"),
                *TALLY_COLUMNS,
                ("consistency", "consistency"),
                ("max_replication_score", "max replication"),
                ("memorized_prompt", "memorized"),
            ],
        )
    }
<p class="meta">Generated by raymem. Thresholds: {html.escape(json.dumps(t))}</p>
</body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"
