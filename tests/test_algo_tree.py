"""Tree shape, window choice and NFE accounting (treegrpo_ray/algo/tree.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treegrpo_ray.algo.tree import (build_tree, choose_window, count_nfe, count_nfe_flat, flat_train_count,
                                   flat_trained_steps)

torch.set_num_threads(1)


def test_build_tree_k3_d3_breadth_first():
    t = build_tree(num_steps=10, k=3, depth=3, window_start=2)
    # M = 1 + 3 + 9 + 27 = 40 nodes; decisions = 1 + 3 + 9 = 13; leaves = 27
    assert (t.num_nodes, t.num_decisions, t.num_leaves) == (40, 13, 27)
    # level j starts at (3**j - 1) / 2: 0, 1, 4, 13
    assert [t.level(j) for j in range(4)] == [slice(0, 1), slice(1, 4), slice(4, 13), slice(13, 40)]
    assert t.parent[:4].tolist() == [-1, 0, 0, 0]
    assert t.parent[4:13].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert t.parent[13:16].tolist() == [4, 4, 4] and t.parent[39].item() == 12
    assert t.depth.tolist() == [0] + [1] * 3 + [2] * 9 + [3] * 27
    # node at depth j lives at step window_start + j = 2 + j
    assert t.step[0].item() == 2 and t.step[13].item() == 5 and t.step[39].item() == 5
    assert t.decisions() == slice(0, 13) and t.leaves() == slice(13, 40)
    assert list(t.window) == [2, 3, 4]
    # children of node n are n*k+1 .. n*k+k; check against the parent array
    for n in range(t.num_decisions):
        kids = t.children(n)
        assert torch.nonzero(t.parent == n).squeeze(1).tolist() == list(range(kids.start, kids.stop))


def test_build_tree_k2_d1_window_at_last_step():
    t = build_tree(num_steps=4, k=2, depth=1, window_start=3)
    assert t.parent.tolist() == [-1, 0, 0]
    assert t.step.tolist() == [3, 4, 4]  # the children are the final latents (step T = 4)


@pytest.mark.parametrize("args, match", [
    ((10, 1, 3, 0), "k must be >= 2"),
    ((10, 2, 0, 0), "depth must be >= 1"),
    ((10, 2, 3, 8), "runs past the last step"),
    ((10, 2, 3, -1), "window_start must be >= 0"),
    ((0, 2, 1, 0), "num_steps must be >= 1"),
])
def test_build_tree_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_tree(*args)
    with pytest.raises(ValueError, match=match):
        count_nfe(*args)


def test_level_and_children_reject_out_of_range():
    t = build_tree(5, 2, 2, 0)
    with pytest.raises(ValueError):
        t.level(3)
    with pytest.raises(ValueError):
        t.children(3)  # nodes 3..6 are the deepest level, not decisions


def test_count_nfe_hand_computed():
    # T=10, k=3, d=3, p=2: 2 + (27-1)/2 + 27*(10-2-3) = 2 + 13 + 135 = 150
    assert count_nfe(10, 3, 3, 2) == 150
    # authors' code: T=10, k=2, d=4, p=0: 0 + 15 + 16*6 = 111
    assert count_nfe(10, 2, 4, 0) == 111
    # window at the end: T=10, k=2, d=4, p=6: 6 + 15 + 0 = 21
    assert count_nfe(10, 2, 4, 6) == 21
    assert count_nfe_flat(10, 27) == 270
    with pytest.raises(ValueError):
        count_nfe_flat(10, 0)


def _walk_calls(step: int, num_steps: int, k: int, window: range) -> int:
    """Velocity calls of a naive tree walk: one call per state per step, branch k-ways in the window."""
    if step == num_steps:
        return 0
    calls = 1  # this node's velocity
    branches = k if step in window else 1
    return calls + sum(_walk_calls(step + 1, num_steps, k, window) for _ in range(branches))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(2, 4), st.data())
def test_count_nfe_equals_tree_walk(num_steps, k, data):
    depth = data.draw(st.integers(1, min(num_steps, 4)))
    p = data.draw(st.integers(0, num_steps - depth))
    window = range(p, p + depth)
    assert count_nfe(num_steps, k, depth, p) == _walk_calls(0, num_steps, k, window)
    # and the window's share equals the tree's decisions
    assert build_tree(num_steps, k, depth, p).num_decisions == sum(k ** j for j in range(depth))


def test_choose_window_sliding():
    # T=10, d=4 -> max_start = 6, 7 positions; shift every 2 iterations
    starts = [choose_window(10, 4, "sliding", iteration=i, shift_every=2) for i in range(16)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0]  # iteration 14: 7 % 7 = 0
    # max_start = 2 -> starts cycle 0, 1, 2
    assert [choose_window(10, 4, "sliding", iteration=i, max_start=2) for i in range(4)] == [0, 1, 2, 0]
    # MixGRPO's progressive schedule: start floor(i / tau) * s, back to 0 past max_start.
    # T=10, d=3 -> max_start 7; tau 2, s 3: starts 0, 3, 6, then 9 > 7 -> 0
    starts = [choose_window(10, 3, "sliding", iteration=i, shift_every=2, stride=3) for i in range(8)]
    assert starts == [0, 0, 3, 3, 6, 6, 0, 0]


def test_flat_train_count_as_each_peer_counts():
    # T = 10, f = 0.6: DanceGRPO int(9 * 0.6) = 5; Flow-GRPO int(10 * 0.6) = 6; batch round(6.0) = 6
    assert [flat_train_count(10, 0.6, s) for s in ("dancegrpo", "flow_grpo", "batch")] == [5, 6, 6]
    # Flow-GRPO's SD3 presets: T = 10, f = 0.99 -> int(9.9) = 9, steps 0..8: the last step is left out
    assert flat_train_count(10, 0.99, "flow_grpo") == 9
    assert flat_train_count(16, 0.6, "dancegrpo") == 9  # DanceGRPO's flux script: int(15 * 0.6)
    assert flat_train_count(4, 0.1, "dancegrpo") == 0 and flat_train_count(4, 0.1, "batch") == 1
    with pytest.raises(ValueError, match="style"):
        flat_train_count(10, 0.6, "ddpo")


def test_flat_trained_steps_by_style():
    g = torch.Generator().manual_seed(0)
    assert flat_trained_steps(10, 0.99, "flow_grpo", 2, g).tolist() == [list(range(9))] * 2
    steps = flat_trained_steps(10, 0.6, "dancegrpo", 200, torch.Generator().manual_seed(0))
    assert steps.shape == (200, 5) and (steps.diff(dim=1) > 0).all()     # 5 distinct, ascending
    assert set(steps.flatten().tolist()) == set(range(9))               # every step but the last, T-1 = 9
    assert len({tuple(r) for r in steps.tolist()}) > 100                 # own draw per trajectory
    batch = flat_trained_steps(10, 0.6, "batch", 3, torch.Generator().manual_seed(0))
    assert (batch == batch[0]).all() and batch.shape == (3, 6)
    # same generator draws as the first flat baseline: sorted(randperm(T)[:n])
    assert batch[0].tolist() == sorted(torch.randperm(10, generator=torch.Generator().manual_seed(0))[:6].tolist())
    with pytest.raises(ValueError, match="trains no step"):
        flat_trained_steps(4, 0.1, "dancegrpo", 1, g)


def test_choose_window_random_is_seeded_and_covers_range():
    draws = [choose_window(10, 3, "random", generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same start
    g = torch.Generator().manual_seed(0)
    starts = [choose_window(10, 3, "random", generator=g) for _ in range(400)]
    assert set(starts) == set(range(8))  # uniform over [0, 10-3] = 8 values; 400 draws hit all
    g = torch.Generator().manual_seed(0)
    assert {choose_window(10, 3, "random", generator=g, max_start=1) for _ in range(50)} == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="random"), "explicit torch.Generator"),
    (dict(mode="sliding", shift_every=0), "shift_every"),
    (dict(mode="sliding", stride=0), "stride"),
    (dict(mode="sliding", max_start=8), "max_start"),
    (dict(mode="diagonal"), "unknown window mode"),
])
def test_choose_window_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_window(10, 3, **kwargs)
