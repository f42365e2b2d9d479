"""Sampler actor: a thin shell around `TreeSampler`. Each sample call carries the weights it must
use (the store's newest version, looked up once per iteration by the driver: the ref travels
with the work, not an RPC per sampler); the actor loads them if they are newer than its own and
checks them against the publisher's fingerprint (a load that binds nothing stops the run). It
returns three kinds of object: the batch's `BatchInfo` (all the driver fetches), the batch without
its leaves (the learner fetches it), and the leaf latents in chunks (the reward pool fetches them),
so no latent passes through the driver."""
from __future__ import annotations

import time

import ray
import ray.exceptions
import torch

from treegrpo_ray import builders
from treegrpo_ray.actors.weight_store import buckets, reconstructed
from treegrpo_ray.config import from_dict
from treegrpo_ray.sampling.evaluate import ode_sample
from treegrpo_ray.system import split_leaves
from treegrpo_ray.types import CallReport


class SamplerActor:
    def __init__(self, cfg_dict: dict, store_name: str, num_chunks: int = 1):
        self.cfg = from_dict(cfg_dict)
        builders.set_worker_threads(self.cfg.pools.sampler.num_cpus)
        self.policy = builders.build_policy(self.cfg)
        self.sampler = builders.build_sampler(self.cfg, self.policy)
        self.store, self.num_chunks, self.version = ray.get_actor(store_name), num_chunks, -1
        self.verified = False  # the loaded version was checked against its publish fingerprint
        self.restarted = reconstructed()  # reported with the next batch, once per restart

    def _load(self, weights) -> None:
        """weights = (version, [bucket refs], fingerprint) as WeightStore.latest gives them, or None.
        Buckets lost all the same (the weight store owns them, so only with its node): wait (up to
        pools.lost_node_wait_s) for a newer version."""
        deadline = time.monotonic() + self.cfg.pools.lost_node_wait_s
        while weights is not None and weights[0] > self.version:
            version, refs, expected = weights
            try:
                self.policy.load_broadcast_parts(buckets(refs), expected, version)
                self.version, self.verified = version, expected is not None
            except ray.exceptions.ObjectLostError:
                self.version = -1  # partly loaded: no version until a whole one is in
                if time.monotonic() > deadline:
                    raise
                time.sleep(2.0)
                weights = ray.get(self.store.latest.remote(self.version))

    def _pull(self) -> None:
        self._load(ray.get(self.store.latest.remote(self.version)))

    def sample(self, prompts: list[str], window_start: int, seed: int, weights=None):
        """-> (BatchInfo, batch without leaves, leaf chunk 0, ..., leaf chunk n-1): separate
        returns, so each reader fetches only its part (`dispatch.SampleCall` names them). weights:
        what to sample with (see _load); None: the store's newest."""
        t0 = time.perf_counter()
        self._load(weights) if weights is not None else self._pull()
        batch = self.sampler.sample(prompts, window_start=window_start, seed=seed, policy_version=self.version)
        batch, leaves = split_leaves(batch)
        info = batch.info(leaves.nbytes)
        info.call = CallReport(time.perf_counter() - t0, self.restarted, self.verified)
        self.restarted = False
        return (info, batch, *torch.tensor_split(leaves, self.num_chunks))

    def evaluate(self, prompts: list[str], seed: int) -> torch.Tensor:
        self._pull()
        return ode_sample(self.policy, prompts, num_steps=self.cfg.tree.num_steps, seed=seed)

    def ready(self) -> str:
        """The id of the node this actor runs on (the driver logs where each pool landed)."""
        return ray.get_runtime_context().get_node_id()
