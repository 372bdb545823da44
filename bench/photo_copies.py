"""Does the copy rule decide on photographs? (issue 12, item 4)

The planted worlds are 32-px drawings that SSCD sees as alike (train-train background p95 about 0.9),
so `replication` (0.5) never decides there. This puts photographs -- the images scikit-image ships in
its wheel, usable offline -- through raymem's own copy path at the default SSCD input (288 px):
`raymem index` embeds them and measures the train-train background, the scan's join finds every
query's neighbours, and the labeler's copy rule (raymem.label.replication_evidence, with its pair
scores and the default thresholds) decides.

Every photo is queried under each edit (resized down and up, JPEG, a 90 % crop, a colour shift, blur
with noise, 64-px detail, a mirror), twice:
  copy       against the training set that holds the photo: should be a copy (MU (a));
  not copy   against the same training set with the photo's own rows left out of its neighbours
             (leave-one-out): must not be.
Training sets:
  distinct   one image per photo;
  reposts    the same, and a share of the photos stored again as near-duplicates (resized, re-encoded,
             slightly cropped: one image each), as web-scraped sets hold them (about 30 % of
             LAION-2B by Webster et al.'s 2023 de-duplication count, as recalled).

Intervals resample whole photos (a photo's edits are not independent).

Region copies (MU (r), (d); the tile rule of raymem.regions at the default pixel_size and grid): every
photo, JPEG-compressed, against every other photo (must share no copied region), and a photo whose left
half is pasted over the next photo (a reused background behind other content: should be found).

    python bench/photo_copies.py                      # both training sets, repost share 0.3
    python bench/photo_copies.py --repost-share 0.5 --json results.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.candidates import Queries  # noqa: E402
from raymem.config import CopyDetectionConfig, IndexConfig, SignalsConfig, ThresholdsConfig  # noqa: E402
from raymem.duplicates import attach_pair_scores, read_embeddings, rows_to_read  # noqa: E402
from raymem.encoders import CopyDetector  # noqa: E402
from raymem.index import run_index  # noqa: E402
from raymem.join import nearest_neighbours  # noqa: E402
from raymem.label import Background, CopyEvidence, replication_evidence  # noqa: E402
from raymem.regions import scaled_copied, tile_stats  # noqa: E402
from raymem.runtime import ray_session  # noqa: E402
from raymem.schema import SPACE_COLUMNS  # noqa: E402
from raymem.sources import inspect_training  # noqa: E402
from raymem.stats import cluster_bootstrap  # noqa: E402

# scikit-image's bundled images (skimage.data): photographs, micrographs, scans and a few renderings
PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
    "moon", "page", "rocket", "retina", "brick", "grass", "gravel", "text", "cell", "clock", "horse",
    "logo", "colorwheel", "stereo_motorcycle",
)  # fmt: skip
SIZE = 288  # SSCD's default input (raymem's CopyDetectionConfig.image_size)
ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "planted-models" / "clip"  # any CLIP serves: the index wants one; the copy space is SSCD
K = 20  # neighbours per query, as the scan's join.k


def photos(count: int = len(PHOTOS)) -> dict[str, Image.Image]:
    from skimage import data

    out = {}
    for name in PHOTOS[:count]:
        a = getattr(data, name)()
        a = np.asarray(a[0] if isinstance(a, tuple) else a)  # the stereo pair: its left view only
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out[name] = Image.fromarray(a).resize((SIZE, SIZE), Image.BICUBIC)
    return out


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def blur_noise(im: Image.Image) -> Image.Image:
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(2)), np.float64)
    noise = np.random.default_rng(0).normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


EDITS = {
    "resized (128 px and back)": lambda im: im.resize((128, 128)).resize((SIZE, SIZE)),
    "JPEG quality 30": lambda im: jpeg(im, 30),
    "90 % crop": lambda im: im.crop((14, 14, SIZE - 14, SIZE - 14)),
    "colour shift": lambda im: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.2)).enhance(0.6),
    "blur and noise": blur_noise,
    "64-px detail": lambda im: im.resize((64, 64)).resize((SIZE, SIZE), Image.BICUBIC),
    "mirrored": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
}

REPOSTS = {  # how a scraped set stores the same photo again: another size, another encoding, a trim
    "repost-resized": lambda im: im.resize((200, 200)),
    "repost-jpeg": lambda im: jpeg(im, 70),
    "repost-trim": lambda im: im.crop((6, 6, SIZE - 6, SIZE - 6)),
}


def training_set(root: Path, images: dict[str, Image.Image], reposted: set[str]) -> Path:
    """A table of the photos (and the reposts of `reposted`) as PNG files: the input `raymem index` reads."""
    root.mkdir(parents=True)
    rows = []
    for name, im in images.items():
        variants = {"": im} | ({f"-{k}": f(im) for k, f in REPOSTS.items()} if name in reposted else {})
        for suffix, variant in variants.items():
            path = root / f"{name}{suffix}.png"
            variant.save(path)
            rows.append({"image": path.name, "caption": f"a picture ({name})", "train_id": f"{name}{suffix}"})
    table = root / "training.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def index(table: Path, out: Path) -> dict:
    run_index(
        IndexConfig.model_validate(
            {
                "input": {"kind": "table", "path": str(table), "image_column": "image", "id_column": "train_id"},
                "output": str(out),
                "embedding": {
                    "clip": {"model": f"local-dir:{CLIP}", "pretrained": None},
                    "copy_detection": {"model": "immaculate:sscd", "image_size": SIZE},
                },
                "background_sample": 1000,
            }
        )
    )
    return json.loads((out / "_index.json").read_text())


def photo_of(train_id: str) -> str:
    return train_id.split("-repost-")[0]


def decide(training_dir: Path, background: dict, queries: dict[tuple[str, str], np.ndarray]) -> list[dict]:
    """Every (photo, edit) query as a copy and as a not-copy, decided by the labeler's copy rule."""
    training = inspect_training(str(training_dir), {})
    ids = list(queries)
    topk = nearest_neighbours(training, {"q": Queries(ids=ids, matrices={"sscd": np.stack(list(queries.values()))})}, K)
    rows = topk["q"]["sscd"].rows
    t = ThresholdsConfig()
    # the neighbours' own SSCD embeddings, for the near-duplicate pair scores: read as the scan reads them
    embeddings = read_embeddings(SPACE_COLUMNS["sscd"], rows_to_read(rows, t.replication))
    copy = CopyEvidence("sscd", "sscd", None, Background("sscd", background["p95"], background["n"]))
    out = []
    for (photo, edit), nbrs in zip(ids, rows):
        for expected in ("copy", "not copy"):
            kept = [dict(n) for n in nbrs if expected == "copy" or photo_of(n["train_id"]) != photo]
            attach_pair_scores([kept], t.replication, lambda r: embeddings.get((r.get("path"), str(r["train_id"]))))
            rep = replication_evidence(copy, kept, None, None, t, None)
            out.append(
                {
                    "photo": photo,
                    "edit": edit,
                    "expected": expected,
                    "replicated": rep.replicated,
                    "score": rep.score,
                    "breadth": rep.breadth,
                    "reason": next((r for r in rep.reasons if "replication" in r), ""),
                }
            )
    return out


def share(results: list[dict], keep) -> tuple[int, int, tuple[float, float] | None]:
    by_photo = {}
    for r in results:
        if keep(r):
            k, n = by_photo.get(r["photo"], (0, 0))
            by_photo[r["photo"]] = (k + r["replicated"], n + 1)
    nums, dens = [k for k, _ in by_photo.values()], [n for _, n in by_photo.values()]
    return sum(nums), sum(dens), cluster_bootstrap(nums, dens)


def report(name: str, background: dict, results: list[dict]) -> list[str]:
    lines = [
        f"\n== training set: {name} -- SSCD background (index) p50 {background['p50']:.3f} p95 "
        f"{background['p95']:.3f} p99 {background['p99']:.3f} over {background['n']} images; near-duplicates "
        f"passed over for {background.get('near_duplicated', 0):.0%} of them",
        f"{'edit':28s} {'copies found':>22s} {'median R':>9s}   {'not-copies called copies':>26s} {'max R':>6s}",
    ]
    for edit in [*EDITS, None]:
        sel = [r for r in results if edit is None or r["edit"] == edit]
        cols = []
        for expected in ("copy", "not copy"):
            k, n, ci = share(sel, lambda r, e=expected: r["expected"] == e)
            iv = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            cols.append(f"{k:3d}/{n:<3d} {iv:>13s}")
        scores = [r["score"] for r in sel if r["expected"] == "copy"]
        negatives = [r["score"] for r in sel if r["expected"] == "not copy"]
        lines.append(
            f"{edit or 'all':28s} {cols[0]:>22s} {np.median(scores):9.3f}   {cols[1]:>26s} {max(negatives):6.3f}"
        )
    missed = [r for r in results if r["expected"] == "copy" and not r["replicated"]]
    if missed:
        lines.append("copies missed, by reason:")
        whys: dict[str, int] = {}
        for r in missed:
            why = r["reason"].split(" but ")[-1].split(" (")[0] if " but " in r["reason"] else r["reason"][:60]
            whys[why] = whys.get(why, 0) + 1
        lines += [f"  {n:3d}  {why}" for why, n in sorted(whys.items(), key=lambda x: -x[1])]
    return lines


def region_lines(images: dict[str, Image.Image]) -> list[str]:
    """The tile rule on photographs: copied tiles (within region_l2, both textured) between distinct
    photos, and of a pasted half -- at the fixed bound (region copies) and the texture-scaled one
    (duplicated patches)."""
    s, t = SignalsConfig(), ThresholdsConfig()

    def pixels(im):
        return np.asarray(im.convert("RGB").resize((s.pixel_size, s.pixel_size), Image.BICUBIC), np.float64) / 255

    def copied(a, b) -> tuple[int, int]:
        l2, texture = tile_stats(a, b, s.region_grid)
        fixed = int(((l2 <= t.region_l2) & (texture >= t.region_texture)).sum())
        return fixed, int(scaled_copied(l2, texture, t.region_l2, t.region_texture).sum())

    names = list(images)
    plain = {n: pixels(im) for n, im in images.items()}
    distinct = [copied(pixels(jpeg(images[a], 50)), plain[b]) for a in names for b in names if a != b]
    half = s.pixel_size // 2
    pasted = []
    for i, a in enumerate(names):
        mixed = plain[names[(i + 1) % len(names)]].copy()
        mixed[:, :half] = plain[a][:, :half]
        mixed = jpeg(Image.fromarray((mixed * 255).round().astype(np.uint8)), 50)
        pasted.append((a, *copied(pixels(mixed), plain[a])))
    found = [(a, f, sc) for a, f, sc in pasted if f >= t.region_tiles]
    grid = s.region_grid**2
    return [
        f"\n== region copies: {s.region_grid}x{s.region_grid} tiles at {s.pixel_size} px, region_l2 {t.region_l2}, "
        f"texture {t.region_texture}, region_tiles {t.region_tiles}",
        f"distinct photo pairs with a region copy: fixed bound {sum(f >= t.region_tiles for f, _ in distinct)}"
        f"/{len(distinct)} (most tiles {max(f for f, _ in distinct)}), texture-scaled "
        f"{sum(sc >= t.region_tiles for _, sc in distinct)}/{len(distinct)} (most {max(sc for _, sc in distinct)})",
        f"pasted halves found: {len(found)}/{len(pasted)} (copied tiles of the {grid // 2} pasted: median "
        f"{int(np.median([f for _, f, _ in pasted]))}); missed: "
        + (", ".join(f"{a} ({f} tiles)" for a, f, _ in pasted if f < t.region_tiles) or "none"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repost-share", type=float, default=0.3, help="share of photos stored again as reposts")
    parser.add_argument("--seed", type=int, default=0, help="which photos are reposted")
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help="use the first N images only (a quick run)")
    parser.add_argument("--json", help="write every decision here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not 2 <= args.photos <= len(PHOTOS):
        parser.error(f"--photos must be between 2 and {len(PHOTOS)}")
    images = photos(args.photos)
    rng = np.random.default_rng(args.seed)
    reposted = set(rng.choice(sorted(images), round(args.repost_share * len(images)), replace=False).tolist())
    detector = CopyDetector(CopyDetectionConfig(model="immaculate:sscd", image_size=SIZE))
    keys = [(p, e) for p in images for e in EDITS]
    edited = [EDITS[e](images[p]) for p, e in keys]
    embedded = np.concatenate([detector.encode_images(edited[i : i + 32]) for i in range(0, len(edited), 32)])
    queries = dict(zip(keys, embedded))
    lines = [f"{len(images)} images (scikit-image), SSCD at {SIZE} px; reposted ({len(reposted)}): {sorted(reposted)}"]
    everything = {}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        for name, chosen in (("distinct", set()), ("reposts", reposted)):
            table = training_set(Path(tmp) / name / "images", images, chosen)
            out = Path(tmp) / name / "index"
            manifest = index(table, out)
            background = manifest["background"]["sscd"]
            results = decide(out, background, queries)
            everything[name] = {"background": background, "results": results}
            lines += report(name, background, results)
    lines += region_lines(images)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
