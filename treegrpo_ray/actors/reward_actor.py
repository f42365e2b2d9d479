"""Reward actor: holds the VAE and the scorers (loaded once), decodes leaf latents, scores them."""
from __future__ import annotations

import time

import ray
import torch

from treegrpo_ray import builders
from treegrpo_ray.actors.weight_store import reconstructed
from treegrpo_ray.config import from_dict
from treegrpo_ray.system import ScoreReply


class RewardActor:
    def __init__(self, cfg_dict: dict):
        self.cfg = from_dict(cfg_dict)
        builders.set_worker_threads(self.cfg.pools.reward.num_cpus)
        self.model = builders.build_reward_model(self.cfg)
        self.restarted = reconstructed()  # reported with the next result, once per restart

    def score(self, latents: torch.Tensor, prompts: list[str], num_images: int = 0,
              evaluation: bool = False) -> ScoreReply:
        """Decode and score; also return the first `num_images` decoded images. evaluation: also
        the metrics the run does not train on (eval_metrics)."""
        t0 = time.perf_counter()
        scores, seconds = self.model.score_latents_timed(latents, prompts, evaluation)
        images = self.model.decoder.decode(latents[:num_images]) if num_images else None
        restarted, self.restarted = self.restarted, False
        return ScoreReply(scores, time.perf_counter() - t0, seconds, restarted, images)

    def ready(self) -> str:
        """The id of the node this actor runs on (the driver logs where each pool landed)."""
        return ray.get_runtime_context().get_node_id()
