"""Everything that differs between a laptop and a cluster: connecting to Ray and sizing the stages.

Stages never call `ray.init` or look at the cluster themselves; they get their resources from here.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from raymem.config import RayConfig, ScanConfig

log = logging.getLogger(__name__)


def connect(cfg: ScanConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    return connect_ray(cfg.ray)


def connect_ray(ray_cfg: RayConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"address": address, "logging_level": logging.WARNING, "log_to_driver": True}
    if ray_cfg.runtime_env:
        kwargs["runtime_env"] = ray_cfg.runtime_env
    if address == "local":
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return True


def data_context():
    """The driver's Ray Data context, set so a bad-input error raised in a stage reaches us as itself."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
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


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def plan_generation(cfg: ScanConfig) -> StagePlan:
    """One actor per GPU (num_gpus=1) when the cluster has GPUs, otherwise CPU actors.

    On a CPU-only cluster a GPU request would hang until Ray's no-progress timeout, so the stage is
    sized from what the cluster reports, not from the config alone. At least one CPU is left free so
    the read tasks feeding the actors can run.
    """
    r = cfg.resources
    gpus = cluster_gpus()
    cpus = cluster_cpus()
    if gpus >= r.gpus_per_actor:
        most = int(gpus // r.gpus_per_actor)
        actors = min(r.generation_actors or most, most)
        return StagePlan(
            actors=actors, num_gpus=r.gpus_per_actor, num_cpus=min(r.cpus_per_actor, max(cpus - 1, 0.5) / actors)
        )
    room = max(1, int((cpus - 1) // r.cpus_per_actor)) if cpus > 1 else 1
    actors = min(r.generation_actors or 1, room)
    num_cpus = r.cpus_per_actor if cpus - 1 >= r.cpus_per_actor * actors else max(0.5, (cpus - 1) / actors)
    return StagePlan(actors=actors, num_gpus=0.0, num_cpus=num_cpus)


# Parquet reads feeding the join take a quarter CPU each (their I/O and decoding are light next to the
# scoring); Ray Data's own file-listing task still needs a whole CPU, so the actors leave one free.
READ_CPUS = 0.25


@dataclass(frozen=True)
class JoinPlan(StagePlan):
    threads: int = 1  # BLAS threads per scoring actor


def plan_join(cfg: ScanConfig) -> JoinPlan:
    return plan_join_actors(cfg.resources.join_actors)


def plan_join_actors(actors: int) -> JoinPlan:
    """GPU actors when the cluster has GPUs; otherwise CPU actors whose BLAS threads cover the CPUs.

    Logical CPUs: all but one, shared by the actors. Threads: the node's CPUs divided by the actors,
    so one actor on a small box uses every core (reads interleave with scoring on the spare one).
    """
    gpus = cluster_gpus()
    if gpus >= 1:
        return JoinPlan(actors=min(actors, int(gpus)), num_gpus=1.0, num_cpus=0.5, threads=1)
    cpus = cluster_cpus()
    actors = max(1, min(actors, int(cpus)))
    return JoinPlan(
        actors=actors, num_gpus=0.0, num_cpus=max(0.5, (cpus - 1) / actors), threads=max(1, int(cpus // actors))
    )


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
    """One line for an unexpected failure: Ray's wrappers put the real exception on the last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
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
