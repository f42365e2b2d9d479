"""TreeSampler on the tiny saved SD3 pipeline: documented shapes of the three variants, the node
forest, NFE actually spent, old log-probs reproduced by re-scoring, determinism, chunking."""
import pytest
import torch

from treegrpo_ray.algo.advantages import node_values
from treegrpo_ray.algo.sde import flow_sde_step, gaussian_log_prob
from treegrpo_ray.algo.tree import count_nfe, count_nfe_flat
from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.sampling import TreeSampler
from treegrpo_ray.types import _TENSOR_FIELDS, merge_batches

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square"]
T, K, D, P = 6, 2, 2, 1  # steps, branching, window depth, window start


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir):
    return DiffusionPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8)


def sampler(policy, variant, **kw):
    args = dict(variant=variant, num_steps=T, k=K, depth=D, noise_level=0.7, group_size=3)
    return TreeSampler(policy, **{**args, **kw})


def rescore(policy, batch):
    """The learner's view: one velocity per decision, then log-probs of the stored children."""
    sig, sig_next = batch.sigmas[batch.step_index], batch.sigmas[batch.step_index + 1]
    prompts = [batch.prompts[i] for i in batch.decision_prompt.tolist()]
    with torch.no_grad():
        v = policy.predict(batch.latents, sig, prompts)
    return flow_sde_step(batch.latents, v, sig, sig_next, 0.7, prev_sample=batch.children)


@pytest.fixture(scope="module")
def tree_batch(policy):
    return sampler(policy, "tree", trees_per_prompt=2).sample(PROMPTS, window_start=P, seed=0, policy_version=3)


def test_tree_shapes_and_forest(tree_batch):
    b = tree_batch
    # R = 2 prompts * 2 trees = 4; per tree D = (2^2-1)/(2-1) = 3 decisions, M_t = 7 nodes, 4 leaves
    assert (b.num_decisions, b.children.shape[1], b.parent.shape[0], b.num_leaves) == (12, 2, 28, 16)
    assert b.latents.shape == (12, 4, 8, 8) and b.children.shape == (12, 2, 4, 8, 8)
    assert b.step_index.tolist() == [1, 2, 2] * 4  # root at step p = 1, its 2 children at step 2
    assert b.parent[:7].tolist() == [-1, 0, 0, 1, 1, 2, 2]  # build_tree's breadth-first order
    assert b.parent[7:14].tolist() == [-1, 7, 7, 8, 8, 9, 9]  # tree 1 offset by M_t = 7
    assert b.leaf_node[:4].tolist() == [3, 4, 5, 6] and b.tree_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert b.leaf_prompt.tolist() == [0] * 8 + [1] * 8 and b.decision_prompt.tolist() == [0] * 6 + [1] * 6
    assert b.policy_version == 3 and b.variant == "tree" and b.prompts == PROMPTS
    assert b.window_start == 1
    assert torch.equal(b.node_log_prob[b.child_node], b.old_log_probs)
    assert (b.node_log_prob[b.parent == -1] == 0).all()


def test_tree_children_are_the_next_level_latents(tree_batch):
    b = tree_batch
    owner = {}  # node -> (decision, child slot)
    for n in range(b.num_decisions):
        for c in range(b.children.shape[1]):
            owner[int(b.child_node[n, c])] = (n, c)
    for n in range(b.num_decisions):
        node = int(b.parent[b.child_node[n, 0]])  # the decision's own node
        if b.parent[node] >= 0:
            pn, pc = owner[node]
            assert torch.equal(b.latents[n], b.children[pn, pc])
    # the k children of one node come from one Gaussian but different noise
    assert (b.children[:, 0] - b.children[:, 1]).abs().amax() > 1e-2


def test_tree_old_log_probs_reproduced_by_rescoring(policy, tree_batch):
    step = rescore(policy, tree_batch)
    torch.testing.assert_close(step.log_prob, tree_batch.old_log_probs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("p", [0, 2, T - D])
def test_nfe_is_spent_and_equals_count_nfe(policy, p):
    rows = []
    hook = policy.denoiser.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        b = sampler(policy, "tree").sample(PROMPTS, window_start=p, seed=1)
    finally:
        hook.remove()
    # p=0: 0 + 3 + 4*(6-0-2) = 19 per tree;  p=2: 2 + 3 + 4*2 = 13;  p=4: 4 + 3 + 0 = 7
    assert b.nfe == 2 * count_nfe(T, K, D, p) == 2 * {0: 19, 2: 13, 4: 7}[p]
    assert sum(rows) == 2 * b.nfe  # every call is one CFG pair per node: uncond + cond rows
    assert len(rows) == T  # all nodes of a level (both trees, both prompts) in ONE call per step


def test_flat_shapes_chains_and_nfe(policy):
    b = sampler(policy, "flat", train_fraction=0.5, flat_steps="batch").sample(PROMPTS, window_start=0, seed=2)
    # R = 2 prompts * 3 trajectories; round(0.5 * 6) = 3 trained steps each -> N = 18, M = 6 * 4
    assert (b.num_decisions, b.children.shape[1], b.parent.shape[0], b.num_leaves) == (18, 1, 24, 6)
    assert b.nfe == 2 * count_nfe_flat(T, 3) == 36
    steps = b.step_index.view(6, 3)
    assert (steps == steps[0]).all() and steps[0].tolist() == sorted(set(steps[0].tolist()))
    assert b.parent[:4].tolist() == [-1, 0, 1, 2] and b.leaf_node.tolist() == [3, 7, 11, 15, 19, 23]
    assert b.tree_index.tolist() == [0, 0, 0, 1, 1, 1] and b.leaf_prompt.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(rescore(policy, b).log_prob, b.old_log_probs, atol=1e-4, rtol=0)
    # every edge of a chain inherits its trajectory's value (what flat GRPO trains on)
    leaf_values = torch.full((24,), float("nan"))
    leaf_values[b.leaf_node] = torch.arange(6.0)
    assert node_values(b.parent, leaf_values)[b.child_node[:, 0]].view(6, 3).tolist() == [[i] * 3 for i in range(6)]


def test_mix_shapes_window_and_chain_continuity(policy):
    b = sampler(policy, "mix").sample(PROMPTS, window_start=2, seed=4)
    # R = 6 trajectories, d = 2 window steps each -> N = 12, M = 6 * 3, L = 6; T calls per trajectory
    assert (b.num_decisions, b.children.shape[1], b.parent.shape[0], b.num_leaves) == (12, 1, 18, 6)
    assert b.step_index.tolist() == [2, 3] * 6 and b.nfe == 36
    assert torch.equal(b.latents[1::2], b.children[0::2, 0])  # consecutive window steps chain up
    torch.testing.assert_close(rescore(policy, b).log_prob, b.old_log_probs, atol=1e-4, rtol=0)


def test_flat_dancegrpo_draws_steps_per_trajectory_and_never_the_last(policy):
    # DanceGRPO: int((6 - 1) * 0.6) = 3 steps per trajectory, each its own draw from steps 0..4
    b = sampler(policy, "flat", train_fraction=0.6).sample(PROMPTS, window_start=0, seed=7)
    steps = b.step_index.view(6, 3)
    assert b.num_decisions == 18 and (steps < T - 1).all()
    assert all(row == sorted(set(row)) for row in steps.tolist())
    assert len({tuple(row) for row in steps.tolist()}) > 1  # 10 subsets; 6 rows all alike: chance 1e-5
    # each trajectory's stored latents are the states its own steps start from: the chain holds
    assert (steps[:, 1:] == steps[:, :-1] + 1).any()
    assert torch.equal(b.latents.view(6, 3, -1)[:, 1:][steps[:, 1:] == steps[:, :-1] + 1],
                       b.children.view(6, 3, -1)[:, :-1][steps[:, 1:] == steps[:, :-1] + 1])
    torch.testing.assert_close(rescore(policy, b).log_prob, b.old_log_probs, atol=1e-4, rtol=0)


def test_flat_flow_grpo_trains_the_leading_steps(policy):
    # Flow-GRPO: int(6 * 0.5) = 3 leading steps 0, 1, 2, consecutive so each child is the next state
    b = sampler(policy, "flat", train_fraction=0.5, flat_steps="flow_grpo").sample(PROMPTS, window_start=0, seed=2)
    assert b.step_index.tolist() == [0, 1, 2] * 6
    assert torch.equal(b.latents.view(6, 3, -1)[:, 1:], b.children.view(6, 3, -1)[:, :-1])
    torch.testing.assert_close(rescore(policy, b).log_prob, b.old_log_probs, atol=1e-4, rtol=0)


def test_flat_trained_steps_follow_train_fraction_and_seed(policy):
    s = sampler(policy, "flat", train_fraction=0.6, flat_steps="batch")
    seen = set()
    for seed in range(4):
        steps = s.sample(PROMPTS[:1], window_start=0, seed=seed).step_index[:4].tolist()
        assert len(set(steps)) == 4  # round(0.6 * 6) = 4 distinct steps per trajectory
        seen.add(tuple(steps))
    assert len(seen) > 1  # 15 possible subsets; 4 seeds giving one subset has chance (1/15)^3


def test_shared_roots_and_shared_initial_noise(policy):
    # noise_level 0 makes every step deterministic: leaves then differ only through x_T
    tree = sampler(policy, "tree", noise_level=0.0, trees_per_prompt=2).sample(PROMPTS[:1], window_start=0, seed=5)
    leaves = tree.leaf_latents.view(2, 4, -1)
    assert torch.equal(leaves[:, 1:], leaves[:, :1].expand(-1, 3, -1))  # one root per tree
    assert (leaves[0, 0] - leaves[1, 0]).abs().max() > 1e-2              # a new root per tree
    shared = sampler(policy, "flat", noise_level=0.0, share_initial_noise=True).sample(PROMPTS[:1], window_start=0,
                                                                                        seed=5)
    assert torch.equal(shared.leaf_latents[1:], shared.leaf_latents[:1].expand(2, -1, -1, -1))
    own = sampler(policy, "flat", noise_level=0.0).sample(PROMPTS[:1], window_start=0, seed=5)
    assert (own.leaf_latents[0] - own.leaf_latents[1]).abs().max() > 1e-2


def test_same_seed_same_batch_and_chunking_is_invisible(policy):
    a = sampler(policy, "tree").sample(PROMPTS, window_start=1, seed=7)
    b = sampler(policy, "tree").sample(PROMPTS, window_start=1, seed=7)
    c = sampler(policy, "tree", max_batch=3).sample(PROMPTS, window_start=1, seed=7)
    d = sampler(policy, "tree").sample(PROMPTS, window_start=1, seed=8)
    for f in _TENSOR_FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
        torch.testing.assert_close(getattr(a, f), getattr(c, f), atol=1e-5, rtol=1e-5)
    assert c.nfe == a.nfe
    assert (a.leaf_latents - d.leaf_latents).abs().max() > 1e-2


def test_bad_arguments_are_rejected(policy):
    with pytest.raises(ValueError, match="variant"):
        sampler(policy, "forest")
    with pytest.raises(ValueError, match="window"):
        sampler(policy, "tree").sample(PROMPTS, window_start=T - D + 1, seed=0)
    with pytest.raises(ValueError, match="prompts"):
        sampler(policy, "tree").sample("a red circle", window_start=0, seed=0)


def test_batches_of_two_samplers_merge(policy, tree_batch):
    from treegrpo_ray.types import merge_batches

    other = sampler(policy, "tree").sample(PROMPTS[::-1], window_start=P, seed=9)
    merged = merge_batches([tree_batch, other])
    # 16 + 8 leaves; tree ids 0..3 then 4..5; prompts de-duplicated by string (the second batch's
    # prompt 0 is "a blue square" = merged prompt 1)
    assert merged.num_leaves == 24 and merged.tree_index[16:].tolist() == [4] * 4 + [5] * 4
    assert merged.leaf_prompt[16:20].tolist() == [1] * 4 and merged.nfe == tree_batch.nfe + other.nfe


def test_the_drivers_info_merge_is_the_learners_batch_merge(policy, tree_batch):
    """The driver normalises rewards on merge_infos(infos) while the learner trains on
    merge_batches(batches): their leaf order and prompt indices must agree, or advantages land on
    the wrong leaves."""
    from treegrpo_ray.system import split_leaves
    from treegrpo_ray.types import merge_batches, merge_infos

    other = sampler(policy, "tree").sample(PROMPTS[::-1], window_start=P, seed=9)
    other.policy_version = 5
    parts = [split_leaves(b) for b in (tree_batch, other)]
    infos = [b.info(leaves.nbytes) for b, leaves in parts]
    merged, info = merge_batches([b for b, _ in parts]), merge_infos(infos)
    assert info.prompts == merged.prompts and torch.equal(info.leaf_prompt, merged.leaf_prompt)
    assert (info.nfe, info.num_decisions, info.num_leaves) == (merged.nfe, merged.num_decisions, merged.num_leaves)
    assert info.policy_version == merged.policy_version == 3 and info.trees == 6  # the older; 4 + 2 trees
    # bytes: every tensor of both batches, their split-off leaf latents included
    assert info.nbytes == tree_batch.nbytes + other.nbytes
    assert info.leaf_bytes == tree_batch.leaf_latents.nbytes + other.leaf_latents.nbytes
    assert infos[0].nbytes == sum(getattr(tree_batch, f).nbytes for f in _TENSOR_FIELDS)


@pytest.mark.parametrize("variant", ["tree", "flat"])
def test_kept_means_are_each_decisions_gaussian(policy, variant):
    """keep_means (stale_correction=recenter): old_means[u] is the mean the children of u were
    drawn around: re-scoring gives the same mean, and the children's log-probs under
    N(old_means, s^2) are the stored ones. Without keep_means the field stays empty."""
    kept = sampler(policy, variant, keep_means=True).sample(PROMPTS, window_start=P, seed=0)
    plain = sampler(policy, variant).sample(PROMPTS, window_start=P, seed=0)
    assert plain.old_means.numel() == 0 and kept.old_means.shape == kept.latents.shape
    assert torch.equal(kept.children, plain.children)  # keeping the means draws nothing extra
    again = rescore(policy, kept)
    torch.testing.assert_close(kept.old_means, again.mean, atol=1e-5, rtol=0)
    logp = gaussian_log_prob(kept.children, kept.old_means[:, None], again.std[:, None])
    torch.testing.assert_close(logp, kept.old_log_probs, atol=1e-5, rtol=0)


def test_old_means_survive_merge_and_mixing_is_refused(policy):
    a = sampler(policy, "tree", keep_means=True).sample(PROMPTS[:1], window_start=P, seed=0)
    b = sampler(policy, "tree", keep_means=True).sample(PROMPTS[1:], window_start=P, seed=1)
    merged = merge_batches([a, b])
    assert torch.equal(merged.old_means, torch.cat([a.old_means, b.old_means]))
    c = sampler(policy, "tree").sample(PROMPTS[1:], window_start=P, seed=1)
    with pytest.raises(ValueError, match="old_means"):
        merge_batches([a, c])
