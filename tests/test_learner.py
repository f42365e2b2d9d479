"""GRPOLearner on a mock policy (one scalar parameter): the update raises the likelihood of
positive-advantage children, and the guard never lets a non-finite update reach the weights."""
import contextlib
from dataclasses import replace

import pytest
import torch

from treegrpo_ray.algo.sde import flow_sde_step
from treegrpo_ray.algo.advantages import child_advantages
from treegrpo_ray.learning.learner import GRPOLearner, TrainingDiverged, UpdateChangedNothing
from treegrpo_ray.types import TreeBatch


class ConstantVelocityPolicy(torch.nn.Module):
    """velocity = w everywhere; w is the only trainable parameter."""

    def __init__(self, w: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    poison = False  # when set, the forward returns NaN (a diverged model / bad kernel)

    def predict(self, latents, sigmas, prompts, module=None, uncond_grad=True):  # no CFG: uncond_grad moot
        v = (module or self).w * torch.ones_like(latents)
        return v * float("nan") if self.poison else v

    def sde_step(self, x, out, s, s_next, noise_level, **kw):
        return flow_sde_step(x, out, s, s_next, noise_level, **kw)

    def trainable_parameters(self):
        return [self.w]

    def live_state(self):
        return {"w": self.w}

    @contextlib.contextmanager
    def reference(self):
        yield


def one_decision_batch(policy, k=2, seed=0):
    """A root (node 0) with k children (nodes 1..k), each child a leaf; sampled from the policy."""
    x = torch.zeros(1, 1, 2, 2)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        v = policy.predict(x, None, None)
        step = flow_sde_step(x, v, sigmas[1:2], sigmas[2:3], 0.7, n_children=k,
                             generator=torch.Generator().manual_seed(seed))
    return TreeBatch(
        prompts=["p"], sigmas=sigmas, latents=x, step_index=torch.tensor([1]), children=step.sample,
        old_log_probs=step.log_prob, child_node=torch.arange(1, k + 1).unsqueeze(0), decision_prompt=torch.tensor([0]),
        parent=torch.tensor([-1] + [0] * k), node_log_prob=torch.cat([torch.zeros(1), step.log_prob[0]]),
        leaf_latents=step.sample[0], leaf_node=torch.arange(1, k + 1), leaf_prompt=torch.zeros(k, dtype=torch.long),
        tree_index=torch.zeros(k, dtype=torch.long)).validate()


def test_child_advantages_read_child_values():
    policy = ConstantVelocityPolicy()
    batch = one_decision_batch(policy, k=2)
    adv = child_advantages(batch, torch.tensor([1.0, -1.0]))
    assert adv.tolist() == [[1.0, -1.0]]
    # a dropped (NaN) leaf contributes a neutral 0, never NaN
    adv = child_advantages(batch, torch.tensor([float("nan"), -1.0]))
    assert adv.tolist() == [[0.0, -1.0]]


def test_parent_baseline_compares_siblings_hand_computed():
    # k=2, d=2: root 0 -> nodes 1, 2; node 1 -> leaves 3, 4; node 2 -> leaves 5, 6.
    # leaf advantages 1, 3, -1, -3 -> V(1) = 2, V(2) = -2, V(0) = 0 (uniform means)
    from types import SimpleNamespace
    batch = SimpleNamespace(parent=torch.tensor([-1, 0, 0, 1, 1, 2, 2]), leaf_node=torch.tensor([3, 4, 5, 6]),
                            child_node=torch.tensor([[1, 2], [3, 4], [5, 6]]), node_log_prob=torch.zeros(7))
    leaf_adv = torch.tensor([1.0, 3.0, -1.0, -3.0])
    # paper: A(u -> c) = V(c); the depth-2 edges under node 1 are all positive although
    # leaf 3 is its node's worse child
    assert child_advantages(batch, leaf_adv).tolist() == [[2.0, -2.0], [1.0, 3.0], [-1.0, -3.0]]
    # parent baseline: A(u -> c) = V(c) - V(u): node 1: 1 - 2, 3 - 2; node 2: -1 + 2, -3 + 2
    assert child_advantages(batch, leaf_adv, baseline="parent").tolist() == [[2.0, -2.0], [-1.0, 1.0], [1.0, -1.0]]
    chain = SimpleNamespace(parent=torch.tensor([-1, 0]), leaf_node=torch.tensor([1]),
                            child_node=torch.tensor([[1]]), node_log_prob=torch.zeros(2))
    with pytest.raises(ValueError, match="K >= 2"):
        child_advantages(chain, torch.tensor([1.0]), baseline="parent")


def test_update_raises_logprob_of_the_better_child():
    policy = ConstantVelocityPolicy()
    batch = one_decision_batch(policy, k=2)
    learner = GRPOLearner(policy, lr=0.05, clip_eps=0.2, noise_level=0.7, grad_clip=0.0)
    metrics = learner.update(batch, torch.tensor([1.0, -1.0]))
    with torch.no_grad():
        v = policy.predict(batch.latents, None, None)
        new = flow_sde_step(batch.latents, v, batch.sigmas[1:2], batch.sigmas[2:3], 0.7, prev_sample=batch.children)
    assert policy.w.item() != 0.0
    # one scalar parameter moves both children; what GRPO must raise is the +1 child's log-prob
    # relative to the -1 child's (loss = -(rho_0 - rho_1) / 2 at A = [+1, -1])
    assert (new.log_prob[0, 0] - new.log_prob[0, 1]) > (batch.old_log_probs[0, 0] - batch.old_log_probs[0, 1])
    assert learner.version == 1 and metrics["learner/skipped"] == 0.0
    # first minibatch of an on-policy update: ratio == 1 exactly, nothing clipped
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics["loss/clip_frac"] == 0.0


def test_nonfinite_update_is_skipped_then_stops():
    policy = ConstantVelocityPolicy()
    batch = one_decision_batch(policy, k=2)
    learner = GRPOLearner(policy, lr=0.05, noise_level=0.7, max_bad_updates=2)
    policy.poison = True
    bad = torch.tensor([1.0, -1.0])
    m = learner.update(batch, bad)
    assert m["learner/skipped"] == 1.0 and policy.w.item() == 0.0 and torch.isfinite(policy.w).all()
    with pytest.raises(TrainingDiverged, match="2 consecutive updates skipped"):
        learner.update(replace(batch, policy_version=1), bad)  # a skipped update still counts a version
    assert policy.w.item() == 0.0


def test_state_roundtrip():
    policy = ConstantVelocityPolicy()
    batch = one_decision_batch(policy)
    learner = GRPOLearner(policy, lr=0.05, noise_level=0.7)
    learner.update(batch, torch.tensor([1.0, -1.0]))
    twin = GRPOLearner(ConstantVelocityPolicy(policy.w.item()), lr=0.05, noise_level=0.7)
    twin.load_state(learner.state())
    assert twin.version == 1
    batch = replace(batch, policy_version=1)  # as if grown by the weights both now hold
    learner.update(batch, torch.tensor([1.0, -1.0]), iteration=1)
    twin.update(batch, torch.tensor([1.0, -1.0]), iteration=1)
    assert twin.policy.w.item() == pytest.approx(policy.w.item(), abs=1e-7)


def _stale_setup(stale_correction: str):
    """A learner one update ahead of the batch it then trains on (the batch was grown at version 0)."""
    policy = ConstantVelocityPolicy()
    stale = one_decision_batch(policy, k=2, seed=1)
    learner = GRPOLearner(policy, lr=0.05, clip_eps=1e-4, noise_level=0.7, grad_clip=0.0,
                          stale_correction=stale_correction)
    learner.update(one_decision_batch(policy, k=2, seed=0), torch.tensor([1.0, -1.0]))  # weights move, version 1
    return policy, stale, learner


def test_stale_tree_is_clipped_against_the_proximal_policy():
    policy, stale, learner = _stale_setup("decoupled")
    assert policy.w.item() != 0.0 and learner.version == 1 and stale.policy_version == 0
    with torch.no_grad():  # by hand: the stale children's log-probs under the weights the update starts from
        v = policy.predict(stale.latents, None, None)
        prox = flow_sde_step(stale.latents, v, stale.sigmas[1:2], stale.sigmas[2:3], 0.7,
                             prev_sample=stale.children).log_prob
    weight = (prox - stale.old_log_probs).exp()
    m = learner.update(stale, torch.tensor([1.0, -1.0]))
    # one minibatch, one step: its ratio is taken against the proximal policy, so it starts at 1
    # exactly and nothing is clipped even at the authors' eps 1e-4; the edge weights pi_prox / pi_tree
    assert m["staleness/lag"] == 1.0
    assert m["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["loss/clip_frac"] == 0.0
    assert m["staleness/is_weight_mean"] == pytest.approx(weight.mean().item(), rel=1e-6)
    assert m["staleness/is_weight_max"] == pytest.approx(weight.max().item(), rel=1e-6)
    assert weight.sub(1).abs().max() > 1e-3          # the weights did move: the correction is not a no-op


def test_without_correction_a_stale_tree_is_clipped_away():
    """What the correction is for: at eps 1e-4 a one-version-old tree's ratios all lie outside the
    trust region on the clipped side, no gradient is left, and the learner's guard stops the run."""
    _, stale, learner = _stale_setup("none")
    with pytest.raises(UpdateChangedNothing, match="no gradient reached"):
        learner.update(stale, torch.tensor([1.0, -1.0]))


def _with_means(batch, policy):
    """The batch as a keep_means sampler returns it: each decision's Gaussian mean kept."""
    with torch.no_grad():
        v = policy.predict(batch.latents, None, None)
        mean = flow_sde_step(batch.latents, v, batch.sigmas[1:2], batch.sigmas[2:3], 0.7).mean
    return replace(batch, old_means=mean).validate()


def test_recentred_stale_tree_trains_as_its_children_moved_on_policy():
    """stale_correction=recenter, by hand: the update on a one-version-old tree equals an
    on-policy update on the same tree with every child moved by mu_prox - mu_tree (same noise).
    Advantages 1 and 0: siblings share the lag's score term (mu_tree - mu_theta) / s^2, so it
    cancels when their advantages sum to 0 and shows when they do not (V(parent) != 0)."""
    ADV = torch.tensor([1.0, 0.0])
    policy, stale, learner = _stale_setup("recenter")
    w0 = 0.0                                          # the weights that grew `stale`
    stale = _with_means(stale, ConstantVelocityPolicy(w0))
    w1 = policy.w.item()
    # mean = x * a + v * b * delta with v = w: one lag moves it by (w1 - w0) * b * delta everywhere
    sig, sig_next = stale.sigmas[1], stale.sigmas[2]
    sigma_t = 0.7 * torch.sqrt(sig / (1 - sig))
    delta = sig_next - sig
    shift = (w1 - w0) * (1 + sigma_t ** 2 * (1 - sig) / (2 * sig)) * delta
    std = sigma_t * torch.sqrt(-delta)
    moved = stale.children + shift
    with torch.no_grad():
        logp = flow_sde_step(stale.latents, policy.predict(stale.latents, None, None), sig[None], sig_next[None], 0.7,
                             prev_sample=moved).log_prob
    torch.testing.assert_close(logp, stale.old_log_probs, atol=1e-6, rtol=0)  # same noise: same log-prob
    twin_policy, _, twin = _stale_setup("none")
    on_policy = replace(stale, children=moved, old_log_probs=logp, policy_version=1, old_means=torch.empty(0))

    m = learner.update(stale, ADV)
    t = twin.update(on_policy, ADV)
    assert m["staleness/lag"] == 1.0 and t["staleness/lag"] == 0.0
    assert m["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["loss/clip_frac"] == 0.0
    assert m["staleness/shift_over_std"] == pytest.approx(abs(float(shift / std)), rel=1e-5)
    assert policy.w.item() == pytest.approx(twin_policy.w.item(), abs=1e-7)
    # and it is not what the decoupled correction does with the unmoved children: their score
    # keeps the lag's term
    _, dec_stale, dec = _stale_setup("decoupled")
    d = dec.update(dec_stale, ADV)
    assert m["learner/grad_norm"] == pytest.approx(t["learner/grad_norm"], rel=1e-5)
    assert abs(d["learner/grad_norm"] - m["learner/grad_norm"]) > 0.1 * m["learner/grad_norm"]


def test_recenter_without_the_samplers_means_is_refused():
    _, stale, learner = _stale_setup("recenter")
    with pytest.raises(ValueError, match="old_means"):
        learner.update(stale, torch.tensor([1.0, -1.0]))


def test_on_policy_update_is_the_same_with_or_without_correction():
    ws = []
    for mode in ("recenter", "decoupled", "none"):
        policy = ConstantVelocityPolicy()
        learner = GRPOLearner(policy, lr=0.05, clip_eps=0.2, noise_level=0.7, grad_clip=0.0, stale_correction=mode)
        m = learner.update(one_decision_batch(policy, k=2), torch.tensor([1.0, -1.0]))
        assert m["staleness/lag"] == 0.0 and "staleness/is_weight_mean" not in m
        ws.append(policy.w.item())
    assert ws[0] == ws[1] == ws[2]


class AnchoredPolicy(ConstantVelocityPolicy):
    """The reference policy is w = 0 (the start), whatever w has become."""

    @contextlib.contextmanager
    def reference(self):
        w = self.w.data.clone()
        self.w.data.zero_()
        try:
            yield
        finally:
            self.w.data.copy_(w)


def test_kl_forms_differ_by_minus_dt():
    """The decision steps sigma 0.5 -> 0, dt = -0.5: the exact KL is 1 / 0.5 = 2x Flow-GRPO's."""
    kls = {}
    for form in ("flow_grpo", "exact"):
        policy = AnchoredPolicy(0.3)       # the reference sits at 0, the policy at 0.3
        batch = one_decision_batch(policy, k=2)
        learner = GRPOLearner(policy, lr=0.05, noise_level=0.7, kl_beta=0.1, kl_form=form)
        kls[form] = learner.update(batch, torch.tensor([1.0, -1.0]))["loss/kl_ref"]
    assert kls["flow_grpo"] > 0
    assert kls["exact"] == pytest.approx(2 * kls["flow_grpo"], rel=1e-6)
