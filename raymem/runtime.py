"""Everything that differs between a laptop and a cluster: connecting to Ray and sizing the stages.

Stages never call `ray.init` or look at the cluster themselves; they get their resources from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from raymem.config import RayConfig, ResourcesConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(ray_cfg: RayConfig | None = None):
    """Ray for the duration of the block: attach to the one that is running (a Ray job, a caller's) or
    start a local one, and shut down only what this block started."""
    started = connect_ray(ray_cfg or RayConfig())
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def connect_ray(ray_cfg: RayConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    check_reachable(address)
    kwargs = {"address": address, "logging_level": logging.WARNING, "log_to_driver": True}
    if ray_cfg.runtime_env:
        kwargs["runtime_env"] = ray_cfg.runtime_env
    if address == "local":
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return True


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A remote Ray address must answer within `timeout`: ray.init would otherwise retry for minutes."""
    import socket
    from urllib.parse import urlparse

    from raymem.errors import ClusterError

    if address in ("local", "auto") or address.startswith("anyscale://"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(f"cannot reach Ray at {address}: {reason} (within {timeout:g} s)") from None


def data_context():
    """The driver's Ray Data context, set so a bad-input error raised in a stage reaches us as itself,
    and Ray Data's per-dataset INFO lines kept out of the console unless raymem logs at INFO (`-v`):
    raymem's own progress lines say what runs; Ray Data's log file keeps everything."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    verbose = logging.getLogger("raymem").getEffectiveLevel() <= logging.INFO
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    return ctx


@dataclass(frozen=True)
class StagePlan:
    actors: int
    num_gpus: float
    num_cpus: float

    def remote_args(self) -> dict:
        args = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        return args


@dataclass(frozen=True)
class ClusterResources:
    """What the Ray cluster offers now; sizing functions take it as an argument (unit-testable)."""

    cpus: float
    gpus: float

    @classmethod
    def current(cls) -> ClusterResources:
        import ray

        total = ray.cluster_resources()
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)))


def plan_actors(
    wanted: int | None, gpus_per_actor: float, cpus_per_actor: float, cluster: ClusterResources
) -> StagePlan:
    """Model-holding actors (generation, indexing): one per `gpus_per_actor` GPUs when the cluster has
    GPUs, otherwise CPU actors.

    On a CPU-only cluster a GPU request would hang until Ray's no-progress timeout, so the stage is
    sized from what the cluster reports, not from the config alone. At least one CPU is left free so
    the read tasks feeding the actors can run.
    """
    cpus, gpus = cluster.cpus, cluster.gpus
    if gpus >= gpus_per_actor:
        most = int(gpus // gpus_per_actor)
        actors = min(wanted or most, most)
        return StagePlan(
            actors=actors, num_gpus=gpus_per_actor, num_cpus=min(cpus_per_actor, max(cpus - 1, 0.5) / actors)
        )
    room = max(1, int((cpus - 1) // cpus_per_actor)) if cpus > 1 else 1
    actors = min(wanted or 1, room)
    num_cpus = cpus_per_actor if cpus - 1 >= cpus_per_actor * actors else max(0.5, (cpus - 1) / actors)
    return StagePlan(actors=actors, num_gpus=0.0, num_cpus=num_cpus)


def plan_generation(resources: ResourcesConfig, cluster: ClusterResources) -> StagePlan:
    return plan_actors(resources.generation_actors, resources.gpus_per_actor, resources.cpus_per_actor, cluster)


@dataclass(frozen=True)
class JoinPlan(StagePlan):
    threads: int = 1  # BLAS threads per scoring actor


def plan_join(actors: int, cluster: ClusterResources) -> JoinPlan:
    """GPU actors when the cluster has GPUs; otherwise CPU actors whose BLAS threads cover the CPUs.

    Logical CPUs: all but one, shared by the actors (Ray Data's file-listing and read tasks need the
    spare one). Threads: the node's CPUs divided by the actors, so one actor on a small box uses every
    core (reads interleave with scoring on the spare one).
    """
    if cluster.gpus >= 1:
        return JoinPlan(actors=min(actors, int(cluster.gpus)), num_gpus=1.0, num_cpus=0.5, threads=1)
    cpus = cluster.cpus
    actors = max(1, min(actors, int(cpus)))
    return JoinPlan(
        actors=actors, num_gpus=0.0, num_cpus=max(0.5, (cpus - 1) / actors), threads=max(1, int(cpus // actors))
    )


def named(ds, name: str) -> Iterator:
    """Run a dataset under a name (in Ray's logs and dashboard) and yield its output as Arrow batches."""
    ds.set_name(name)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def map_stage(
    name: str,
    items: list[dict],
    fn,
    plan: StagePlan,
    *,
    constructor_kwargs: dict | None = None,
    batch_size: int = 1,
    blocks: int | None = None,
) -> Iterator:
    """The one way raymem runs a stage on Ray: `items` (small dicts naming the work) through a pool of
    `plan.actors` instances of the callable class `fn`, each built once with `constructor_kwargs` (models
    load there) and called with Arrow batches of `batch_size` items. Yields the output Arrow batches as
    they complete; the same code runs on a laptop's local Ray and on a cluster."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=blocks or max(1, len(items)))
    out = ds.map_batches(
        fn,
        fn_constructor_kwargs=constructor_kwargs or {},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(plan.actors, len(items) or 1))),
        **plan.remote_args(),
    )
    return named(out, name)


def user_error(err: BaseException) -> BaseException | None:
    """The raymem error (bad input, ...) a Ray task or actor raised, unwrapped from Ray's wrappers."""
    from raymem.errors import RaymemError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, RaymemError):
            return cause  # Ray's RayTaskError(InputError) subclasses the error but prints a traceback
        if isinstance(err, RaymemError) and not type(err).__name__.startswith("RayTaskError"):
            return err
        err = cause or err.__cause__ or err.__context__
    return None


def summarize_error(err: BaseException) -> str:
    """One line for an unexpected failure: the exception a Ray task raised (its `cause`), not Ray's
    wrapper with the remote traceback; otherwise the first and last lines of the message."""
    seen = set()
    while isinstance(getattr(err, "cause", None), BaseException) and id(err) not in seen:
        seen.add(id(err))
        err = err.cause
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err))  # Ray colours its tracebacks
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    if len(lines) > 1 and lines[-1] not in head:
        head = f"{head} ... {lines[-1]}"
    return head[:1000]


def reraise_user_errors(fn):
    """Decorator: a RaymemError raised inside Ray reaches the caller as itself (one line), not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        data_context()
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            inner = user_error(err)
            if inner is not None and inner is not err:
                raise inner from None
            raise

    return wrapper


class Progress:
    """One plain progress line per stage, throttled: `generate: 12/24 units (50 %), 0.9/s, ETA 13 s`.

    Plain log lines, not a bar: they read the same on a terminal and in a Ray Job's log (no TTY), and
    `-q` silences them (logger `raymem.progress`)."""

    def __init__(self, stage: str, total: int, unit: str = "units", every_s: float = 10.0):
        import time

        self.log = logging.getLogger("raymem.progress")
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = 0
        self.extra = ""
        self._clock = time.monotonic
        self.start = self._last = self._clock()
        self.log.info("%s: %d %s to do", stage, total, unit)

    def advance(self, n: int, extra: str = "") -> None:
        self.done += n
        self.extra = extra
        now = self._clock()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = f", ETA {((self.total - self.done) / rate):.0f} s" if rate > 0 and self.done < self.total else ""
        extra = f", {self.extra}" if self.extra else ""
        return f"{self.stage}: {self.done}/{self.total} {self.unit}{share}, {rate:.2f}/s{eta}{extra}"

    def finish(self) -> None:
        now = self._clock()
        self.log.info("%s in %.1f s", self.line(now), now - self.start)
