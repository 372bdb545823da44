"""The `raymem` command: a thin layer that parses arguments, loads the config and calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raymem.errors import RaymemError

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"


def _format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _print_result(result) -> None:
    c = result.counts
    print(
        f"scan {result.scan_id}: {c['units']} units ({c['units_ok']} scored, {c['units_failed']} failed), "
        f"{c.get('units_generated', 0)} generated now, {c.get('units_reused', 0)} reused"
    )
    print(f"manifest: {result.manifest_uri}")
    for name, uri in result.tables.items():
        print(f"  {name:15s} {uri}")
    print()
    print(
        _format_table(
            result.entity_tallies,
            [
                "entity",
                "n_units",
                "n_MU",
                "n_MI",
                "n_ME",
                "n_none",
                "n_failed",
                "rate_MU",
                "n_memorized_prompts",
                "train_frequency",
            ],
        )
    )


def cmd_scan(args) -> int:
    from raymem.config import load_config
    from raymem.scan import run_scan

    cfg = load_config(args.config)
    result = run_scan(cfg, rerun_failed=args.rerun_failed)
    _print_result(result)
    return 0


def cmd_demo(args) -> int:
    from raymem import runtime
    from raymem.config import load_config
    from raymem.demo import build_demo
    from raymem.scan import run_scan

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config)
    started = runtime.connect(cfg)  # one Ray for building (raymem index) and scanning
    try:
        build_demo(cfg, force=args.rebuild)
        result = run_scan(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    _print_result(result)
    return 0


def cmd_validate(args) -> int:
    from raymem.config import load_config
    from raymem.scan import check_inputs

    cfg = load_config(args.config)
    check_inputs(cfg)
    print(f"{args.config}: ok (scan id {cfg.scan_id})")
    return 0


def cmd_calibrate(args) -> int:
    from raymem.calibrate import fit, load_evidence, precision_recall, read_pilot, report, thresholds_yaml
    from raymem.config import load_config

    cfg = load_config(args.config)
    scan_id = args.scan_id or cfg.scan_id
    evidence = load_evidence(cfg.output.uri, scan_id)
    pilot = read_pilot(args.pilot, evidence)
    before = precision_recall(evidence.label(cfg.thresholds), pilot)
    fitted, met = fit(evidence, pilot, cfg.thresholds, args.target_precision)
    after = precision_recall(evidence.label(fitted), pilot)
    print(f"scan {scan_id}: {len(pilot)} pilot images, target precision {args.target_precision}")
    print(report(before, after))
    for category, ok in met.items():
        if not ok:
            print(f"warning: target precision not reached for {category}; kept the most precise value")
    text = thresholds_yaml(fitted)
    print("\nfitted thresholds:\n" + text)
    if args.write:
        from pathlib import Path

        Path(args.write).write_text(text)
        print(f"written to {args.write}")
    return 0


def cmd_index(args) -> int:
    from raymem.config import load_index_config
    from raymem.index import run_index

    cfg = load_index_config(args.config)
    if args.faiss:
        cfg = cfg.model_copy(update={"faiss": cfg.faiss.model_copy(update={"enabled": True})})
    manifest = run_index(cfg)
    print(
        f"index {cfg.output}: {manifest['rows']} rows in {manifest['shards']} shards "
        f"({manifest['shards_embedded_now']} embedded now), {manifest['errors']} unreadable images "
        f"(see {cfg.output}/_errors/)"
    )
    for space, bg in (manifest.get("background") or {}).items():
        print(f"  background {space}: train-train nearest-neighbour p95 {bg['p95']:.3f} (n={bg['n']})")
    recall = (manifest.get("faiss") or {}).get("recall") or {}
    for key, value in recall.items():
        if key.startswith("recall_"):
            print(
                f"  faiss {key[7:]}: recall@{recall['k']} {value:.3f} at nprobe {recall['nprobe']} "
                f"({recall['exact_seconds']:.2f}s exact vs {recall['faiss_seconds']:.2f}s faiss)"
            )
    return 0


def cmd_import_embeddings(args) -> int:
    from raymem import runtime
    from raymem.config import RayConfig
    from raymem.index import load_entities
    from raymem.laion import convert

    started = runtime.connect_ray(RayConfig())
    try:
        result = convert(args.root, args.output, load_entities(args.entities) or None)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"converted {result['rows']} rows ({result['dim']}-d) into {result['files']} files under {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymem", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="run a memorization scan described by a YAML config")
    p.add_argument("config")
    p.add_argument("--rerun-failed", action="store_true", help="recompute units that failed in earlier runs")
    p.set_defaults(fn=cmd_scan)

    p = sub.add_parser("demo", help="build the offline demo assets and run the demo scan")
    p.add_argument("--config", default=DEFAULT_DEMO_CONFIG)
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo assets even if present")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("index", help="embed a training set (folder, table or WebDataset) into raymem's Parquet")
    p.add_argument("config", help="index config YAML (see configs/index-demo.yaml)")
    p.add_argument("--faiss", action="store_true", help="also build per-shard FAISS IVF indexes and measure recall")
    p.set_defaults(fn=cmd_index)

    p = sub.add_parser(
        "import-embeddings", help="convert a clip-retrieval / LAION layout (img_emb/*.npy + metadata/*.parquet)"
    )
    p.add_argument("root", help="directory holding img_emb/ and metadata/ (local or s3://)")
    p.add_argument("output", help="directory for raymem training-embeddings Parquet")
    p.add_argument("--entities", help="file with one entity name per line, to tag captions")
    p.set_defaults(fn=cmd_import_embeddings)

    p = sub.add_parser("calibrate", help="fit the labeler's thresholds on a human-labelled pilot set")
    p.add_argument("config", help="the config of the scan the pilot images come from")
    p.add_argument("--pilot", required=True, help="Parquet/CSV/JSONL with unit_id (or image_uri) and label")
    p.add_argument("--target-precision", type=float, default=0.9)
    p.add_argument("--scan-id", help="default: the config's scan id (today's date unless output.scan_date)")
    p.add_argument("--write", help="write the fitted `thresholds:` block to this YAML file")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("validate", help="check a config, its prompt set and training table without running")
    p.add_argument("config")
    p.set_defaults(fn=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except RaymemError as err:
        print(f"raymem: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("raymem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
