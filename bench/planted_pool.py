"""Pool `raymem bench planted` runs over world seeds: one precision/recall per category with 95 %
intervals that resample whole prompts of whole worlds (issue 12's "over >= 3 world seeds").

    python bench/planted_pool.py build/planted/results/world7-default build/planted/results/world11-default ...

Each directory is one run's results (`raymem bench planted` prints it); each world may appear once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.planted.benchmark import pool_results, targets_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results directories of single runs")
    parser.add_argument("--json", help="write the pooled metrics here too")
    args = parser.parse_args()
    try:
        result = pool_results(args.results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pooled over world seeds {result['world_seeds']} ({len(result['images'])} evaluation images)")
    print("\n".join(targets_report(result)))
    if args.json:
        summary = {
            k: result[k]
            for k in ("world_seeds", "runs", "metrics", "confusion", "controls", "probe_negatives", "kinds")
        }
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
