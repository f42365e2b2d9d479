"""The whole system in one process, no Ray: the same components the actors wrap, called
directly. For debugging, tests, and the Ray-overhead benchmark's baseline. With max_staleness > 0
sampling happens at `launch` (eagerly), exactly where the Ray system starts its sampler calls, so
both systems see the same weights; on-policy (max_staleness = 0) it happens at `collect`, which
sees the same weights too and charges the sampling to its own iteration's wall time, as Ray does."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from treegrpo_ray import builders
from treegrpo_ray.checkpoint import export, load_checkpoint, save_checkpoint
from treegrpo_ray.config import Config
from treegrpo_ray.sampling.evaluate import ode_sample
from treegrpo_ray.system import EVAL_GRID_IMAGES, Collected, SampleRequest, split_leaves
from treegrpo_ray.types import TreeBatch, merge_batches


@dataclass
class LocalHandle:
    """A launched iteration: its requests, and their results if sampled eagerly at launch."""
    requests: list[SampleRequest]
    collected: Collected | None = None


class LocalSystem:
    """The `System` protocol (treegrpo_ray.system) in one process."""

    def __init__(self, cfg: Config, resume_from=None):
        self.cfg = cfg
        builders.set_worker_threads(max(1, torch.get_num_threads()))
        self.policy = builders.build_policy(cfg)
        self.sampler = builders.build_sampler(cfg, self.policy)
        self.rewards = builders.build_reward_model(cfg)
        self.learner = builders.build_learner(cfg, self.policy)
        if resume_from is not None:
            model, optim, _ = load_checkpoint(resume_from)
            self.policy.load_broadcast_state(model)
            if optim is not None:
                self.learner.load_state(optim)

    @property
    def version(self) -> int:
        return self.learner.version

    def launch(self, requests: list[SampleRequest]) -> LocalHandle:
        eager = self.cfg.max_staleness > 0
        return LocalHandle(requests, self._sample_and_score(requests) if eager else None)

    def collect(self, handle: LocalHandle) -> Collected:
        return handle.collected if handle.collected is not None else self._sample_and_score(handle.requests)

    def _sample_and_score(self, requests: list[SampleRequest]) -> Collected:
        out = Collected()
        for req in requests:
            t0 = time.perf_counter()
            batch = self.sampler.sample(req.prompts, window_start=req.window_start, seed=req.seed,
                                        policy_version=self.version)
            t1 = time.perf_counter()
            batch, leaves = split_leaves(batch)
            prompts = [batch.prompts[i] for i in batch.leaf_prompt.tolist()]
            scores, seconds = self.rewards.score_latents_timed(leaves, prompts)
            t2 = time.perf_counter()
            out.add(batch, batch.info(leaves.nbytes), scores, sample_s=t1 - t0, reward_s=t2 - t1,
                    reward_parts=[seconds])
        return out

    def update(self, batches: list[TreeBatch], leaf_advantages, iteration: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.learner.update(merge_batches(batches), leaf_advantages, iteration)
        metrics["time/learner_s"] = time.perf_counter() - t0
        return metrics

    def evaluate(self, prompts: list[str], seed: int):
        latents = ode_sample(self.policy, prompts, num_steps=self.cfg.tree.num_steps, seed=seed)
        return (self.rewards.score_latents(latents, prompts, evaluation=True),
                self.rewards.decoder.decode(latents[:EVAL_GRID_IMAGES]))

    def save(self, root, iteration: int, run_state: dict, keep: int):
        return save_checkpoint(root, iteration, model_state=self.policy.state_for_broadcast(),
                               optimizer_state=self.learner.state(), run_state=run_state, keep=keep)

    def export(self, out_dir) -> str:
        return export(self.policy, out_dir)

    def close(self) -> None:
        pass
