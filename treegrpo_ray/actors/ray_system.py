"""The system on Ray: N_s sampler actors, N_r reward actors, a Ray Train learner and a
WeightStore, each pool sized and placed from config (`.options(...)`, never hard-coded).

Data flow per iteration: sampler i grows its trees and returns (batch, leaf chunks); as soon as
a sampler finishes, its leaf chunks go *by reference* to the least-loaded reward actors (the
driver never fetches leaf latents); rewards come back matched to their batch and chunk. The
merged batch goes to the learner with one `ray.put` and W gets.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid

import ray
import torch
from ray.util.queue import Empty, Queue

from treegrpo_ray import storage
from treegrpo_ray.actors import local_ray
from treegrpo_ray.actors.dispatch import collect_iteration
from treegrpo_ray.actors.reward_actor import RewardActor
from treegrpo_ray.actors.sampler_actor import SamplerActor
from treegrpo_ray.actors.train_loop import learner_loop
from treegrpo_ray.actors.weight_store import WeightStore
from treegrpo_ray.config import Config, ConfigError, ResourcesConfig, leaves_per_iteration, to_dict
from treegrpo_ray.system import Collected, SampleRequest

REPLY_TIMEOUT_S = float(os.environ.get("TREEGRPO_REPLY_TIMEOUT_S", "1800"))


def actor_options(r: ResourcesConfig, *, max_restarts: int, max_task_retries: int) -> dict:
    opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=max_restarts,
                max_task_retries=max_task_retries, max_concurrency=1)
    if r.resources:
        opts["resources"] = dict(r.resources)
    if r.label_selector:
        opts["label_selector"] = dict(r.label_selector)
    return opts


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
    local_ray.record_session(ray._private.worker._global_node.get_session_dir_path())
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
    """The `System` protocol (treegrpo_ray.system) on Ray: sampler and reward actor pools, a Ray
    Train learner, weights through the object store."""

    def __init__(self, cfg: Config, resume_from=None):
        self.cfg, self.started = cfg, connect(cfg)
        check_placeable(cfg)
        cfg_dict, p = to_dict(cfg), cfg.pools
        # Samplers find the store by name: an actor handle among a restartable actor's constructor
        # arguments lives in the object store, which Ray warns may break the restart (ray#53727).
        self.store_name = f"treegrpo-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.store = WeightStore.options(name=self.store_name).remote()
        per_sampler = leaves_per_iteration(cfg) // p.samplers
        self.chunks = max(1, math.ceil(per_sampler / p.reward_chunk)) if p.reward_chunk else 1
        sopts = actor_options(p.sampler, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        ropts = actor_options(p.reward, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        self.samplers = [ray.remote(SamplerActor).options(name=None, **sopts).remote(cfg_dict, self.store_name, self.chunks)
                         for _ in range(p.samplers)]
        self.rewards = [ray.remote(RewardActor).options(**ropts).remote(cfg_dict) for _ in range(p.rewards)]
        self.checkpoint = str(resume_from) if resume_from else None  # newest checkpoint of this run
        self._start_learner(cfg_dict, resume_from)
        ray.get([a.ready.remote() for a in self.samplers + self.rewards])

    # -- learner ---------------------------------------------------------------------------------
    def _start_learner(self, cfg_dict: dict, resume_from) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        lr = self.cfg.learner
        self.inboxes = [Queue() for _ in range(lr.workers)]
        self.outbox = Queue()
        self.seq, self.version, self.pending = 0, 0, None
        self.learner_pid, self.learner_restarts, self.restarts_logged, self.reward_restarts = 0, 0, 0, 0
        res = {"CPU": lr.resources.num_cpus, **lr.resources.resources}
        if lr.resources.num_gpus:
            res["GPU"] = lr.resources.num_gpus
        # the driver resolved output_dir to an absolute path or URI (storage.resolve_output_dir);
        # Ray Train keeps its (pointer-sized) checkpoints beside the run's, through the same pyarrow fs
        train_fs, train_path = storage.filesystem(storage.join(self.cfg.tracking.output_dir, "ray_train"))
        probe = storage.write_probe(self.cfg.tracking.output_dir) if storage.is_local(self.cfg.tracking.output_dir) else None
        self.trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"cfg": cfg_dict, "inboxes": self.inboxes, "outbox": self.outbox, "store": self.store,
                               "resume_from": str(resume_from) if resume_from else None, "probe": probe},
            scaling_config=ScalingConfig(num_workers=lr.workers, use_gpu=lr.resources.num_gpus > 0,
                                         resources_per_worker=res),
            run_config=RunConfig(storage_path=train_path, storage_filesystem=train_fs, name=f"learner-{os.getpid()}-{int(time.time())}",
                                 failure_config=FailureConfig(max_failures=max(self.cfg.pools.max_restarts, 0))))
        self.fit_error: BaseException | None = None
        self.fit_thread = threading.Thread(target=self._fit, daemon=True)
        self.fit_thread.start()
        ready = self._reply("ready")
        self.version, self.learner_pid = ready["version"], ready["pid"]
        if probe is not None:
            storage.delete_file(probe)
        if not ready.get("sees_outputs", True):
            self.close()
            raise RuntimeError(storage.unshared_storage_error(self.cfg.tracking.output_dir, ready.get("host", "?")))

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # surfaced to the driver on its next wait
            self.fit_error = e

    def _send(self, cmd: dict) -> int:
        """One command at a time: the driver always waits for its reply before the next. Each
        names the version and checkpoint a restarted learner must be at to run it (train_loop)."""
        self.seq += 1
        cmd.update(seq=self.seq, version=self.version, checkpoint=self.checkpoint)
        self.pending = cmd
        for q in self.inboxes:
            q.put(cmd)
        return self.seq

    def _reply(self, kind: str, seq: int | None = None) -> dict:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.fit_error is not None:
                raise RuntimeError(f"the learner (Ray Train) failed: {self.fit_error}") from self.fit_error
            try:
                msg = self.outbox.get(timeout=1.0)
            except Empty:
                if not self.fit_thread.is_alive():
                    raise RuntimeError("the learner (Ray Train) stopped without answering")
                continue
            if msg["kind"] == "error":
                raise RuntimeError(f"the learner stopped: {msg['error']}")
            if msg["kind"] == kind and (seq is None or msg.get("seq") == seq):
                return msg
            if msg["kind"] == "ready":
                self._restarted(msg)
        raise TimeoutError(f"no {kind!r} reply from the learner within {REPLY_TIMEOUT_S} s")

    def _restarted(self, ready: dict) -> None:
        """Ray Train restarted the learner group: drop stale copies of the pending command and send
        it again (a rank that already took it runs it once). The restored ranks catch up to the
        command's version from our newest checkpoint, or answer "error" if the updates since it
        are lost: we stop then rather than rewind silently, and resuming replays them exactly."""
        self.learner_restarts += 1
        self.learner_pid = ready["pid"]
        for q in self.inboxes:
            while not q.empty():
                q.get_nowait()
        if self.pending is not None:
            for q in self.inboxes:
                q.put(self.pending)

    # -- sampling + rewards ------------------------------------------------------------------------
    def launch(self, requests: list[SampleRequest]):
        opts = {"num_returns": 1 + self.chunks}
        calls = [s.sample.options(**opts).remote(r.prompts, r.window_start, r.seed)
                 for s, r in zip(self.samplers, requests)]
        return time.perf_counter(), [c if isinstance(c, list) else [c] for c in calls]

    def collect(self, handle) -> Collected:
        started, calls = handle
        out = collect_iteration(calls, self.rewards, self.chunks, started=started, timeout_s=REPLY_TIMEOUT_S)
        out.restarts, self.reward_restarts = out.restarts + self.reward_restarts, 0
        return out

    # -- learner commands ----------------------------------------------------------------------------
    def update(self, batch, leaf_advantages, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        ref = ray.put(batch)
        seq = self._send({"kind": "update", "batch": [ref], "leaf_adv": leaf_advantages, "iteration": iteration})
        reply = self._reply("update", seq)
        self.version = reply["version"]
        metrics = dict(reply["metrics"])
        metrics["time/learner_s"] = time.perf_counter() - t0
        metrics["perf/learner_restarts"] = float(self.learner_restarts - self.restarts_logged)  # since the last update
        self.restarts_logged = self.learner_restarts
        return metrics

    def evaluate(self, prompts: list[str], seed: int):
        latents = self.samplers[0].evaluate.remote(prompts, seed)
        scores, _, restarted, images = ray.get(self.rewards[0].score.remote(latents, prompts, 16))
        self.reward_restarts += int(restarted)  # counted with the next iteration
        return scores, images

    def save(self, root, iteration: int, run_state: dict, keep: int):
        seq = self._send({"kind": "save", "root": str(root), "iteration": iteration, "run_state": run_state,
                          "keep": keep})
        self.checkpoint = self._reply("save", seq)["path"]
        return self.checkpoint

    def export(self, out_dir) -> str:
        seq = self._send({"kind": "export", "dir": str(out_dir)})
        return self._reply("export", seq)["path"]

    def close(self) -> None:
        try:
            for q in self.inboxes:
                q.put({"kind": "stop"})
            self.fit_thread.join(timeout=60)
        finally:
            for a in self.samplers + self.rewards + [self.store]:
                ray.kill(a)
            if self.started:
                ray.shutdown()
