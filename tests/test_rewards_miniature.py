"""MiniatureScorer: the miniature world's reward behind the common scorer contract, loaded from a
reward directory in the shipped layout (written here from an untrained model)."""
from __future__ import annotations

import pytest
import torch

from treegrpo_ray.rewards import build_reward_model
from treegrpo_ray.rewards.scorers import DEFAULT_MINIATURE_DIR, MiniatureScorer
from treegrpo_ray.miniature import world
from treegrpo_ray.miniature.reward import MiniatureReward
from tools.miniature.train_reward import build_reward_model as build_toy_clip
from tools.miniature.train_reward import save_reward_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("miniature") / "reward"
    save_reward_dir(build_toy_clip(seed=0), str(d), world.world_spec())
    return d


def test_wraps_miniature_reward(reward_dir):
    prompts = world.all_prompts()[:3]
    images = world.render_batch(prompts)                               # (3, 3, 32, 32) in [0, 1]
    scorer = MiniatureScorer(reward_dir, batch_size=2)                 # chunks of 2 + 1
    got = scorer(images, prompts)
    want = MiniatureReward.from_dir(str(reward_dir))(images, prompts)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.shape == (3,) and ((got >= 0) & (got <= 1)).all()       # a softmax probability


def test_bad_prompt_and_spec(reward_dir):
    scorer = MiniatureScorer(reward_dir)
    with pytest.raises(ValueError, match="outside the miniature world"):
        scorer(world.render_batch(world.all_prompts()[:1]), ["a purple hexagon"])
    with pytest.raises(FileNotFoundError, match="miniature reward directory not found"):
        MiniatureScorer(reward_dir.parent / "missing")
    rm = build_reward_model([{"name": "miniature", "weight": 1.0, "checkpoint": str(reward_dir)}], None)
    assert rm.names == ["miniature"]


def test_default_dir_is_the_shipped_asset():
    assert DEFAULT_MINIATURE_DIR.parts[-4:] == ("treegrpo_ray", "assets", "miniature", "reward")
    if DEFAULT_MINIATURE_DIR.is_dir():             # shipped: the default spec must load and score
        prompts = world.all_prompts()[:2]
        scores = MiniatureScorer()(world.render_batch(prompts), prompts)
        assert ((scores >= 0) & (scores <= 1)).all()
    else:                                          # not built yet: a clear error naming the path
        with pytest.raises(FileNotFoundError, match="assets/miniature/reward"):
            MiniatureScorer()
