"""The sampler and reward actor pools and the weight store, sized and placed from config
(`.options(...)`, never hard-coded), and the dispatch of one iteration's work across them.

Per iteration: each sampler gets `pools.sampler_calls` calls, queued on it in order, each growing
the trees of its share of the prompts and returning (info, batch, leaf chunks). As soon as a call
finishes, its leaf chunks go *by reference* to the least-loaded reward actors
(`dispatch.collect_iteration`), so rewards run while the sampler grows its next group; the driver
fetches only infos and rewards. Batches stay in the object store until the learner fetches them."""
from __future__ import annotations

import math
import os
import time
import uuid

import ray

from treegrpo_ray.actors.dispatch import Reissue, SampleCall, collect_iteration
from treegrpo_ray.actors.reward_actor import RewardActor
from treegrpo_ray.actors.sampler_actor import SamplerActor
from treegrpo_ray.actors.weight_store import WeightStore
from treegrpo_ray.config import Config, ResourcesConfig, leaves_per_iteration
from treegrpo_ray.system import EVAL_GRID_IMAGES, Collected, SampleRequest

def on_driver_node() -> dict:
    """Options that keep an actor on the driver's node (hard affinity): the weight store and the
    learner's mailbox, which the run cannot lose, go down only with the driver itself."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


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
        # The run's own control actors live on the driver's node: only the head's loss ends a run.
        self.store = WeightStore.options(name=self.store_name, **on_driver_node()).remote()
        per_call = leaves_per_iteration(cfg) // (p.samplers * p.sampler_calls)
        self.chunks = max(1, math.ceil(per_call / p.reward_chunk)) if p.reward_chunk else 1
        self.trees_per_prompt = cfg.tree.trees_per_prompt
        sopts = actor_options(p.sampler, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        ropts = actor_options(p.reward, max_restarts=p.max_restarts, max_task_retries=p.max_task_retries)
        self.samplers = [ray.remote(SamplerActor).options(**sopts).remote(cfg_dict, self.store_name, self.chunks)
                         for _ in range(p.samplers)]
        self.rewards = [ray.remote(RewardActor).options(**ropts).remote(cfg_dict) for _ in range(p.rewards)]
        self.eval_restarts = 0  # reward actor restarts seen by evaluate, counted with the next iteration
        self.lost_node_wait_s, self.reply_timeout_s = p.lost_node_wait_s, p.reply_timeout_s
        self.log = lambda line: print(line, flush=True)

    def wait_ready(self) -> dict[str, list[str]]:
        """Wait for every actor; returns the node id of each, per pool (and of the weight store)."""
        nodes = ray.get([a.ready.remote() for a in self.samplers + self.rewards])
        return {"sampler": nodes[:len(self.samplers)], "reward": nodes[len(self.samplers):],
                "weight store": [ray.get(self.store.node.remote())]}

    def launch(self, requests: list[SampleRequest]):
        """Queue the requests on the samplers, consecutive requests on one sampler (request j on
        sampler j // calls), all with the newest weights: one store lookup per iteration, its ref
        passed along with the work (a restarted sampler re-runs the call with the same weights)."""
        weights = ray.get(self.store.latest.remote(-1))
        opts = {"num_returns": 2 + self.chunks}
        per = len(requests) // len(self.samplers)
        owner = [self.samplers[j // per] for j in range(len(requests))]

        def submit(j: int) -> SampleCall:
            r = requests[j]
            return SampleCall.of(owner[j].sample.options(**opts).remote(r.prompts, r.window_start, r.seed, weights))
        calls = [submit(j) for j in range(len(requests))]
        trees = [len(r.prompts) * self.trees_per_prompt for r in requests]
        return time.perf_counter(), calls, trees, Reissue(submit, owner, self.lost_node_wait_s, self.log)

    def collect(self, handle) -> Collected:
        started, calls, trees, reissue = handle
        out = collect_iteration(calls, self.rewards, self.chunks, started=started, timeout_s=self.reply_timeout_s,
                                trees=trees, reissue=reissue)
        out.restarts, self.eval_restarts = out.restarts + self.eval_restarts, 0
        for a in sorted(out.dead_rewards, reverse=True):  # their restarts are used up: route around them
            self.rewards.pop(a)
        return out

    def evaluate(self, prompts: list[str], seed: int):
        latents = self.samplers[0].evaluate.remote(prompts, seed)
        reply = ray.get(self.rewards[0].score.remote(latents, prompts, EVAL_GRID_IMAGES, True))
        self.eval_restarts += int(reply.restarted)
        return reply.rewards, reply.images

    def close(self) -> None:
        for a in self.samplers + self.rewards + [self.store]:
            ray.kill(a)
