"""Ray job submission: `raymem submit | status | logs | stop`, on the Ray Jobs SDK.

A scan is submitted as the entrypoint `python jobs/scan.py <config>` with the project directory as the
job's working_dir, and a deterministic submission id `raymem-<config hash>-<YYYYMMDD>`: re-submitting
the same config on the same day finds the existing job instead of running the scan twice, which makes
a nightly cron safe to re-run. `--retry` submits a new attempt (`...-r1`, `-r2`, ...) when the latest
one FAILED or was STOPPED -- the scan's unit store makes it resume where the failed one stopped -- and
otherwise still finds the running or succeeded one. Environment variables are forwarded only when
named (`--env`), so credentials never end up in a job's runtime_env unless asked for.
"""

from __future__ import annotations

import datetime as dt
import os
import re
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


def attempts(jobs, base: str) -> list:
    """The jobs of one scan and day (`base`, then `base-r1`, `base-r2`, ...), oldest attempt first."""
    pattern = re.compile(rf"{re.escape(base)}(?:-r(\d+))?")
    numbered = [(m, j) for j in jobs.list_jobs() if (m := pattern.fullmatch(j.submission_id or ""))]
    return [j for m, j in sorted(numbered, key=lambda mj: int(mj[0].group(1) or 0))]


def submit(
    config_path: str,
    cfg: ScanConfig,
    *,
    address: str | None = None,
    working_dir: str | None = None,
    env: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
    retry: bool = False,
) -> tuple[str, bool, str | None]:
    """Submit the scan; returns (submission id, submitted now, state of the job found instead). The
    latest attempt of the scan and day is reused, unless `retry` and it FAILED or was STOPPED."""
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
    base = submission_id(cfg)
    jobs = client(address)
    try:
        earlier = attempts(jobs, base)
    except Exception as err:  # noqa: BLE001
        raise SubmitError(f"listing the jobs of {base} failed: {str(err).strip().splitlines()[0]}") from None
    sid = base
    if earlier:
        latest = earlier[-1]
        state = str(latest.status.value)
        if not (retry and state in ("FAILED", "STOPPED")):
            return latest.submission_id, False, state
        sid = f"{base}-r{len(earlier)}"
    try:
        jobs.submit_job(
            entrypoint=f"python jobs/scan.py {relative}",
            submission_id=sid,
            runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars},
            metadata={"raymem_scan": cfg.name, "config_hash": cfg.config_hash()},
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    except Exception as err:  # noqa: BLE001
        if "already exists" in str(err):  # submitted by someone else in the meantime
            return sid, False, status(address, sid)
        first = str(err).strip().splitlines()[0]
        raise SubmitError(f"submitting {sid} failed: {first}") from None
    return sid, True, None


def list_jobs(address: str | None) -> list[dict]:
    """raymem's jobs on the cluster (those it submitted: metadata `raymem_scan`), oldest first."""
    jobs = client(address)
    try:
        found = jobs.list_jobs()
    except Exception as err:  # noqa: BLE001
        raise SubmitError(f"listing jobs failed: {str(err).strip().splitlines()[0]}") from None
    rows = []
    for j in found:
        meta = j.metadata or {}
        if "raymem_scan" not in meta:
            continue
        rows.append(
            {
                "submission_id": j.submission_id,
                "status": str(j.status.value),
                "scan": meta["raymem_scan"],
                "started": _when(j.start_time),
                "ended": _when(j.end_time),
                "message": (j.message or "").splitlines()[0][:120] if j.status.value != "SUCCEEDED" else "",
            }
        )
    return sorted(rows, key=lambda r: (r["started"] or "", r["submission_id"]))


def _when(ms: int | None) -> str | None:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else None


def wait_and_tail(address: str | None, sid: str, timeout: float, out=None) -> str:
    """Stream the job's logs until it ends (like `ray job submit`), then return its final state."""
    import asyncio
    import sys

    out = out or sys.stdout
    jobs = client(address)

    async def tail():
        async for chunk in jobs.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout))
    except TimeoutError:
        pass
    except Exception as err:  # noqa: BLE001 - the log stream broke: fall back to polling the state
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        out.write(f"(log stream ended: {why})\n")
    return wait(address, sid, timeout=max(1.0, timeout), poll=1.0)


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
