"""Reward models: VAE decoding of leaf latents, scorers (HPSv2.x, CLIPScore, JPEG, miniature world),
multi-reward combination. No ray / mlflow here; the reward actor wraps `RewardModel`."""
from treegrpo_ray.rewards.combine import combine_rewards, finite_mask
from treegrpo_ray.rewards.decode import LatentDecoder
from treegrpo_ray.rewards.reward_model import REWARD_KINDS, RewardModel, build_reward_model, build_scorer
from treegrpo_ray.rewards.scorers import (ClipScoreScorer, HPSv2Scorer, JpegCompressibility, JpegIncompressibility,
                                          MiniatureScorer, Scorer)

__all__ = ["combine_rewards", "finite_mask", "LatentDecoder", "REWARD_KINDS", "RewardModel", "build_reward_model",
           "build_scorer", "ClipScoreScorer", "HPSv2Scorer", "JpegCompressibility", "JpegIncompressibility",
           "MiniatureScorer", "Scorer"]
