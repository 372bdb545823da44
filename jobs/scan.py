"""Ray job entrypoint for a scan: `python jobs/scan.py CONFIG [--rerun-failed]`.

`raymem submit` runs this with the project directory as the job's working_dir. Inside a Ray job,
RAY_ADDRESS is set, so the scan attaches to the job's cluster instead of starting a local Ray. The
exit status is the scan's: non-zero when it fails, so Ray and KubeRay mark the job FAILED.
"""

import sys
from pathlib import Path

try:
    import raymem  # noqa: F401 - installed in the cluster image
except ImportError:  # a working_dir upload: the package sits beside jobs/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "scan", *sys.argv[1:]]))
