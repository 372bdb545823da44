"""Ray job submission: `raymem submit | status | logs | stop`, on the Ray Jobs SDK.

A scan is submitted as the entrypoint `python jobs/scan.py <config>` with the project directory as the
job's working_dir, and a deterministic submission id `raymem-<config hash>-<YYYYMMDD>`: re-submitting
the same config on the same day finds the existing job instead of running the scan twice, which makes
a nightly cron safe to retry. Environment variables are forwarded only when named (`--env`), so
credentials never end up in a job's runtime_env unless asked for.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from raymem.config import ScanConfig
from raymem.errors import ConfigError, RaymemError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never shipped in a working_dir: environments, build outputs, scan outputs, VCS data.
EXCLUDES = [".venv", "build", "outputs", ".git", ".whl", "**/__pycache__", "*.egg-info", ".pytest_cache"]


class SubmitError(RaymemError):
    exit_code = 1


def submission_id(cfg: ScanConfig, day: dt.date | None = None) -> str:
    day = day or cfg.output.scan_date or dt.datetime.now(dt.UTC).date()
    return f"raymem-{cfg.config_hash()[:12]}-{day:%Y%m%d}"


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as err:  # noqa: BLE001 - ConnectionError, auth errors, ...: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SubmitError(f"cannot reach the Ray job server at {url}: {first}") from None


def project_root() -> Path:
    """The directory holding jobs/scan.py (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[1]


def submit(
    config_path: str,
    cfg: ScanConfig,
    *,
    address: str | None = None,
    working_dir: str | None = None,
    env: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
) -> tuple[str, bool]:
    """Submit the scan; returns (submission id, submitted now). An existing job with the id is reused."""
    root = Path(working_dir or project_root()).resolve()
    if not (root / "jobs" / "scan.py").exists():
        raise ConfigError(f"{root}: not a raymem project directory (no jobs/scan.py); pass --working-dir")
    config = Path(config_path).resolve()
    try:
        relative = config.relative_to(root)
    except ValueError:
        raise ConfigError(f"{config_path}: the config must be inside the working dir {root}") from None
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0"}
    for name in env or []:
        if name not in os.environ:
            raise ConfigError(f"--env {name}: not set in this environment")
        env_vars[name] = os.environ[name]
    sid = submission_id(cfg)
    jobs = client(address)
    try:
        jobs.submit_job(
            entrypoint=f"python jobs/scan.py {relative}",
            submission_id=sid,
            runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars},
            metadata={"raymem_scan": cfg.name, "config_hash": cfg.config_hash()},
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    except Exception as err:  # noqa: BLE001
        if "already exists" in str(err):
            return sid, False
        first = str(err).strip().splitlines()[0]
        raise SubmitError(f"submitting {sid} failed: {first}") from None
    return sid, True


def status(address: str | None, sid: str) -> str:
    jobs = client(address)
    try:
        return str(jobs.get_job_status(sid).value)
    except Exception as err:  # noqa: BLE001
        raise SubmitError(_not_found(sid, err)) from None


def wait(address: str | None, sid: str, timeout: float = 3600, poll: float = 2.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = status(address, sid)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def logs(address: str | None, sid: str, follow: bool = False, out=None) -> None:
    import asyncio
    import sys

    out = out or sys.stdout
    jobs = client(address)
    try:
        if not follow:
            out.write(jobs.get_job_logs(sid))
            return

        async def tail():
            async for chunk in jobs.tail_job_logs(sid):
                out.write(chunk)
                out.flush()

        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001
        raise SubmitError(_not_found(sid, err)) from None


def stop(address: str | None, sid: str) -> bool:
    jobs = client(address)
    try:
        return bool(jobs.stop_job(sid))
    except Exception as err:  # noqa: BLE001
        raise SubmitError(_not_found(sid, err)) from None


def _not_found(sid: str, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "does not exist" in text or "not found" in text.lower():
        return f"no job '{sid}' on this Ray cluster"
    return f"job '{sid}': {text}"
