"""The system on Ray, as the driver sees it: joining or starting the cluster (`connect`), the
sampler/reward pools and weight store (`pools.Pools`), and the Ray Train learner group
(`learner_group.LearnerGroup`). The samplers' batches go to the learner by reference: the
learner workers fetch them from the object store; the driver only passes the refs along.
"""
from __future__ import annotations

import logging
import math
import os
import time

import ray
import torch

from treegrpo_ray.actors import local_ray
from treegrpo_ray.actors.learner_group import LearnerGroup
from treegrpo_ray.actors.pools import Pools
from treegrpo_ray.config import Config, ConfigError, to_dict
from treegrpo_ray.system import Collected, SampleRequest


def cluster_demand(cfg: Config) -> dict[str, float]:
    """Total resources the run asks for (CPU, GPU and custom)."""
    demand: dict[str, float] = {}
    for count, r in ((cfg.pools.samplers, cfg.pools.sampler), (cfg.pools.rewards, cfg.pools.reward),
                     (cfg.learner.workers, cfg.learner.resources)):
        for key, amount in (("CPU", r.num_cpus), ("GPU", r.num_gpus), *r.resources.items()):
            demand[key] = demand.get(key, 0.0) + count * amount
    return demand


def connect(cfg: Config) -> bool:
    """Join a cluster (ray_address / $RAY_ADDRESS / `ray job submit`) or start a local instance
    big enough for the pools (dashboard on loopback, token auth on). Returns True if we started it."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    if ray.is_initialized():
        return False
    quiet = {} if cfg.tracking.verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if not cfg.tracking.verbose:  # Ray's own INFO/WARNING lines (token auth on, dashboard URL, ...)
        logging.getLogger("ray").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, runtime_env=env, **({"log_to_driver": True} | quiet))
        return False
    demand = cluster_demand(cfg)
    cpus = max(cfg.ray_num_cpus or os.cpu_count() or 1, math.ceil(demand.get("CPU", 0)) + 1)
    custom = {k: v for k, v in demand.items() if k not in ("CPU", "GPU")}
    if custom:
        raise ConfigError(f"pools request custom resources {sorted(custom)} but no cluster is given: a local instance "
                          "has none. Remove pools.*.resources / learner.resources.resources, or set ray_address to "
                          "a cluster whose node groups declare them (see deploy/)")
    if demand.get("GPU", 0) > (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise ConfigError(f"pools request {demand['GPU']} GPUs but this machine has "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; lower pools.*.num_gpus / "
                          "learner.resources.num_gpus or point ray_address at a GPU cluster")
    # The dashboard (on: Ray Train's state queries go through it) binds to loopback. Ray's core
    # gRPC servers listen on every interface whatever the node IP (Ray 2.60 resolves 127.0.0.1 to
    # the routable address); they are guarded by token auth, which Ray turns on for every new
    # local instance unless RAY_AUTH_MODE says otherwise (tests/test_security.py checks both).
    reaped = local_ray.reap_orphans()  # what a SIGKILLed earlier run's instance left behind
    if reaped:
        print(f"treegrpo_ray: stopped {len(reaped)} processes a killed run's local Ray instance left running "
              f"(pids {', '.join(map(str, reaped))})", flush=True)
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
             _node_ip_address="127.0.0.1", **({"log_to_driver": True} | quiet))
    local_ray.record_session()
    return True


def check_placeable(cfg: Config) -> None:
    """Fail before creating actors if a requested resource exists nowhere in the cluster."""
    total = ray.cluster_resources()
    for key, amount in cluster_demand(cfg).items():
        if amount > 0 and total.get(key, 0.0) == 0.0 and not os.environ.get("TREEGRPO_ALLOW_PENDING"):
            raise ConfigError(f"the pools request resource {key!r} but no node in the cluster has it; declare it in "
                              "the node group's rayStartParams (deploy/) or drop it from the pool config "
                              "(set TREEGRPO_ALLOW_PENDING=1 to wait for an autoscaler instead)")


class RaySystem:
    """The `System` protocol (treegrpo_ray.system) on Ray: a facade over the pools and the learner group."""

    def __init__(self, cfg: Config, resume_from=None):
        self.cfg, self.started = cfg, connect(cfg)
        check_placeable(cfg)
        cfg_dict = to_dict(cfg)
        self.pools = Pools(cfg, cfg_dict)
        try:
            self.learner = LearnerGroup(cfg, cfg_dict, self.pools.store, resume_from)  # publishes version 0
        except BaseException:
            self.pools.close()
            if self.started:
                ray.shutdown()
            raise
        self.restarts_logged = 0
        self.placement = self.pools.wait_ready() | {"learner": [self.learner.node]}
        self.placement["driver"] = [ray.get_runtime_context().get_node_id()]
        if len({n for ids in self.placement.values() for n in ids}) > 1:  # a multi-node cluster: say where
            print("treegrpo_ray: placement: " + " | ".join(
                f"{pool} on node{'s' if len(set(ids)) > 1 else ''} {', '.join(sorted({i[:8] for i in ids}))}"
                for pool, ids in self.placement.items()), flush=True)

    @property
    def version(self) -> int:
        return self.learner.version

    def launch(self, requests: list[SampleRequest]):
        return self.pools.launch(requests)

    def collect(self, handle) -> Collected:
        return self.pools.collect(handle)

    def update(self, batches: list, leaf_advantages, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        reply = self.learner.update(batches, leaf_advantages, iteration)  # ObjectRefs from the samplers
        metrics = dict(reply.metrics)
        metrics["time/learner_s"] = time.perf_counter() - t0
        metrics["perf/learner_restarts"] = float(self.learner.restarts - self.restarts_logged)  # since the last update
        self.restarts_logged = self.learner.restarts
        return metrics

    def evaluate(self, prompts: list[str], seed: int):
        return self.pools.evaluate(prompts, seed)

    def save(self, root, iteration: int, run_state: dict, keep: int):
        return self.learner.save(root, iteration, run_state, keep)

    def export(self, out_dir) -> str:
        return self.learner.export(out_dir)

    def close(self) -> None:
        try:
            self.learner.close()
        finally:
            self.pools.close()
            if self.started:
                ray.shutdown()
