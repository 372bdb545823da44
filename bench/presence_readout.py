"""What can a planted scan's embeddings tell of an element, or an entity, at all? (what limits MI and ME)

Three measurements per planted scan (its world's training table and its scan and null images):

1. **The read-out ceiling.** For each world element, a linear read-out (LDA with a shrunk covariance)
   of "the caption names the element" over the training images that carry no entity, two-fold
   cross-validated: its AUC in each embedding space the table has (CLIP, SSCD). No rule built on an
   embedding can be more specific than the embedding's best linear read-out on the images it was
   trained on. Beside it, the AUC of the zero-shot text probe the scan uses, on the same images.
2. **Rules on the scan.** Every prompt asked about an implied element -- the MI prompts' own (true)
   listed or mined, and the negative probes of the other prompts (false; docs/planted.md "Negative
   probes") -- decided
   by the scan's own test (the text probe's paired t over the seeds, scan image against the null image
   of the same seed, p <= 0.05) and by alternatives: the same test beyond the placebo words' shifts,
   the image-space read-outs of (1) tested the same way, each also required to shift more than the
   world's other elements, and the text probe judged against the scan's own MI controls (its p below
   the controls' 5 % quantile, never above 0.05: an empirical null; scans with 20 controls or more).
   Counts per world and pooled, with exact 95 % intervals.
3. **Entities.** Can the CLIP embedding tell an entity's training images from its class's generic
   ones (AUC of the cosine to the centroid of half the entity's images, on the other half and the
   generics)? And how often does the generator draw it: the share of the scan's images of each role,
   and of their null images, closer to the entity's centroid than 95 % of the class's generic
   training images (a reference that needs no null images), and of the scan images drawn and not
   drawn, the share the scan labelled ME (and why not, for drawn ME entities).

    python bench/presence_readout.py ROOT:SCAN_ID [ROOT:SCAN_ID ...] [--relocate OLD=NEW]

ROOT is a scan output root (`build/planted/scans/models-<digest>`), SCAN_ID a complete planted scan;
`--relocate` rewrites a path prefix recorded in a manifest (a CLIP directory since moved).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.config import ClipConfig  # noqa: E402
from raymem.encoders import ClipEncoder  # noqa: E402
from raymem.label_inputs import LabelInputs  # noqa: E402
from raymem.outputs import read_manifest, read_scan_table  # noqa: E402
from raymem.planted.world import CLASSES, ELEMENTS, cast  # noqa: E402
from raymem.probes import PLACEBO_ELEMENTS, element_text  # noqa: E402
from raymem.stats import clopper_pearson, paired_p  # noqa: E402

ALPHA = 0.05
SHRINK = 1e-2  # covariance shrinkage of the LDA read-outs (embeddings are unit vectors)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def lda(x: np.ndarray, positive: np.ndarray) -> np.ndarray:
    cov = np.cov(x.T) + SHRINK * np.eye(x.shape[1])
    return np.linalg.solve(cov, x[positive].mean(0) - x[~positive].mean(0))


def readout_scores(x: np.ndarray, y: np.ndarray, fit: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """The two-fold cross-validated LDA read-out of `y` from `x`: each fold scored by the read-out fitted
    on the other fold's `fit` rows."""
    scores = np.zeros(len(x))
    for f in (0, 1):
        train = fit & (fold != f)
        scores[fold == f] = x[fold == f] @ lda(x[train], y[train])
    return scores


def text_probe_scores(encoder: ClipEncoder, x: np.ndarray, captions: list[str], element: str) -> np.ndarray:
    """The zero-shot text probe the scan uses, on image embeddings `x`: "a photo of a <class> with
    <element>" against "a photo of a <class>", the class read from each image's caption (NaN where the
    caption names none)."""
    classes = [next((c for c in CLASSES if f"of a {c}" in cap), None) for cap in captions]
    scores = np.full(len(captions), np.nan)
    for c in CLASSES:
        t = encoder.encode_texts([f"a photo of a {c}", element_text(f"a {c}", element)])
        rows = np.array([k == c for k in classes])
        scores[rows] = x[rows] @ (100 * (t[1] - t[0]))
    return scores


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _paired(diffs: np.ndarray) -> tuple[float, float]:
    """One-sided paired t over seeds: (p, mean difference)."""
    from scipy import stats as st

    n, mean, sd = len(diffs), float(diffs.mean()), float(diffs.std(ddof=1))
    return (float(st.t.sf(mean / (sd / np.sqrt(n)), n - 1)) if sd > 0 else float(mean <= 0)), mean


class Scan:
    def __init__(self, root: str, scan_id: str, relocate: tuple[str, str] | None):
        fix = (lambda p: p.replace(*relocate, 1)) if relocate else (lambda p: p)
        cfg = read_manifest(root, scan_id)["config"]
        self.world = Path(fix(cfg["prompts"])).parent
        self.split = "calib" if "calib" in Path(cfg["prompts"]).name else "eval"
        self.seed = json.loads((self.world / "world.json").read_text())["config"]["seed"]
        self.encoder = ClipEncoder(ClipConfig(model=fix(cfg["embedding"]["clip"]["model"]), pretrained=None))
        self.inputs = LabelInputs.read(root, scan_id)
        self.null_alpha = cfg["thresholds"]["null_alpha"]
        labels = read_scan_table(root, scan_id, "labels").select(
            ["unit_id", "prompt_id", "label", "entity_p", "elements"]
        )
        self.labels = {r["unit_id"]: r for r in labels.to_pylist()}
        # prompt id -> the elements the scan asked about as MI controls (never shown; docs/labeler.md)
        self.controls: dict[str, set[str]] = defaultdict(set)
        for r in self.labels.values():
            self.controls[r["prompt_id"]].update(e["element"] for e in r["elements"] or () if e["kind"] == "control")
        import pyarrow.parquet as pq

        table = pq.read_table(sorted(glob.glob(f"{fix(cfg['training']['embeddings'])}/part-*.parquet")))
        self.captions = table.column("caption").to_pylist()
        self.ids, self.tags = table.column("train_id").to_pylist(), table.column("entities").to_pylist()
        self.generic = np.array([not tags for tags in table.column("entities").to_pylist()])
        self.train = {
            space: np.stack(table.column(f"{space}_embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
            for space in ("clip", "sscd")
            if f"{space}_embedding" in table.column_names
        }
        # prompt id -> its negative probe; entity -> the element it implies (the world's cast)
        self.negatives = json.loads((self.world / f"negative-probes-{self.split}.json").read_text())
        self.implies = {e.name: e.implied for e in cast(self.seed)[0] if e.implied}

    def names(self, element: str) -> np.ndarray:
        return np.array([element in c for c in self.captions])

    def ceiling(self) -> dict[tuple[str, str], float]:
        """{(space, element): two-fold cross-validated AUC of the LDA read-out on entity-free images}."""
        fold = np.random.default_rng(0).integers(0, 2, len(self.captions))
        out = {}
        for space, x in self.train.items():
            for element in ELEMENTS:
                y = self.names(element)
                scores = readout_scores(x, y, self.generic, fold)
                out[space, element] = auc(scores[self.generic], y[self.generic])
        # the zero-shot text probe the scan uses, on the same images
        if "clip" in self.train:
            for element in ELEMENTS:
                scores = text_probe_scores(self.encoder, self.train["clip"], self.captions, element)
                keep = self.generic & ~np.isnan(scores)
                out["text probe", element] = auc(scores[keep], self.names(element)[keep])
        return out

    def entities(self) -> tuple[dict[str, float], dict[tuple[str, str], list[int]], Counter]:
        """({entity: held-out AUC of its centroid cosine}, {(role, what): [count, images]}, {why an image of a
        drawn ME entity is not ME: images})."""
        x, ids = self.train["clip"], self.ids
        tags = [set(t or ()) for t in self.tags]
        aucs: dict[str, float] = {}
        drawn: dict = defaultdict(lambda: [0, 0])
        misses: Counter = Counter()
        cast_by_name = {e.name: e for e in cast(self.seed)[0] if e.colors}
        reference = {}
        rng = np.random.default_rng(0)
        for e in cast_by_name.values():
            mine = np.array([e.name in t for t in tags])
            generic = np.array([i.startswith(f"{e.cls}-") for i in ids])  # "tower-017": the class's own images
            fit = np.zeros(len(ids), bool)
            fit[rng.permutation(np.flatnonzero(mine))[: mine.sum() // 2]] = True
            held = (mine & ~fit) | generic
            aucs[e.name] = auc(x[held] @ _unit(x[fit].mean(0)), mine[held])
            centroid = _unit(x[mine].mean(0))  # as the scan's reference: every tagged image
            reference[e.name] = (centroid, float(np.quantile(x[generic] @ centroid, 0.95)))
        for i, g in enumerate(self.inputs.generations):
            ctx = self.inputs.contexts.get(g.get("parent_prompt_id") or g["prompt_id"])
            if g["status"] != "ok" or ctx is None or ctx.entity not in reference:
                continue
            centroid, bound = reference[ctx.entity]
            is_drawn = float(self.inputs.clip[i] @ centroid) > bound
            seat = drawn[cast_by_name[ctx.entity].role, f"{g['role']} images drawn"]
            seat[0] += is_drawn
            seat[1] += 1
            if g["role"] == "scan" and g["unit_id"] in self.labels:  # what the scan called it, drawn or not
                label = self.labels[g["unit_id"]]
                seat = drawn[cast_by_name[ctx.entity].role, f"{'drawn' if is_drawn else 'not drawn'}: labelled ME"]
                seat[0] += label["label"] == "ME"
                seat[1] += 1
                if is_drawn and label["label"] != "ME" and cast_by_name[ctx.entity].role == "ME":
                    misses[self._why_not_me(label)] += 1
        return aucs, drawn, misses

    def _why_not_me(self, label: dict) -> str:
        """Why the scan did not call an image of a drawn ME entity ME (the first that applies)."""
        if label["label"] == "MI":
            rendered = label["entity_p"] is not None and label["entity_p"] <= self.null_alpha
            return f"MI (an implied-element probe passed; entity test {'passed' if rendered else 'not passed'})"
        if label["entity_p"] is None or label["entity_p"] > self.null_alpha:
            return f"{label['label']}: entity test not passed"
        if any(e["kind"] == "explicit" and not e["present"] for e in label["elements"] or ()):
            return f"{label['label']}: a requested element not seen"
        return f"{label['label']}: other"

    def decisions(self) -> list[tuple[bool, dict[str, bool]]]:
        """Per implied-element probe with >= 2 seed pairs: (truly implied, {rule: beyond the null})."""
        readouts = {
            space: {e: lda(x[self.generic], self.names(e)[self.generic]) for e in ELEMENTS}
            for space, x in self.train.items()
        }
        images: dict = defaultdict(lambda: defaultdict(dict))
        for i, g in enumerate(self.inputs.generations):
            if g["status"] == "ok":
                sscd = None if self.inputs.sscd is None else self.inputs.sscd[i]
                seat = images[g.get("parent_prompt_id") or g["prompt_id"]][g["role"]]
                seat[g["seed"]] = {"clip": self.inputs.clip[i], "sscd": sscd}
        out, pending = [], []
        control_ps: list[float] = []  # the scan's MI controls, tested as the scan's test does
        words = list(ELEMENTS) + list(PLACEBO_ELEMENTS)
        for pid, ctx in sorted(self.inputs.contexts.items()):
            scan, null = images[pid].get("scan", {}), images[pid].get("null", {})
            seeds = sorted(set(scan) & set(null))
            # implied elements listed by the prompt set or mined (a mining world lists none)
            implied = [p.element for p in ctx.probes if p.kind in ("implicit", "mined")]
            if not ctx.entity_class or len(seeds) < 2 or not implied:
                continue
            cls = ctx.entity_class
            texts = self.encoder.encode_texts([f"a photo of {cls}"] + [element_text(cls, w) for w in words])
            # the scan's paired test of each word's logit shift, scan image against the null of its seed
            text = {
                w: paired_p(
                    {s: float(scan[s]["clip"] @ (100 * (texts[1 + j] - texts[0]))) for s in seeds},
                    {s: float(null[s]["clip"] @ (100 * (texts[1 + j] - texts[0]))) for s in seeds},
                )
                for j, w in enumerate(words)
            }
            control_ps += [text[c].p for c in self.controls.get(pid, ()) if c in text]
            for element in implied:
                truly = self.implies.get(ctx.entity) == element
                if not truly and self.negatives.get(pid) != element:
                    continue  # a mined term that is neither (the truth is not known for it)
                rules = {}
                beyond = text[element].p <= ALPHA
                rules["text probe (the scan's test)"] = beyond
                placebo_max = max(text[w].effect for w in PLACEBO_ELEMENTS)
                rules["text probe, beyond every placebo"] = beyond and text[element].effect > placebo_max
                others = max(text[w].effect for w in ELEMENTS if w != element)
                rules["text probe, largest element shift"] = beyond and text[element].effect > others
                for space, directions in readouts.items():
                    if scan[seeds[0]][space] is None:
                        continue
                    spread = {e: float((self.train[space] @ d).std()) for e, d in directions.items()}
                    shift = {
                        e: _paired(np.array([(scan[s][space] - null[s][space]) @ d for s in seeds]) / spread[e])
                        for e, d in directions.items()
                    }
                    p, mean = shift[element]
                    rules[f"{space} read-out"] = p <= ALPHA
                    rules[f"{space} read-out, largest element shift"] = p <= ALPHA and mean > max(
                        m for e, (_, m) in shift.items() if e != element
                    )
                pending.append((truly, rules, text[element].p))
        # The text probe judged against the scan's own controls instead of the nominal level: beyond the
        # null only when its p is below the 5 % quantile of the controls' (an empirical null; a scan
        # without controls cannot have this rule)
        level = float(np.quantile(control_ps, ALPHA)) if len(control_ps) >= 20 else None
        for truly, rules, p in pending:
            if level is not None:
                rules["text probe, below 5 % of the controls"] = p <= min(level, ALPHA)
            out.append((truly, rules))
        return out


def _share(k: int, n: int) -> str:
    interval = clopper_pearson(k, n)
    return f"{k}/{n} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else f"{k}/{n} (none asked)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+", help="ROOT:SCAN_ID")
    parser.add_argument("--relocate", help="OLD=NEW path prefix in the manifests")
    args = parser.parse_args()
    relocate = tuple(args.relocate.split("=", 1)) if args.relocate else None
    scans = [Scan(*ref.rsplit(":", 1), relocate) for ref in args.scans]

    print("1. read-out ceiling: cross-validated AUC of a linear read-out of each element (entity-free training images)")
    seen = set()
    for scan in scans:
        if scan.seed in seen:
            continue
        seen.add(scan.seed)
        for (space, element), auc in scan.ceiling().items():
            print(f"   world {scan.seed:3d}  {space:10s} {element:10s} {auc:.3f}")

    print("\n2. implied-element rules: true implied elements found / negative probes rejected")
    totals: dict = defaultdict(lambda: [0, 0, 0, 0])
    for scan in scans:
        counts: dict = defaultdict(lambda: [0, 0, 0, 0])
        for truly, rules in scan.decisions():
            for rule, beyond in rules.items():
                c = counts[rule]
                c[0 if truly else 2] += beyond if truly else not beyond
                c[1 if truly else 3] += 1
        for rule, c in counts.items():
            print(f"   world {scan.seed:3d} {scan.split:5s}  {rule:36s} found {c[0]}/{c[1]}  rejected {c[2]}/{c[3]}")
            totals[rule] = [a + b for a, b in zip(totals[rule], c)]
    print("   pooled:")
    for rule, c in totals.items():
        print(f"     {rule:36s} found {_share(c[0], c[1])}  rejected {_share(c[2], c[3])}")

    print("\n3. entities: held-out AUC of the CLIP centroid cosine; images closer to the entity than 95 % of its class")
    drawn_total: dict = defaultdict(lambda: [0, 0])
    misses_total: Counter = Counter()
    seen = set()
    for scan in scans:
        if (scan.seed, scan.split) in seen:
            continue
        seen.add((scan.seed, scan.split))
        aucs, drawn, misses = scan.entities()
        misses_total.update(misses)
        if scan.split == "eval":  # the training side is the world's: print it once
            print(f"   world {scan.seed:3d}  AUC " + ", ".join(f"{n} {a:.2f}" for n, a in aucs.items()))
        for key, (k, n) in sorted(drawn.items()):
            print(f"   world {scan.seed:3d} {scan.split:5s}  {key[0]:3s} prompts, {key[1]:24s} {k}/{n}")
            drawn_total[key] = [drawn_total[key][0] + k, drawn_total[key][1] + n]
    print("   pooled:")
    for key, (k, n) in sorted(drawn_total.items()):
        print(f"     {key[0]:3s} prompts, {key[1]:24s} {_share(k, n)}")
    print("   images of a drawn ME entity not labelled ME, by why (pooled):")
    for why, n in misses_total.most_common():
        print(f"     {n:4d}  {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
