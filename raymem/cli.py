"""The `raymem` command: a thin layer that parses arguments, loads the config and calls one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raymem.errors import ConfigError, RaymemError
from raymem.planted.options import add_planted_options, planted_config_from_args

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"
TINY_DEMO_CONFIG = "configs/tiny.yaml"


def _print_result(result, root: str | None = None, next_steps: bool = True) -> None:
    c = result.counts
    nulls = f" and {c['null_units']} null-prompt images" if c.get("null_units") else ""
    print(
        f"scan {result.scan_id}: {c['units']} images ({c['units_ok']} scored, {c['units_failed']} failed){nulls}; "
        f"{c.get('units_generated', 0)} generated now, {c.get('units_reused', 0)} reused from earlier scans"
    )
    labels = ", ".join(f"{k} {c.get(f'label_{k}', 0)}" for k in ("MU", "MI", "ME", "none"))
    print(f"labels: {labels}")
    if mc := c.get("implied_controls"):  # the MI rule's false positives, measured on this scan
        from raymem.reduce import describe_controls

        print(f"MI controls: {describe_controls(mc)}")
    if result.timings:
        total = sum(v for v in result.timings.values() if isinstance(v, (int, float)))
        stages = " · ".join(f"{k} {v:.1f} s" for k, v in result.timings.items() if v >= 0.05)
        print(f"time: {total:.1f} s ({stages})")
    print(f"manifest: {result.manifest_uri}")
    for name, uri in result.tables.items():
        print(f"  {name:15s} {uri}")
    print()
    import pyarrow as pa

    from raymem.results import format_table

    sys.stdout.write(
        format_table(
            pa.Table.from_pylist(result.entity_tallies).select(
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
                ]
            ),
            "table",
        )
    )
    if root and next_steps:
        _print_next(root)


def _print_next(root: str) -> None:
    print(
        f"\nnext: raymem report latest --output {root}   (an HTML page of the findings)\n"
        f"      raymem query \"SELECT * FROM labels WHERE label = 'MU'\" --output {root}"
    )


def cmd_scan(args) -> int:
    from raymem.config import load_config
    from raymem.pipeline import run_scan

    cfg = load_config(args.config)
    result = run_scan(cfg, rerun_failed=args.rerun_failed)
    _print_result(result, cfg.output.uri)
    return 0


def cmd_demo(args) -> int:
    from raymem import runtime
    from raymem.config import load_config
    from raymem.demo import build_demo, prepare_planted_demo, truth_table
    from raymem.outputs import read_scan_table
    from raymem.pipeline import run_scan
    from raymem.results import format_table

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config or (TINY_DEMO_CONFIG if args.tiny else DEFAULT_DEMO_CONFIG))
    with runtime.ray_session(cfg.ray):  # one Ray for building (raymem index) and scanning
        if args.tiny:
            build_demo(cfg, force=args.rebuild)
        else:
            world = prepare_planted_demo(cfg)
        result = run_scan(cfg)
    _print_result(result, cfg.output.uri, next_steps=args.tiny)
    if not args.tiny:
        import pyarrow as pa

        labels = read_scan_table(cfg.output.uri, result.scan_id, "labels").to_pylist()
        rows, lines = truth_table(labels, world)
        seeds = cfg.generation.seeds_per_prompt
        print(f"\nWhat was planted in the training set, and what the scan found (per prompt, {seeds} seeds each):")
        sys.stdout.write(format_table(pa.Table.from_pylist(rows), "table"))
        print("\n".join(lines))
        print(
            "ME is the hard case: the tiny model renders some entities too weakly to tell from their class "
            "noun (docs/planted.md has the benchmark's numbers with intervals)."
        )
        if mc := result.counts.get("implied_controls"):
            passed = mc.get("passed", mc["beyond_null"])
            print(
                f"MI is found where planted, but its test also passes {passed} of {mc['probes']} elements "
                "these entities are never drawn with (MI controls, above): the tiny CLIP's element probes are not "
                "specific (docs/planted.md, negative probes)."
            )
        _print_next(cfg.output.uri)
    return 0


def cmd_validate(args) -> int:
    from raymem.config import load_config
    from raymem.pipeline import scan_id_for

    cfg = load_config(args.config)
    print(f"{args.config}: ok (scan id {scan_id_for(cfg)})")
    return 0


def cmd_calibrate(args) -> int:
    from raymem.calibrate import calibrate, report, thresholds_yaml, unproven
    from raymem.config import load_config

    cfg = load_config(args.config)
    from raymem.pipeline import scan_id_for

    scan_id = args.scan_id or scan_id_for(cfg)
    result = calibrate(cfg.output.uri, scan_id, args.pilot, cfg.thresholds, args.target_precision, args.min_prompts)
    print(f"scan {result.scan_id}: {result.pilot_size} pilot images, target precision {result.target_precision}")
    print(report(result.before, result.after))
    nn = result.noise_norm
    if nn is not None:
        auc = "n/a" if nn.auc is None else f"{nn.auc:.3f}"
        at = "n/a" if nn.threshold is None else f"{nn.threshold:.4g}"
        print(
            f"noise norm: AUC {auc} for {nn.memorized_prompts} memorized vs {nn.other_prompts} other pilot "
            f"prompts; threshold at {nn.false_positive_rate:.0%} false positives: {at}"
            + ("" if nn.auc is not None and nn.auc > 0.5 else " (not used: not better than chance)")
        )
    for category, why in result.not_fitted.items():
        print(f"warning: {category} not fitted ({why}, --min-prompts): its thresholds stay; label more prompts")
    for category, ok in result.met.items():
        if not ok:
            print(f"warning: target precision not reached for {category}; kept the most precise value")
    for category, why in unproven(result.after, result.target_precision).items():
        print(
            f"warning: {category} reaches the target on this pilot, but the pilot is too small to show it "
            f"({why}); label more prompts"
        )
    text = thresholds_yaml(result.fitted)
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
        dup = f", near-duplicates passed over for {bg['near_duplicated']:.0%}" if bg.get("near_duplicate_link") else ""
        print(f"  background {space}: train-train nearest-distinct p95 {bg['p95']:.3f} (n={bg['n']}{dup})")
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
    from raymem.index import load_entities
    from raymem.laion import convert

    with runtime.ray_session():
        result = convert(args.root, args.output, load_entities(args.entities) or None, storage=args.storage)
    print(
        f"converted {result['rows']} rows ({result['dim']}-d, {args.storage}) into {result['files']} files "
        f"under {args.output}"
    )
    return 0


def _submission(args) -> str:
    """The job id from the argument, or the one `raymem submit` gives the config (today)."""
    if args.job_id:
        return args.job_id
    if not args.config:
        raise ConfigError("pass a job id or --config")
    from raymem.config import load_config
    from raymem.submit import submission_id

    return submission_id(load_config(args.config))


def cmd_submit(args) -> int:
    from raymem.config import load_config
    from raymem.submit import TERMINAL, submit, wait_and_tail

    cfg = load_config(args.config)
    sid, new, found = submit(
        args.config,
        cfg,
        address=args.address,
        working_dir=args.working_dir,
        env=args.env,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        retry=args.retry,
    )
    if new:
        retried = sid.rsplit("-", 1)[-1].startswith("r")
        print(f"{sid}: submitted" + (" (a new attempt of this scan and day)" if retried else ""))
    else:
        hint = "; submit with --retry for a new attempt" if found in ("FAILED", "STOPPED") else ""
        print(f"{sid}: already submitted (same config and date), {found}; not run twice{hint}")
    if args.wait:
        state = wait_and_tail(args.address, sid, timeout=args.timeout) if found not in TERMINAL else found
        print(f"{sid}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    return 0


def cmd_list(args) -> int:
    from raymem.submit import list_jobs

    rows = list_jobs(args.address)
    if not rows:
        print("no raymem jobs on this Ray cluster")
        return 0
    import pyarrow as pa

    from raymem.results import format_table

    print(format_table(pa.Table.from_pylist(rows), "table"), end="")
    return 0


def cmd_status(args) -> int:
    from raymem.submit import status

    sid = _submission(args)
    state = status(args.address, sid)
    print(f"{sid}: {state}")
    return 0


def cmd_logs(args) -> int:
    from raymem.submit import logs

    logs(args.address, _submission(args), follow=args.follow)
    return 0


def cmd_stop(args) -> int:
    from raymem.submit import stop

    sid = _submission(args)
    stopped = stop(args.address, sid)
    print(f"{sid}: {'stop requested' if stopped else 'not running'}")
    return 0


def _output_root(args) -> str:
    if args.output:
        return args.output
    if getattr(args, "config", None):
        from raymem.config import load_config

        return load_config(args.config).output.uri
    if os.environ.get("RAYMEM_OUTPUT"):
        return os.environ["RAYMEM_OUTPUT"]
    raise ConfigError("pass --output URI (or --config, or set RAYMEM_OUTPUT)")


def cmd_query(args) -> int:
    from raymem.results import run_query

    sys.stdout.write(run_query(_output_root(args), args.sql, args.format, args.max_width))
    return 0


def cmd_diff(args) -> int:
    import json

    from raymem.results import diff_scans, format_diff

    root = _output_root(args)
    result = diff_scans(root, args.before, args.after_output or root, args.after, rate_change=args.rate_change)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n" if args.json else format_diff(result))
    if args.fail_on_new_mu and (result["new_mu_prompts"] or result["new_mu_entities"]):
        print(f"raymem: new MU findings in {args.after}", file=sys.stderr)
        return 3
    return 0


def cmd_report(args) -> int:
    from raymem.outputs import resolve_scan
    from raymem.report import write_report

    root = _output_root(args)
    scan_id = resolve_scan(root, args.scan_id)
    out = args.out or f"reports/{scan_id}"
    path = write_report(root, scan_id, out, top=args.top)
    print(f"report: {path}")
    return 0


def cmd_bench_planted(args) -> int:
    from raymem.planted.benchmark import run_benchmark, targets_report

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = planted_config_from_args(args)
    result = run_benchmark(cfg)
    how = "thresholds calibrated on the calibration split" if cfg.calibrate else "config-default thresholds"
    print(f"planted-memorization benchmark ({how})")
    print("\n".join(targets_report(result)))
    print(f"results: {result['results_dir']}/{{metrics,confusion,images}}.parquet")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from raymem import __version__

    parser = argparse.ArgumentParser(prog="raymem", description=__doc__)
    parser.add_argument("--version", action="version", version=f"raymem {__version__}")
    # -v / -q are accepted before or after the subcommand: each subparser repeats them without a
    # default (SUPPRESS), so a flag given before the subcommand is not reset by the subparser.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-v", "--verbose", action="store_true", default=default, help="log at INFO level")
        target.add_argument("-q", "--quiet", action="store_true", default=default, help="only errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("scan", help="run a memorization scan described by a YAML config")
    p.add_argument("config", help="scan config YAML (see configs/sd15.yaml and docs/config.md)")
    p.add_argument("--rerun-failed", action="store_true", help="recompute units that failed in earlier runs")
    p.set_defaults(fn=cmd_scan)

    p = command(
        "demo",
        help="scan the planted world with its trained models (offline; assets built once under build/demo)",
    )
    p.add_argument(
        "--config", help=f"demo scan config (default: {DEFAULT_DEMO_CONFIG}; {TINY_DEMO_CONFIG} with --tiny)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny random-weight world instead: a one-minute check of every loading path",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the tiny world's assets even if present")
    p.set_defaults(fn=cmd_demo)

    p = command("index", help="embed a training set (folder, table or WebDataset) into raymem's Parquet")
    p.add_argument("config", help="index config YAML (see configs/index-example.yaml)")
    p.add_argument("--faiss", action="store_true", help="also build per-shard FAISS IVF indexes and measure recall")
    p.set_defaults(fn=cmd_index)

    p = command(
        "import-embeddings", help="convert a clip-retrieval / LAION layout (img_emb/*.npy + metadata/*.parquet)"
    )
    p.add_argument("root", help="directory holding img_emb/ and metadata/ (local or s3://)")
    p.add_argument("output", help="directory for raymem training-embeddings Parquet")
    p.add_argument("--entities", help="file with one entity name per line, to tag captions")
    p.add_argument(
        "--storage",
        choices=["list", "packed", "packed-float16"],  # raymem.schema.EMBEDDING_STORAGES (imported lazily)
        default="list",
        help="embedding column: list (default; every reader decodes it), packed (float32 bytes, joined "
        "without a decode pass), packed-float16 (LAION's own precision, half the bytes); docs/join.md",
    )
    p.set_defaults(fn=cmd_import_embeddings)

    p = command("calibrate", help="fit the labeler's thresholds on a human-labelled pilot set")
    p.add_argument("config", help="the config of the scan the pilot images come from")
    p.add_argument("--pilot", required=True, help="Parquet/CSV/JSONL with unit_id (or image_uri) and label")
    p.add_argument("--target-precision", type=float, default=0.9)
    p.add_argument(
        "--min-prompts",
        type=int,
        help="fit a category only from pilot images of at least this many prompts (default: 3, "
        "raymem.calibrate.MIN_FIT_PROMPTS)",
    )
    p.add_argument("--scan-id", help="default: the config's scan id (today's date unless output.scan_date)")
    p.add_argument("--write", help="write the fitted `thresholds:` block to this YAML file")
    p.set_defaults(fn=cmd_calibrate)

    p = command("submit", help="submit a scan as a Ray job (deterministic id: one run per config and day)")
    p.add_argument("config", help="scan config YAML to submit")
    p.add_argument("--address", help="Ray job server, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--working-dir", help="directory uploaded as the job's working_dir (default: this project)")
    p.add_argument("--env", action="append", default=[], metavar="NAME", help="forward this environment variable")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    p.add_argument(
        "--wait", action="store_true", help="stream the job's logs until it ends; exit non-zero unless it succeeds"
    )
    p.add_argument(
        "--retry",
        action="store_true",
        help="when today's attempt of this scan FAILED or was STOPPED, submit a new one (it resumes from the "
        "unit store); a running or succeeded attempt is still never run twice",
    )
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to --wait")
    p.set_defaults(fn=cmd_submit)

    p = command("list", help="raymem's scan jobs on the Ray cluster, oldest first")
    p.add_argument("--address", help="Ray job server (default: RAY_ADDRESS)")
    p.set_defaults(fn=cmd_list)

    for name, fn, helptext in (
        ("status", cmd_status, "status of a submitted scan job"),
        ("logs", cmd_logs, "logs of a submitted scan job"),
        ("stop", cmd_stop, "stop a submitted scan job"),
    ):
        p = command(name, help=helptext)
        p.add_argument("job_id", nargs="?", help="submission id (default: the one of --config today)")
        p.add_argument("--config", help="derive the submission id from this config")
        p.add_argument("--address", help="Ray job server (default: RAY_ADDRESS)")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(fn=fn)

    p = command("query", help="run SQL (DuckDB) over a scan output root; tables are views by name")
    p.add_argument("sql", help="DuckDB SQL; the scan tables and `manifests` are views by name")
    p.add_argument("--output", help="output root (local or s3://)")
    p.add_argument("--config", help="take the output root from this scan config")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json", "jsonl"],
        default="table",
        help="json: one array; jsonl: a row a line",
    )
    p.add_argument("--max-width", type=int, help="cut table cells to this many characters (default: full cells)")
    p.set_defaults(fn=cmd_query)

    p = command("diff", help="what changed between two scans (new MU prompts and entities, rate changes)")
    p.add_argument("before", help="scan id (the earlier scan)")
    p.add_argument("after", help="scan id (the later scan), or `latest`")
    p.add_argument("--output", help="output root of both scans (or of BEFORE with --after-output)")
    p.add_argument("--after-output", help="output root of AFTER when it differs")
    p.add_argument("--config", help="take the output root from this scan config")
    p.add_argument("--rate-change", type=float, default=0.1, help="report rate changes at least this large")
    p.add_argument("--json", action="store_true")
    p.add_argument("--fail-on-new-mu", action="store_true", help="exit 3 when AFTER has new MU prompts or entities")
    p.set_defaults(fn=cmd_diff)

    p = command("report", help="write a static HTML report of one scan")
    p.add_argument("scan_id", help="the scan's id, or `latest` (the newest complete scan)")
    p.add_argument("--output", help="output root of the scan (local or s3://)")
    p.add_argument("--config", help="take the output root from this scan config")
    p.add_argument("--out", help="report directory (default: reports/<scan_id>)")
    p.add_argument(
        "--top", type=int, default=12, help="examples shown per category (MU, MI, ME), with all their neighbours"
    )
    p.set_defaults(fn=cmd_report)

    p = command("bench", help="benchmarks; `raymem bench planted`: the labeler on a world of known truth")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser(
        "planted", parents=[common], help="planted-memorization benchmark: precision/recall per category"
    )
    add_planted_options(p)
    p.set_defaults(fn=cmd_bench_planted)

    p = command("validate", help="check a config, its prompt set and training table without running")
    p.add_argument("config", help="scan config YAML to check")
    p.set_defaults(fn=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # one progress line per stage (raymem.runtime.Progress) unless -q
    logging.getLogger("raymem.progress").setLevel(logging.ERROR if args.quiet else logging.INFO)
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
