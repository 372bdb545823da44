"""Sizing and device choice as pure functions of the config and what the cluster reports
(raymem.runtime); the same decisions against a real autoscaling cluster are in test_autoscaling.py."""

import pyarrow as pa
import pytest

from raymem.config import ActorRange, ResourcesConfig
from raymem.errors import ClusterError
from raymem.runtime import ClusterResources, StagePlan, choose_device, plan_actors, plan_generation, plan_join

COLD = ClusterResources(cpus=0.0, gpus=0.0)  # a KubeRay head with num-cpus 0 and no GPU worker up yet
LAPTOP = ClusterResources(cpus=8.0, gpus=0.0, local=True)
FOUR_GPUS = ClusterResources(cpus=32.0, gpus=4.0)


def resources(**kw) -> ResourcesConfig:
    return ResourcesConfig.model_validate(kw)


def never(*_):
    raise AssertionError("must not wait for a GPU here")


def test_gpus_up_now_are_used_without_waiting():
    choice = choose_device(resources(), FOUR_GPUS, wait_for_gpu=never)
    assert choice.device == "cuda" and "4 GPU" in choice.reason
    plan = plan_generation(resources(), FOUR_GPUS, choice.device)
    assert (plan.min_actors, plan.max_actors, plan.num_gpus) == (4, 4, 1.0)  # one per GPU, all at once


def test_cold_cluster_asks_the_autoscaler_and_plans_gpu_actors_beyond_what_is_up():
    asked = []

    def joined(gpus, cpus, seconds):
        asked.append((gpus, cpus, seconds))
        return None  # one joined

    cfg = resources(generation_actors="1..8", cpus_per_actor=4, gpu_wait_s=300)
    choice = choose_device(cfg, COLD, wait_for_gpu=joined)
    assert choice.device == "cuda" and asked == [(1.0, 4.0, 300.0)]
    one_up = ClusterResources(cpus=4.0, gpus=1.0)
    plan = plan_generation(cfg, one_up, choice.device)
    # Seven GPU actors more than the cluster has: their pending demands make the autoscaler add nodes,
    # and they ask for the CPUs the config names (the nodes to come bring them), not a share of these.
    assert (plan.min_actors, plan.max_actors, plan.num_gpus, plan.num_cpus) == (1, 8, 1.0, 4.0)
    assert plan.describe() == {"actors": "1..8", "num_gpus": 1.0, "num_cpus": 4.0}


def test_auto_falls_back_to_cpu_only_with_a_reason():
    choice = choose_device(resources(gpu_wait_s=5), COLD, wait_for_gpu=lambda *_: "no GPU node joined in 5 s")
    assert choice == choice.__class__("cpu", "no GPU node joined in 5 s")
    # A Ray this process started has no autoscaler: no wait, and the reason says so.
    choice = choose_device(resources(), LAPTOP, wait_for_gpu=never)
    assert choice.device == "cpu" and "local Ray" in choice.reason
    assert choose_device(resources(gpu_wait_s=0), COLD, wait_for_gpu=never).device == "cpu"
    assert choose_device(resources(device="cpu"), FOUR_GPUS, wait_for_gpu=never).device == "cpu"


def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ClusterError, match=r"^resources.device is cuda but no GPU node joined in 5 s$"):
        choose_device(resources(device="cuda", gpu_wait_s=5), COLD, wait_for_gpu=lambda *_: "no GPU node joined in 5 s")
    with pytest.raises(ClusterError, match="local Ray has 0 GPU"):
        choose_device(resources(device="cuda"), LAPTOP, wait_for_gpu=never)
    # Two GPUs per actor on a one-GPU cluster is not enough either.
    with pytest.raises(ClusterError):
        choose_device(
            resources(device="cuda", gpus_per_actor=2), ClusterResources(4.0, 1.0, local=True), wait_for_gpu=never
        )


def test_cpu_actors_leave_a_cpu_free_for_reads():
    plan = plan_generation(resources(generation_actors="2..16", cpus_per_actor=2), LAPTOP, "cpu")
    assert (plan.min_actors, plan.max_actors, plan.num_gpus, plan.num_cpus) == (2, 3, 0.0, 2.0)
    tiny = ClusterResources(cpus=2.0, gpus=0.0, local=True)
    plan = plan_generation(resources(generation_actors=4), tiny, "cpu")
    assert (plan.max_actors, plan.num_cpus) == (1, 1.0)
    # On a GPU cluster the user asked for CPU: no GPU is requested.
    assert plan_generation(resources(), FOUR_GPUS, "cpu").num_gpus == 0.0


def test_join_follows_the_device():
    wanted = ActorRange(1, 4)
    gpu = plan_join(wanted, ClusterResources(cpus=8.0, gpus=0.0), "cuda")
    assert (gpu.min_actors, gpu.max_actors, gpu.num_gpus, gpu.threads) == (1, 4, 1.0, 1)
    cpu = plan_join(wanted, ClusterResources(cpus=2.0, gpus=2.0), "cpu")
    assert (cpu.max_actors, cpu.num_gpus, cpu.threads) == (2, 0.0, 1)
    # Unresolved (generation was all reused): whatever the cluster has now.
    assert plan_join(ActorRange(2, 2), FOUR_GPUS).num_gpus == 1.0


def test_pools_are_fixed_or_autoscaling_and_never_larger_than_the_work():
    import ray

    fixed = StagePlan.fixed(3, num_gpus=0.0, num_cpus=1.0).compute(items=10)
    assert isinstance(fixed, ray.data.ActorPoolStrategy) and (fixed.min_size, fixed.max_size) == (3, 3)
    pool = StagePlan(1, 8, num_gpus=1.0, num_cpus=1.0).compute(items=5)
    assert (pool.min_size, pool.max_size) == (1, 5)
    tasks = StagePlan(1, 8, num_gpus=0.0, num_cpus=1.0).compute(items=5, tasks=True)
    assert isinstance(tasks, ray.data.TaskPoolStrategy) and tasks.size == 5  # at most the work, at once
    assert plan_actors(None, 1.0, 1.0, ClusterResources(cpus=2.0, gpus=0.0), "cuda").max_actors == 1


@pytest.mark.parametrize("value", ["0..2", "3..1", "x", True, 2.5, 0])
def test_actor_counts_are_validated(value):
    with pytest.raises(ValueError, match="generation_actors"):
        resources(generation_actors=value)


def test_actor_counts_round_trip_through_yaml_text():
    cfg = resources(generation_actors="2..6", join_actors=3)
    assert cfg.generation_actors == ActorRange(2, 6) and cfg.join_actors == ActorRange(3, 3)
    dumped = cfg.model_dump()
    assert dumped["generation_actors"] == "2..6" and dumped["join_actors"] == "3"
    assert ResourcesConfig.model_validate(dumped) == cfg


_LISTENING_SOCKETS_OF_A_SCAN_RAY = """
import json, psutil, ray
from raymem.config import RayConfig
from raymem.runtime import ray_session

with ray_session(RayConfig()):
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker, with its own server, is up
    driver = psutil.Process()
    names = {p.pid: p.name() for p in [driver, *driver.children(recursive=True)]}
    sockets = [
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]
    print(json.dumps({"node": ray.util.get_node_ip_address(), "sockets": sockets}))
"""


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.ray
def test_a_local_ray_started_by_raymem_listens_on_loopback_only():
    """Nothing on the network can reach the Ray a scan starts: the GCS, the raylet, the workers, the
    agents and the metrics servers all listen on 127.0.0.1 (Ray 2.60 binds the machine's address
    and `::` by default). Its own process, so no Ray this test process holds is in the way."""
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _LISTENING_SOCKETS_OF_A_SCAN_RAY], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in seen["sockets"]}
    assert {"gcs_server", "raylet"} <= names, names
    exposed = [s for s in seen["sockets"] if not _is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert seen["node"] == "127.0.0.1"


class _Counted:
    """A stage instance that says which process and which instance handled each item."""

    def __init__(self, tag: str):
        self.tag, self.calls = tag, 0

    def __call__(self, batch):
        import os

        import pyarrow as pa

        from raymem import runtime

        self.calls += 1
        n = batch.num_rows
        return pa.table(
            {
                "item": batch.column("i"),
                "pid": [os.getpid()] * n,
                "instance": [id(self)] * n,
                "call": [self.calls] * n,
                "tag": [self.tag] * n,
                "cached": [any(v is self for v in runtime._INSTANCES.values())] * n,  # a task, not an actor
            }
        )


def test_a_reused_worker_stage_builds_one_instance_per_process_and_run(local_ray):
    """`map_stage(reuse_workers=True)` runs the callable class as Ray Data tasks: every item is handled
    once, by an instance built once per worker process for this run (its calls count up), and the next
    run of the stage builds its own instance even in the same process."""
    from raymem import runtime

    plan = StagePlan.fixed(1, num_gpus=0.0, num_cpus=1.0)

    def run(tag):
        items = [{"i": i} for i in range(8)]
        out = runtime.map_stage("counted", items, _Counted, plan, constructor_kwargs={"tag": tag}, reuse_workers=True)
        return pa.concat_tables(list(out)).to_pylist()

    first, second = run("a"), run("b")
    for rows, tag in ((first, "a"), (second, "b")):
        assert sorted(r["item"] for r in rows) == list(range(8))
        assert {r["tag"] for r in rows} == {tag}
        assert all(r["cached"] for r in rows)
        by_instance = {}
        for r in rows:
            by_instance.setdefault((r["pid"], r["instance"]), []).append(r["call"])
        assert len({pid for pid, _ in by_instance}) == len(by_instance)  # one instance per process and run
        for calls in by_instance.values():
            assert sorted(calls) == list(range(1, len(calls) + 1))  # reused, not rebuilt per task
    first_instances = {(r["pid"], r["instance"]) for r in first}
    assert not first_instances & {(r["pid"], r["instance"]) for r in second}


class _Overlapping:
    """A stage instance that records how many of its calls were running when each began."""

    def __init__(self):
        import threading

        self.lock, self.running = threading.Lock(), 0

    def __call__(self, batch):
        import os
        import time

        import pyarrow as pa

        with self.lock:
            self.running += 1
            seen = self.running
        time.sleep(1.0)  # long enough for the pool's next call to start beside it when it may
        with self.lock:
            self.running -= 1
        return pa.table({"item": batch.column("i"), "pid": [os.getpid()], "running": [seen]})


@pytest.mark.parametrize("calls", [1, 2])
def test_an_actor_runs_as_many_calls_at_once_as_the_stage_asks(local_ray, calls):
    """`map_stage(calls_per_actor=2)` (the generate stage) gives one actor two calls at once, in threads
    of the same instance; the default runs one at a time."""
    from raymem import runtime

    plan = StagePlan.fixed(1, num_gpus=0.0, num_cpus=1.0)
    items = [{"i": i} for i in range(6)]
    rows = pa.concat_tables(list(runtime.map_stage("overlap", items, _Overlapping, plan, calls_per_actor=calls)))
    rows = rows.to_pylist()
    assert sorted(r["item"] for r in rows) == list(range(6)) and len({r["pid"] for r in rows}) == 1
    assert max(r["running"] for r in rows) == calls


def test_the_worker_cache_keeps_the_latest_stage_runs_only(monkeypatch):
    """A worker process keeps the instances of its last `KEEP_INSTANCES` stage runs; an older run's
    instance is dropped (and rebuilt if that run's tasks come back)."""
    from raymem import runtime

    monkeypatch.setattr(runtime, "_INSTANCES", {})
    built = []

    class Tracked:
        def __init__(self, name):
            built.append(name)

    for key in ("a", "b", "a", "c", "b", "a"):
        runtime.cached_instance(key, Tracked, {"name": key})
    # a, b built; a reused; c evicts b (a was used more recently); b rebuilt evicts a; a rebuilt evicts c
    assert built == ["a", "b", "c", "b", "a"]
    assert list(runtime._INSTANCES) == ["b", "a"]
