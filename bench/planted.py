"""The full planted-memorization benchmark (what `raymem bench planted` runs), with a JSON record.

    python bench/planted.py                 # config-default thresholds
    python bench/planted.py --calibrate     # thresholds fitted on the world's calibration split
    python bench/planted.py --world-seed 11 # a fresh world nobody has looked at (trains its models)

The development world's trained models are committed (assets/planted-models) and used when the world
and training configs are the defaults; `--retrain` trains them again on the CPU (about 20 minutes on 2
cores; cached under --work afterwards); `--models DIR` uses other trained models.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.errors import RaymemError  # noqa: E402
from raymem.planted.benchmark import run_benchmark, targets_report  # noqa: E402
from raymem.planted.options import add_planted_options, planted_config_from_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_planted_options(parser)  # the same options as `raymem bench planted`
    parser.add_argument("--json", help="write the summary here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = planted_config_from_args(args)
    except RaymemError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    result = run_benchmark(cfg)
    print("\n".join(targets_report(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result["summary"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
