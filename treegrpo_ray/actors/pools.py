"""The sampler and reward actor pools and the weight store, sized and placed from config
(`.options(...)`, never hard-coded), and the dispatch of one iteration's work across them.

Per iteration: sampler i grows its trees and returns (batch, leaf chunks); as soon as a sampler
finishes, its leaf chunks go *by reference* to the least-loaded reward actors (the driver never
fetches leaf latents; `dispatch.collect_iteration`); rewards come back matched to their batch
and chunk."""
from __future__ import annotations

import math
import os
import time
import uuid

import ray

from treegrpo_ray.actors.dispatch import collect_iteration
from treegrpo_ray.actors.reward_actor import RewardActor
from treegrpo_ray.actors.sampler_actor import SamplerActor
from treegrpo_ray.actors.weight_store import WeightStore
from treegrpo_ray.config import Config, ResourcesConfig, leaves_per_iteration
from treegrpo_ray.system import EVAL_GRID_IMAGES, Collected, SampleRequest

REPLY_TIMEOUT_S = float(os.environ.get("TREEGRPO_REPLY_TIMEOUT_S", "1800"))


def actor_options(r: ResourcesConfig, *, max_restarts: int, max_task_retries: int) -> dict:
    opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=max_restarts,
                max_task_retries=max_task_retries, max_concurrency=1)
    if r.resources:
        opts["resources"] = dict(r.resources)
    if r.label_selector:
        opts["label_selector"] = dict(r.label_selector)
    return opts


class Pools:
    def __init__(self, cfg: Config, cfg_dict: dict):
        p = cfg.pools
        # Samplers find the store by name: an actor handle among a restartable actor's constructor
        # arguments lives in the object store, which Ray warns may break the restart (ray#53727).
        self.store_name = f"treegrpo-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.store = WeightStore.options(name=self.store_name).remote()
        per_sampler = leaves_per_iteration(cfg) // p.samplers
        self.chunks = max(1, math.ceil(per_sampler / p.reward_chunk)) if p.reward_chunk else 1
        sopts = actor_options(p.sampler, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        ropts = actor_options(p.reward, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        self.samplers = [ray.remote(SamplerActor).options(**sopts).remote(cfg_dict, self.store_name, self.chunks)
                         for _ in range(p.samplers)]
        self.rewards = [ray.remote(RewardActor).options(**ropts).remote(cfg_dict) for _ in range(p.rewards)]
        self.eval_restarts = 0  # reward actor restarts seen by evaluate, counted with the next iteration

    def wait_ready(self) -> None:
        ray.get([a.ready.remote() for a in self.samplers + self.rewards])

    def launch(self, requests: list[SampleRequest]):
        """Start every sampler's call with the newest weights: one store lookup per iteration, its
        ref passed along (a restarted sampler re-runs the call with the same weights)."""
        weights = ray.get(self.store.latest.remote(-1))
        opts = {"num_returns": 1 + self.chunks}
        calls = [s.sample.options(**opts).remote(r.prompts, r.window_start, r.seed, weights)
                 for s, r in zip(self.samplers, requests)]
        return time.perf_counter(), [c if isinstance(c, list) else [c] for c in calls]

    def collect(self, handle) -> Collected:
        started, calls = handle
        out = collect_iteration(calls, self.rewards, self.chunks, started=started, timeout_s=REPLY_TIMEOUT_S)
        out.restarts, self.eval_restarts = out.restarts + self.eval_restarts, 0
        return out

    def evaluate(self, prompts: list[str], seed: int):
        latents = self.samplers[0].evaluate.remote(prompts, seed)
        scores, _, restarted, images, _ = ray.get(self.rewards[0].score.remote(latents, prompts, EVAL_GRID_IMAGES))
        self.eval_restarts += int(restarted)
        return scores, images

    def close(self) -> None:
        for a in self.samplers + self.rewards + [self.store]:
            ray.kill(a)
