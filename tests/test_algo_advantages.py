"""Reward normalisation and leaf -> root value propagation (treegrpo_ray/algo/advantages.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treegrpo_ray.algo.advantages import node_values, node_values_recursive, node_depths, normalize_per_prompt
from treegrpo_ray.algo.tree import build_tree

torch.set_num_threads(1)
NAN = float("nan")
BOTH = [node_values, node_values_recursive]


def test_normalize_per_prompt_hand_computed():
    # prompt 7: rewards 1, 3 -> mean 2, population std 1 -> -1, +1 (eps = 0)
    # prompt 3: rewards 2, 4 -> mean 3, std 1 -> -1, +1; prompt 5: single leaf -> 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0])
    ids = torch.tensor([7, 3, 7, 3, 5])
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, eps=0.0), torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0]))
    # eps = 1e-4: -1 / (1 + 1e-4) = -0.99990001
    torch.testing.assert_close(normalize_per_prompt(rewards, ids)[:2], torch.tensor([-0.99990001, -0.99990001]))


def test_normalize_per_prompt_clip_and_constant_rewards():
    # rewards 0, 0, 0, 10: mean 2.5, var = (3 * 6.25 + 56.25) / 4 = 18.75, std = 4.3301270
    # -> -2.5 / 4.3301270 = -0.5773503 (x3), 7.5 / 4.3301270 = 1.7320508; clip 1 -> 1.0
    rewards, ids = torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, eps=0.0),
                               torch.tensor([-0.5773503, -0.5773503, -0.5773503, 1.7320508]))
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, eps=0.0, clip=1.0),
                               torch.tensor([-0.5773503, -0.5773503, -0.5773503, 1.0]))
    # equal rewards: 0 / (0 + eps) = 0, and with eps = 0 still 0 rather than NaN
    assert (normalize_per_prompt(torch.ones(3), torch.zeros(3, dtype=torch.long), eps=0.0) == 0).all()


def test_batch_and_no_std_scaling_hand_computed():
    # prompt 0: rewards 0.0, 0.2 -> centred -0.1, +0.1 (spread that matters)
    # prompt 1: rewards 0.500, 0.502 -> centred -0.001, +0.001 (all leaves alike)
    # prompt 2: a single leaf -> 0
    rewards = torch.tensor([0.0, 0.2, 0.500, 0.502, 0.9])
    ids = torch.tensor([0, 0, 1, 1, 2])
    centred = torch.tensor([-0.1, 0.1, -0.001, 0.001, 0.0])
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, std="none"), centred)
    # batch std = sqrt((0.01 + 0.01 + 1e-6 + 1e-6 + 0) / 5) = sqrt(0.0040004) = 0.06324872;
    # 0.1 / 0.06324872 = 1.5810598, 0.001 / 0.06324872 = 0.0158106
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, eps=0.0, std="batch"),
                               torch.tensor([-1.5810598, 1.5810598, -0.0158106, 0.0158106, 0.0]))
    # per-prompt std blows prompt 1's 0.002 spread up to the same +-1 as prompt 0's real one
    torch.testing.assert_close(normalize_per_prompt(rewards, ids, eps=0.0, std="prompt"),
                               torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="std must be one of"):
        normalize_per_prompt(rewards, ids, std="group")


def test_normalize_per_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        normalize_per_prompt(torch.tensor([1.0, NAN]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="clip"):
        normalize_per_prompt(torch.ones(2), torch.zeros(2, dtype=torch.long), clip=0.0)
    with pytest.raises(ValueError, match=r"\(L,\)"):
        normalize_per_prompt(torch.ones(2), torch.zeros(3, dtype=torch.long))


# Explicit tree:        0
#                     /   \
#                    1     2
#                   / \   / \
#                  3   4 5   6      leaf values 1, -1, 2, 0
PARENT = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
LEAVES = torch.tensor([NAN, NAN, NAN, 1.0, -1.0, 2.0, 0.0])


@pytest.mark.parametrize("fn", BOTH)
def test_uniform_propagation_hand_computed(fn):
    # V1 = (1 - 1) / 2 = 0; V2 = (2 + 0) / 2 = 1; V0 = (0 + 1) / 2 = 0.5
    torch.testing.assert_close(fn(PARENT, LEAVES), torch.tensor([0.5, 0.0, 1.0, 1.0, -1.0, 2.0, 0.0]))


@pytest.mark.parametrize("fn", BOTH)
def test_softmax_propagation_hand_computed(fn):
    # log-probs of the edges into nodes 1..6: node 1: 0, node 2: log 3, node 3: log 3, node 4: 0, 5: 0, 6: 0
    logp = torch.tensor([NAN, 0.0, math.log(3), math.log(3), 0.0, 0.0, 0.0])  # root entry is ignored
    # weights under node 1: softmax(log 3, 0) = (3/4, 1/4) -> V1 = 0.75 * 1 + 0.25 * (-1) = 0.5
    # under node 2: softmax(0, 0) = (1/2, 1/2) -> V2 = 1
    # under the root: softmax(0, log 3) = (1/4, 3/4) -> V0 = 0.25 * 0.5 + 0.75 * 1 = 0.875
    out = fn(PARENT, LEAVES, weighting="softmax", log_probs=logp)
    torch.testing.assert_close(out, torch.tensor([0.875, 0.5, 1.0, 1.0, -1.0, 2.0, 0.0]))
    # temperature 2: weights under node 1 are exp(log 3 / 2) : 1 = sqrt 3 : 1 -> 0.6339746, 0.3660254
    # V1 = 0.6339746 - 0.3660254 = 0.2679492; V0 = 0.3660254 * 0.2679492 + 0.6339746 * 1 = 0.7320508
    out_t = fn(PARENT, LEAVES, weighting="softmax", log_probs=logp, temperature=2.0)
    torch.testing.assert_close(out_t[:3], torch.tensor([0.7320508, 0.2679492, 1.0]))


@pytest.mark.parametrize("fn", BOTH)
def test_chains_forest_and_node_order(fn):
    # flat variant: two chains 0 -> 1 -> 2 (leaf 0.3) and 3 -> 4 (leaf -2); nodes listed children-first
    parent = torch.tensor([1, 2, -1, 4, -1])
    leaves = torch.tensor([0.3, NAN, NAN, -2.0, NAN])
    torch.testing.assert_close(fn(parent, leaves), torch.tensor([0.3, 0.3, 0.3, -2.0, -2.0]))


def test_uniform_root_value_of_a_full_tree_is_the_leaf_mean():
    t = build_tree(10, 3, 3, 0)
    leaves = torch.full((t.num_nodes,), NAN)
    leaves[t.leaves()] = torch.arange(27, dtype=torch.float32)
    values = node_values(t.parent, leaves)
    assert values[0].item() == pytest.approx(13.0)  # mean of 0..26
    # node 1 holds leaves 0..8 (its 9 grandchildren in breadth-first order): mean 4
    assert values[1].item() == pytest.approx(4.0)


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("parent, leaves, kwargs, match", [
    ([-1, 0, 0], [NAN, 1.0, NAN], {}, "no children and no finite leaf value"),
    ([-1, 0, 0], [0.5, 1.0, 2.0], {}, "children but also a leaf value"),
    ([-1, 0], [NAN, 1.0], {"weighting": "softmax"}, "log_probs"),
    ([-1, 0], [NAN, 1.0], {"weighting": "max"}, "weighting"),
    ([-1, 5], [NAN, 1.0], {}, "parent indices"),
    ([2, 0, 1, -1], [NAN, NAN, NAN, 1.0], {}, "cycle"),
])
def test_propagation_errors(fn, parent, leaves, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.tensor(parent), torch.tensor(leaves), **kwargs)


def test_node_depths():
    assert node_depths(torch.tensor([1, 2, -1, 4, -1])).tolist() == [2, 1, 0, 1, 0]


@st.composite
def random_forests(draw):
    """Parent arrays of random forests in a random node order, with leaf values and log-probs."""
    m = draw(st.integers(1, 40))
    # node i's parent is -1 or an earlier node (a forest), then relabel by a random permutation
    raw = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, m)]
    perm = torch.tensor(draw(st.permutations(range(m))))  # perm[i] = new label of old node i
    parent = torch.full((m,), -1, dtype=torch.long)
    for i, p in enumerate(raw):
        parent[perm[i]] = perm[p] if p >= 0 else -1
    is_leaf = torch.ones(m, dtype=torch.bool)
    is_leaf[parent[parent >= 0]] = False
    values = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=m, max_size=m)))
    leaves = torch.where(is_leaf, values, torch.full((m,), NAN))
    log_probs = torch.tensor(draw(st.lists(st.floats(-50, 5), min_size=m, max_size=m)))
    return parent, leaves, log_probs


@settings(max_examples=150, deadline=None)
@given(forest=random_forests(), weighting=st.sampled_from(["uniform", "softmax"]),
       temperature=st.floats(0.05, 10.0))
def test_vectorised_equals_recursive_on_random_forests(forest, weighting, temperature):
    parent, leaves, log_probs = forest
    fast = node_values(parent, leaves, weighting, log_probs, temperature)
    slow = node_values_recursive(parent, leaves, weighting, log_probs, temperature)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # leaves keep their value; every value lies within the range of the leaf values
    is_leaf = ~torch.isnan(leaves)
    torch.testing.assert_close(fast[is_leaf], leaves[is_leaf])
    lo, hi = leaves[is_leaf].min(), leaves[is_leaf].max()
    assert (fast >= lo - 1e-5).all() and (fast <= hi + 1e-5).all()


def test_running_prompt_stats_by_hand():
    """DDPO's tracker, buffer 3, min_count 2, eps 0: new rewards join the buffer first; a prompt
    with fewer than 2 rewards uses the whole call's mean/std (population)."""
    from treegrpo_ray.algo.advantages import RunningPromptStats
    s = RunningPromptStats(buffer=3, min_count=2, eps=0.0)
    # call 1: a -> [1, 3] (2 rewards: its own mean 2, std 1); b -> [2] (1 < 2: the call's mean 2)
    a1 = s.normalize(torch.tensor([1.0, 3.0, 2.0]), ["a", "a", "b"])
    torch.testing.assert_close(a1, torch.tensor([-1.0, 1.0, 0.0]))
    # call 2: a -> [1, 3, 5] mean 3, std sqrt(8/3); b -> [2, 4] mean 3, std 1
    a2 = s.normalize(torch.tensor([5.0, 4.0]), ["a", "b"])
    torch.testing.assert_close(a2, torch.tensor([2 / (8 / 3) ** 0.5, 1.0]))
    # the state carries over: a copy from state() normalises call 3 exactly like the original
    copy = RunningPromptStats(buffer=3, min_count=2, eps=0.0, state=s.state())
    # call 3: a's buffer keeps the last 3 -> [3, 5, 7] mean 5, std sqrt(8/3)
    a3 = s.normalize(torch.tensor([7.0]), ["a"])
    torch.testing.assert_close(a3, torch.tensor([2 / (8 / 3) ** 0.5]))
    torch.testing.assert_close(copy.normalize(torch.tensor([7.0]), ["a"]), a3)
    assert s.state() == {"a": [3.0, 5.0, 7.0], "b": [2.0, 4.0]}


def test_leaf_advantages_with_a_custom_normalizer_clips_after_it():
    from treegrpo_ray.algo.advantages import leaf_advantages
    raw = {"x": torch.tensor([0.0, 1.0, float("nan"), 3.0])}
    seen = []

    def normalize(r, ids):  # receives only the finite leaves
        seen.append((r.tolist(), ids.tolist()))
        return r * 10
    adv, m = leaf_advantages(raw, {"x": 1.0}, torch.tensor([0, 0, 1, 1]), clip=5.0, normalize=normalize)
    assert seen == [([0.0, 1.0, 3.0], [0, 0, 1])]
    assert adv.tolist() == [0.0, 5.0, 0.0, 5.0] and m["reward/dropped"] == 1.0
    with pytest.raises(ValueError, match="mode='raw'"):
        leaf_advantages(raw, {"x": 1.0}, torch.tensor([0, 0, 1, 1]), mode="advantage", normalize=normalize)
