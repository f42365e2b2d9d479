"""Reward actor: holds the VAE and the scorers (loaded once), decodes leaf latents, scores them."""
from __future__ import annotations

import os
import time

import ray
import torch

from treegrpo_ray import builders
from treegrpo_ray.actors.weight_store import reconstructed
from treegrpo_ray.config import from_dict
from treegrpo_ray.rewards.reward_model import timings


class RewardActor:
    def __init__(self, cfg_dict: dict):
        self.cfg = from_dict(cfg_dict)
        builders.set_worker_threads(self.cfg.pools.reward.num_cpus)
        self.model = builders.build_reward_model(self.cfg)
        self.restarted = reconstructed()  # reported with the next result, once per restart

    def score(self, latents: torch.Tensor, prompts: list[str], num_images: int = 0, evaluation: bool = False):
        """-> (rewards per scorer, busy seconds, restarted since the last call?, first `num_images`
        decoded images, seconds per part {"decode": s, <scorer>: s, ...}). evaluation: also the
        metrics the run does not train on (eval_metrics)."""
        t0 = time.perf_counter()
        scores, metrics = self.model.score_latents_with_metrics(latents, prompts, evaluation)
        images = self.model.decoder.decode(latents[:num_images]) if num_images else None
        restarted, self.restarted = self.restarted, False
        return scores, time.perf_counter() - t0, restarted, images, timings(metrics)

    def ready(self) -> str:
        """The id of the node this actor runs on (the driver logs where each pool landed)."""
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()
