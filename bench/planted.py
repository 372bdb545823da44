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
from raymem.planted.benchmark import planted_config, run_benchmark, targets_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="build/planted")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--models")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--world-seed", type=int, help="a fresh world from this seed (default: the development world)")
    parser.add_argument("--json", help="write the summary here too")
    parser.add_argument(
        "--region-neighbours", type=int, default=0, help="region-level copy detection on (default 0: off)"
    )
    parser.add_argument(
        "--shared-clip", action="store_true", help="scan with the generator's CLIP, not the independent presence CLIP"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = planted_config(
            work=args.work,
            calibrate=args.calibrate,
            models=args.models,
            retrain=args.retrain,
            region_neighbours=args.region_neighbours,
            world_seed=args.world_seed,
            shared_clip=args.shared_clip,
        )
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
