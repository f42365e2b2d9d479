"""collect_iteration on a local Ray cluster with sleeping stand-in actors (bench/sim_actors.py):
every batch comes back once, in call order, with each leaf's rewards computed from that very leaf
and prompt, and the reward calls spread over the reward pool."""
import time

import pytest
import ray
import torch

from bench.sim_actors import SEED_STRIDE, SimCosts, SimReward, SimSampler, nfe_by_window
from treegrpo_ray.actors.dispatch import chunk_bounds, collect_iteration
from treegrpo_ray.types import TreeBatch

pytestmark = pytest.mark.ray

CHUNKS = 3
# 1 NFE = 1 ms; a k=3, d=3, T=10 tree at window start 7 costs 7 + 13 + 0 = 20 NFE = 20 ms per tree.
# A reward call sleeps 2 ms per leaf: 9 leaves -> 18 ms, so reward calls overlap sampling.
COSTS = SimCosts(nfe_s=1e-3, decode_s=1e-3, score_s=1e-3)


@pytest.fixture(scope="module")
def cluster(ray_local):
    opts = dict(num_cpus=0.01, max_concurrency=1)
    samplers = [ray.remote(SimSampler).options(**opts).remote(COSTS, CHUNKS, nfe_by_window()) for _ in range(2)]
    rewards = [ray.remote(SimReward).options(**opts).remote(COSTS, actor_id=i) for i in range(2)]
    ray.get([a.ready.remote() for a in samplers + rewards])
    yield samplers, rewards
    for a in samplers + rewards:
        ray.kill(a)


def test_chunk_bounds_split_like_tensor_split():
    # 10 rows in 3 parts: torch.tensor_split gives sizes 4, 3, 3
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    rows = torch.arange(10)
    assert [tuple(p.tolist()) for p in torch.tensor_split(rows, 3)] == [tuple(range(a, b)) for a, b in chunk_bounds(10, 3)]


def test_every_batch_once_in_call_order_with_matching_rewards(cluster):
    samplers, rewards = cluster
    # Call 0 grows 3 trees (60 ms) on sampler 0, call 1 one tree (20 ms) on sampler 1: call 1 finishes
    # first. Calls 2 and 3 queue behind them on the same actors. Prompt lengths differ per call.
    plan = [(0, ["a"] * 1 + ["bb", "ccc"], 11), (1, ["dddd"], 12), (0, ["eeeee", "ffffff"], 13), (1, ["g" * 7], 14)]
    opts = {"num_returns": 1 + CHUNKS}
    calls = [samplers[s].sample.options(**opts).remote(prompts, 7, seed) for s, prompts, seed in plan]
    out = collect_iteration(calls, rewards, CHUNKS, started=time.perf_counter(), timeout_s=60)

    assert [b.extras["seed"] for b in out.batches] == [11.0, 12.0, 13.0, 14.0]  # call order, each once
    for batch, r, (_, prompts, seed) in zip(out.batches, out.rewards, plan):
        leaves = 27 * len(prompts)
        assert isinstance(batch, TreeBatch) and batch.validate().prompts == prompts
        assert batch.leaf_prompt.shape == (leaves,) and batch.nfe == 20 * len(prompts)
        # leaf l of this call holds seed * SEED_STRIDE + l, and the reward is 2 x leaf + 1
        expected = 2.0 * (seed * SEED_STRIDE + torch.arange(leaves, dtype=torch.float64)) + 1.0
        assert torch.equal(r["leaf"], expected)
        assert torch.equal(r["prompt_len"], torch.tensor([float(len(prompts[j])) for j in batch.leaf_prompt.tolist()],
                                                         dtype=torch.float64))
    # 4 calls x 3 chunks = 12 reward calls over 2 actors: least-loaded routing uses both
    actor_of_call = torch.cat([r["actor"] for r in out.rewards])
    used = {int(a) for a in actor_of_call.unique()}
    assert used == {0, 1}
    assert out.sample_s > 0 and out.reward_s > 0 and out.wall_s >= 0.06


def test_a_silent_pool_raises_timeout(cluster):
    samplers, rewards = cluster
    # window start 0: 0 + 13 + 27 x 7 = 202 NFE = 0.2 s per tree, 3 trees = 0.6 s >> 0.05 s timeout
    calls = [samplers[0].sample.options(num_returns=1 + CHUNKS).remote(["x", "y", "z"], 0, 1)]
    with pytest.raises(TimeoutError, match="0.05 s"):
        collect_iteration(calls, rewards, CHUNKS, started=time.perf_counter(), timeout_s=0.05)
    ray.get(calls[0])  # let the actor finish before the cluster goes down
