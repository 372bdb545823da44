"""Ray job entrypoint for a scan: `python jobs/scan.py CONFIG [--rerun-failed]`.

Inside a Ray job, RAY_ADDRESS is set, so the scan attaches to the job's cluster instead of starting
a local Ray. The exit status is the scan's: non-zero when it fails, so Ray and KubeRay mark the job
FAILED.
"""

import sys

from raymem.cli import main

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]]))
