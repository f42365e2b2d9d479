"""Reward models: VAE decoding of leaf latents, scorers (HPSv2.x, CLIPScore, JPEG, miniature world).
No ray / mlflow here; the reward actor wraps `RewardModel`. Names load on first use, so that
`treegrpo_ray.rewards.kinds` (what config validation needs) does not pull in open_clip."""
from __future__ import annotations

import importlib

_HOME = {
    "LatentDecoder": "decode", "REWARD_KINDS": "kinds", "RewardModel": "reward_model",
    "build_reward_model": "reward_model", "build_scorer": "reward_model", "ClipScoreScorer": "scorers",
    "HPSv2Scorer": "scorers", "JpegCompressibility": "scorers", "JpegIncompressibility": "scorers",
    "MiniatureScorer": "scorers", "Scorer": "scorers",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'treegrpo_ray.rewards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"treegrpo_ray.rewards.{_HOME[name]}"), name)
