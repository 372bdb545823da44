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

from raymem.config import ActorRange, RayConfig, ResourcesConfig

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
        # Ray 2.60 turns token auth on for the local Ray it starts and says so at WARNING each time;
        # that is the safe default raymem wants, not news. (A warning that auth is *off* still shows.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_AUTH_ON_NOTICE)
    with loopback_only() if address == "local" else contextlib.nullcontext():
        ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return True


CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Start a local Ray that listens on 127.0.0.1 only, so nothing on the network can reach it.

    Ray 2.60 has no bind setting: its servers listen on all interfaces (or the node's address) unless
    the node's address is loopback, and `ray.init` turns a 127.0.0.1 node address into the machine's
    public one (`services.resolve_ip_for_localhost`) unless Ray believes it cannot form a cluster here,
    as on macOS and Windows (`ENABLE_RAY_CLUSTER`, read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at
    import). Lowering that flag while the node starts gives the GCS, raylet, workers, agents and
    metrics servers 127.0.0.1; the node keeps it after `init`.
    test_runtime checks every listening socket, so a Ray that moves the flag fails there, not silently.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray has no ENABLE_RAY_CLUSTER switch: the local Ray may listen on all interfaces")
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_TOKEN_AUTH_ON_NOTICE = _DropMessages("Token authentication is enabled for this Ray cluster")


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
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    # Off a terminal Ray Data draws no bars and warns once that it does not; raymem's own progress
    # lines stand in for them, so the warning is spent here.
    log_once("ray_data_progress_manager_disabled")
    verbose = logging.getLogger("raymem").getEffectiveLevel() <= logging.INFO
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    return ctx


@dataclass(frozen=True)
class StagePlan:
    """A stage's actor pool: `min_actors` start before work is handed out; up to `max_actors` run as the
    queue asks (Ray Data's autoscaling pool: actors beyond the free GPUs make the cluster's autoscaler
    add nodes)."""

    min_actors: int
    max_actors: int
    num_gpus: float
    num_cpus: float

    @classmethod
    def fixed(cls, actors: int, **kwargs):
        return cls(actors, actors, **kwargs)

    @property
    def actors(self) -> int:
        return self.max_actors

    def remote_args(self) -> dict:
        args = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        return args

    def compute(self, items: int, tasks: bool = False, calls_per_actor: int = 1):
        """Ray Data's pool for `items` work items: fixed when min == max, autoscaling otherwise; with
        `tasks`, at most `max_actors` tasks at a time instead. `calls_per_actor` > 1: each actor runs that
        many calls at once in threads (the class then guards its models itself)."""
        import ray

        low, high = min(self.min_actors, max(1, items)), min(self.max_actors, max(1, items))
        if tasks:
            return ray.data.TaskPoolStrategy(size=high)
        threads = (
            {"max_concurrent_calls_per_actor": calls_per_actor, "enable_true_multi_threading": True}
            if calls_per_actor > 1
            else {}
        )
        if low == high:
            return ray.data.ActorPoolStrategy(size=high, **threads)
        return ray.data.ActorPoolStrategy(min_size=low, max_size=high, **threads)

    def describe(self) -> dict:
        return {
            "actors": str(ActorRange(self.min_actors, self.max_actors)),
            "num_gpus": self.num_gpus,
            "num_cpus": round(self.num_cpus, 3),
        }


@dataclass(frozen=True)
class ClusterResources:
    """What the Ray cluster offers now; sizing functions take it as an argument (unit-testable).
    `local`: a Ray this process started, which no autoscaler can grow."""

    cpus: float
    gpus: float
    local: bool = False

    @classmethod
    def current(cls) -> ClusterResources:
        import ray

        total = ray.cluster_resources()
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)), local=started_here())


def started_here() -> bool:
    """This process started the Ray it is attached to (a local Ray: one node, no autoscaler)."""
    import ray

    node = ray._private.worker._global_node  # the head node when this process started Ray itself
    return bool(node is not None and node.head)


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # cuda | cpu
    reason: str  # why, in words: the log and the manifest say it


def choose_device(resources: ResourcesConfig, cluster: ClusterResources, wait_for_gpu=None) -> DeviceChoice:
    """Where the model-holding stages run. GPUs up now win; on a cluster joined by address with none up
    yet, the autoscaler is asked for one (`wait_for_gpu(gpus, cpus, seconds)` returns None when one
    joined, else why not). `auto` falls back to CPU when none comes; `cuda` fails in one line."""
    from raymem.errors import ClusterError

    want, need = resources.device, resources.gpus_per_actor
    if want == "cpu":
        return DeviceChoice("cpu", "resources.device is cpu")
    if cluster.gpus >= need:
        return DeviceChoice("cuda", f"{cluster.gpus:g} GPU(s) in the cluster")
    if cluster.local:
        why = f"this local Ray has {cluster.gpus:g} GPU(s), {need:g} needed per actor"
    elif resources.gpu_wait_s <= 0:
        why = f"the cluster has {cluster.gpus:g} GPU(s) up and resources.gpu_wait_s is 0"
    else:
        log.warning(
            "no GPU in the cluster yet: asking its autoscaler for one, waiting up to %g s "
            "(resources.device: cpu skips this)",
            resources.gpu_wait_s,
        )
        why = (wait_for_gpu or wait_for_gpus)(need, resources.cpus_per_actor, resources.gpu_wait_s)
        if why is None:
            return DeviceChoice("cuda", "a GPU node joined after asking the autoscaler")
    if want == "cuda":
        raise ClusterError(f"resources.device is cuda but {why}")
    # Expected on a laptop; worth a warning where a GPU was hoped for.
    (log.info if cluster.local else log.warning)("running on CPU: %s", why)
    return DeviceChoice("cpu", why)


# An autoscaler that can add a GPU node has started one by then (KubeRay's updates every 5-10 s).
AUTOSCALER_SETTLE_S = float(os.environ.get("RAYMEM_AUTOSCALER_SETTLE_S", "30"))


def wait_for_gpus(gpus: float, cpus: float, timeout_s: float, poll_s: float = 1.0) -> str | None:
    """Ask the autoscaler for one GPU actor's bundle and wait until the cluster has that many GPUs;
    None when it does, else why not.

    Gives up early when no autoscaler can help: a cluster without one (`ray start` with no autoscaling
    config), or one that launched no node within AUTOSCALER_SETTLE_S of the request (none of its node
    types has a GPU). The request is withdrawn afterwards: the actors' own demands keep the nodes up.
    """
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    started = time.monotonic()
    request_resources(bundles=[{"GPU": gpus, "CPU": cpus}])
    try:
        while (waited := time.monotonic() - started) < timeout_s:
            if ray.cluster_resources().get("GPU", 0.0) >= gpus:
                return None
            launching = autoscaler_launching()
            if launching is None:
                return "the cluster has no GPU and no autoscaler that can add nodes"
            if not launching and waited > AUTOSCALER_SETTLE_S:
                return f"the cluster's autoscaler launched no node for a GPU within {AUTOSCALER_SETTLE_S:g} s"
            time.sleep(poll_s)
        return f"no GPU node joined within {timeout_s:g} s of asking the cluster's autoscaler"
    finally:
        request_resources(bundles=[])


def autoscaler_launching() -> int | None:
    """Nodes the cluster's autoscaler is launching now; None when the cluster has no autoscaler that can
    add nodes. Read from the autoscaler's own status report (v1 monitor, as KubeRay runs it), else from
    autoscaler v2's cluster status."""
    import json

    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw:
        report = json.loads(raw).get("autoscaler_report") or {}
        types = (report.get("node_type_mapping") or {}).items()
        if types and all(kind == f"node_{node}" for node, kind in types):
            return None  # the read-only monitor every `ray start --head` runs: nothing to launch with
        return len(report.get("pending_launches") or {}) + len(report.get("pending_nodes") or [])
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # no autoscaler answering: nobody will add a node
        return None
    return len(status.pending_launches) + len(status.pending_nodes)


def plan_actors(
    wanted: ActorRange | None,
    gpus_per_actor: float,
    cpus_per_actor: float,
    cluster: ClusterResources,
    device: str | None = None,
) -> StagePlan:
    """Model-holding actors (generation, indexing, candidate embedding).

    On GPU (`device` cuda, or unset and the cluster has GPUs): the wanted count or range as asked,
    even beyond the GPUs up now (the autoscaler adds nodes for the pending actors); by default one per
    GPU up now, at least one. On CPU: sized from what the cluster reports, leaving one CPU free for the
    read tasks feeding the actors (a GPU request there would wait forever).
    """
    cpus, gpus = cluster.cpus, cluster.gpus
    if device is None:
        device = "cuda" if gpus >= gpus_per_actor else "cpu"
    if device == "cuda":
        low, high = wanted or (max(1, int(gpus // gpus_per_actor)),) * 2
        # Every actor's GPU is already up: share the CPUs that are here. Otherwise the nodes still to
        # come bring their own CPUs: ask for what the config says.
        if gpus >= high * gpus_per_actor:
            num_cpus = min(cpus_per_actor, max(cpus - 1, 0.5) / high)
        else:
            num_cpus = cpus_per_actor
        return StagePlan(low, high, num_gpus=gpus_per_actor, num_cpus=num_cpus)
    room = max(1, int((cpus - 1) // cpus_per_actor)) if cpus > 1 else 1
    low, high = wanted or (1, 1)
    high = min(high, room)
    low = min(low, high)
    num_cpus = cpus_per_actor if cpus - 1 >= cpus_per_actor * high else max(0.5, (cpus - 1) / high)
    return StagePlan(low, high, num_gpus=0.0, num_cpus=num_cpus)


def plan_generation(resources: ResourcesConfig, cluster: ClusterResources, device: str | None = None) -> StagePlan:
    return plan_actors(resources.generation_actors, resources.gpus_per_actor, resources.cpus_per_actor, cluster, device)


@dataclass(frozen=True)
class JoinPlan(StagePlan):
    threads: int = 1  # BLAS threads per scoring actor


def plan_join(wanted: ActorRange, cluster: ClusterResources, device: str | None = None) -> JoinPlan:
    """GPU actors on GPU (`device` cuda, or unset and the cluster has GPUs); otherwise CPU actors whose
    BLAS threads cover the CPUs.

    Logical CPUs: all but one, shared by the actors (Ray Data's file-listing and read tasks need the
    spare one). Threads: the node's CPUs divided by the actors, so one actor on a small box uses every
    core (reads interleave with scoring on the spare one).
    """
    low, high = wanted
    if device is None:
        device = "cuda" if cluster.gpus >= 1 else "cpu"
    if device == "cuda":
        return JoinPlan(low, high, num_gpus=1.0, num_cpus=0.5, threads=1)
    cpus = cluster.cpus
    high = max(1, min(high, int(cpus)))
    return JoinPlan(
        min(low, high),
        high,
        num_gpus=0.0,
        num_cpus=max(0.5, (cpus - 1) / high),
        threads=max(1, int(cpus // high)),
    )


def named(ds, name: str) -> Iterator:
    """Run a dataset under a name (in Ray's logs and dashboard) and yield its output as Arrow batches."""
    data_context()  # every stage, whichever entry point started it (scan, index, bench)
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
    reuse_workers: bool = False,
    calls_per_actor: int = 1,
) -> Iterator:
    """The one way raymem runs a stage on Ray: `items` (small dicts naming the work) through a pool of
    `plan.actors` instances of the callable class `fn`, each built once with `constructor_kwargs` (models
    load there) and called with Arrow batches of `batch_size` items. Yields the output Arrow batches as
    they complete; the same code runs on a laptop's local Ray and on a cluster.

    `reuse_workers` (CPU stages whose results never depend on which instance scored an item): at most
    `plan.actors` Ray Data *tasks* at a time instead of an actor pool, each task calling an instance cached
    in its worker process (`cached_instance`). Starting an actor pool costs 1-2 s per stage on a small
    machine (a fresh worker process that imports Ray Data), a task runs in a worker Ray already has
    (docs/join.md). GPU stages keep their actors: Ray ends a GPU task's worker after each task.

    `calls_per_actor` (actor pools only): calls each instance runs at once, in threads, for a class
    that overlaps one call's CPU work with another's model work and guards its models itself."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=blocks or max(1, len(items)))
    tasks = reuse_workers and not plan.num_gpus
    if tasks:
        key = f"{name}-{os.urandom(8).hex()}"  # this run's instance in each worker process
        call = {"fn": cached_call, "fn_kwargs": {"cls": fn, "kwargs": constructor_kwargs or {}, "key": key}}
    else:
        # Actors stay restartable (Ray Data's default) even on a local Ray: a worker killed by the OOM
        # killer is replaced and its chunk re-run. The price is one Ray 2.60 error line per pool
        # (ray-project/ray#57733: Ray Data's own constructor arguments live in the object store).
        call = {"fn": fn, "fn_constructor_kwargs": constructor_kwargs or {}}
    out = ds.map_batches(
        **call,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=plan.compute(len(items), tasks=tasks, calls_per_actor=1 if tasks else calls_per_actor),
        **plan.remote_args(),
    )
    return named(out, name)


# Per worker process: the instances of the stages its recent tasks ran (`map_stage(reuse_workers=True)`),
# most recent last. Two, so that two stages running at once on one cluster do not rebuild each other's.
_INSTANCES: dict[str, object] = {}
KEEP_INSTANCES = 2


def cached_instance(key: str, cls, kwargs: dict):
    """The instance of `cls` this worker process built for the stage run `key`, built now if there is
    none; older stage runs' instances are dropped beyond `KEEP_INSTANCES`."""
    instance = _INSTANCES.pop(key, None)
    if instance is None:
        instance = cls(**kwargs)
    _INSTANCES[key] = instance
    while len(_INSTANCES) > KEEP_INSTANCES:
        _INSTANCES.pop(next(iter(_INSTANCES)))
    return instance


def cached_call(batch, *, cls, kwargs: dict, key: str):
    """A Ray Data task of a reused-worker stage: `batch` through this process's instance for the stage."""
    return cached_instance(key, cls, kwargs)(batch)


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


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_traceback(err: BaseException) -> str:
    """The full traceback as text without Ray's colour codes (for the failure record)."""
    import traceback

    return ANSI_ESCAPE.sub("", "".join(traceback.format_exception(err)))


def summarize_error(err: BaseException) -> str:
    """One line for an unexpected failure: the exception a Ray task raised (its `cause`), not Ray's
    wrapper with the remote traceback; otherwise the first and last lines of the message."""
    seen = set()
    while isinstance(getattr(err, "cause", None), BaseException) and id(err) not in seen:
        seen.add(id(err))
        err = err.cause
    text = ANSI_ESCAPE.sub("", str(err))  # Ray colours its tracebacks
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
