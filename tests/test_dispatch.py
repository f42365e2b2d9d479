"""collect_iteration on a local Ray cluster with sleeping stand-in actors (bench/sim_actors.py):
every batch comes back once, in call order, with each leaf's rewards computed from that very leaf
and prompt, and the reward calls spread over the reward pool; the driver fetches infos and
rewards only (batches stay refs); a call that cannot be scored is dropped whole and counted."""
import time

import pytest
import ray
import torch

from bench.sim_actors import SEED_STRIDE, SimCosts, SimReward, SimSampler, nfe_by_window
from treegrpo_ray.actors.dispatch import SampleCall, chunk_bounds, collect_iteration
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


def call(sampler, prompts, window_start, seed) -> SampleCall:
    return SampleCall.of(sampler.sample.options(num_returns=2 + CHUNKS).remote(prompts, window_start, seed))


def seeds(out) -> list[int]:
    """The seed of each collected call, read back from its leaves (leaf 0 holds seed * SEED_STRIDE)."""
    return [int((r["leaf"][0].item() - 1) / 2) // SEED_STRIDE for r in out.rewards]


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
    calls = [call(samplers[s], prompts, 7, seed) for s, prompts, seed in plan]
    out = collect_iteration(calls, rewards, CHUNKS, started=time.perf_counter(), timeout_s=60)

    assert seeds(out) == [11, 12, 13, 14]  # call order, each once
    assert all(isinstance(b, ray.ObjectRef) for b in out.batches)           # the driver never fetched a batch
    assert out.dropped_trees == 0 and out.driver_bytes > 0
    for ref, info, r, (_, prompts, seed) in zip(out.batches, out.infos, out.rewards, plan):
        leaves = 27 * len(prompts)
        batch = ray.get(ref)  # what a learner worker fetches: the same batch the info describes
        assert isinstance(batch, TreeBatch) and batch.validate().prompts == prompts == info.prompts
        assert torch.equal(batch.leaf_prompt, info.leaf_prompt) and info.trees == len(prompts)
        assert info.leaf_prompt.shape == (leaves,) and info.nfe == batch.nfe == 20 * len(prompts)
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
    calls = [call(samplers[0], ["x", "y", "z"], 0, 1)]
    with pytest.raises(TimeoutError, match="0.05 s"):
        collect_iteration(calls, rewards, CHUNKS, started=time.perf_counter(), timeout_s=0.05)
    ray.get(calls[0].info)  # let the actor finish before the cluster goes down


def test_a_call_that_cannot_be_scored_is_dropped_whole_and_counted(cluster):
    samplers, _ = cluster
    picky = [ray.remote(SimReward).options(num_cpus=0.01, max_task_retries=0).remote(COSTS, fail_on="boom")]
    # call 1 holds the unscorable prompt in one of its 3 chunks: its other chunks score, and still
    # none of its trees may reach the learner (a group trained on part of its leaves is biased)
    plan = [(0, ["a", "b"], 21), (1, ["c", "boom"], 22), (0, ["d"], 23)]
    calls = [call(samplers[s], prompts, 7, seed) for s, prompts, seed in plan]
    out = collect_iteration(calls, picky, CHUNKS, started=time.perf_counter(), timeout_s=60, trees=[2, 2, 1])
    assert seeds(out) == [21, 23]
    assert out.dropped_trees == 2 and len(out.batches) == len(out.rewards) == 2
    assert out.dead_rewards == []  # a failed call is not a dead actor
    # every call failing is an error, not an empty iteration
    calls = [call(samplers[0], ["boom"], 7, 24)]
    with pytest.raises(RuntimeError, match="(?s)every sampler call of this iteration failed.*cannot score 'boom'"):
        collect_iteration(calls, picky, CHUNKS, started=time.perf_counter(), timeout_s=60)
    ray.kill(picky[0])


def test_a_failed_sampler_call_is_dropped_and_counted_by_its_request(cluster):
    samplers, rewards = cluster
    good = call(samplers[0], ["a"], 7, 31)
    bad = call(samplers[1], ["b", "c"], 99, 32)  # no window 99: the call raises
    out = collect_iteration([good, bad], rewards, CHUNKS, started=time.perf_counter(), timeout_s=60, trees=[1, 2])
    assert seeds(out) == [31] and out.dropped_trees == 2


def test_a_dead_reward_actor_gets_no_more_work(cluster):
    samplers, _ = cluster
    pool = [ray.remote(SimReward).options(num_cpus=0.01, max_restarts=0, max_task_retries=0).remote(COSTS, actor_id=i)
            for i in range(2)]
    ray.get([a.ready.remote() for a in pool])
    ray.kill(pool[0])  # restarts used up: its calls raise RayActorError
    # call 0 (sampler 0, window 7: done at ~20 ms) sends chunks to both actors and fails on actor 0.
    # Calls 1 and 2 grow window-0 trees (202 NFE, ~0.2 s each): call 2, queued behind call 0, is done
    # at ~0.22 s and call 1 (2 prompts) at ~0.4 s, long after actor 0's failure came back (a 20 ms
    # margin let both land before it on a loaded CI machine). Actor 0 is then idle but dead and actor
    # 1 may be busy: every chunk must go to actor 1 all the same.
    calls = [call(samplers[0], ["a"], 7, 41), call(samplers[1], ["b", "bb"], 0, 42), call(samplers[0], ["c"], 0, 43)]
    out = collect_iteration(calls, pool, CHUNKS, started=time.perf_counter(), timeout_s=60)
    assert out.dead_rewards == [0] and out.dropped_trees == 1
    assert seeds(out) == [42, 43]
    assert {float(a) for r in out.rewards for a in r["actor"]} == {1.0}
    ray.kill(pool[1])
