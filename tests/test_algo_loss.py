"""GRPO clipped loss and KL penalty (treegrpo_ray/algo/loss.py), hand-computed with clip_eps = 0.2."""
import math

import pytest
import torch

from treegrpo_ray.algo.loss import flow_grpo_kl, grpo_clip_loss, kl_to_reference

torch.set_num_threads(1)
EPS = 0.2


def _case(ratio: float, adv: float):
    """logp_new (with grad), logp_old, advantage for a single edge with the given ratio."""
    logp_old = torch.tensor([-1.0])
    logp_new = (logp_old + math.log(ratio)).requires_grad_(True)
    return logp_new, logp_old, torch.tensor([adv])


def test_clip_above_positive_advantage():
    # A = 2, ratio = 1.5: -A * ratio = -3.0; -A * clip(1.5, 0.8, 1.2) = -2.4; max = -2.4 (clipped)
    logp_new, logp_old, adv = _case(1.5, 2.0)
    loss, m = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    assert loss.item() == pytest.approx(-2.4)
    loss.backward()
    assert logp_new.grad.item() == 0.0  # clipped branch is constant in the ratio
    assert m["clip_frac"] == 1.0
    # approx_kl = (ratio - 1) - log ratio = 0.5 - 0.4054651 = 0.0945349
    assert m["approx_kl"] == pytest.approx(0.0945349, abs=1e-6)
    assert m["ratio_mean"] == m["ratio_max"] == m["ratio_min"] == pytest.approx(1.5)


def test_clip_below_negative_advantage():
    # A = -1, ratio = 0.5: -A * ratio = 0.5; -A * clip(0.5, 0.8, 1.2) = 0.8; max = 0.8 (clipped)
    logp_new, logp_old, adv = _case(0.5, -1.0)
    loss, m = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    assert loss.item() == pytest.approx(0.8)
    loss.backward()
    assert logp_new.grad.item() == 0.0
    # approx_kl = (0.5 - 1) - log 0.5 = -0.5 + 0.6931472 = 0.1931472
    assert m["approx_kl"] == pytest.approx(0.1931472, abs=1e-6)
    assert m["clip_frac"] == 1.0


def test_ratio_outside_range_on_the_pessimistic_side_is_not_clipped():
    # A = 2, ratio = 0.5: -A * ratio = -1.0; -A * 0.8 = -1.6; max = -1.0 (unclipped, gradient flows)
    # d loss / d logp_new = -A * ratio = -1.0
    logp_new, logp_old, adv = _case(0.5, 2.0)
    loss, m = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and logp_new.grad.item() == pytest.approx(-1.0)
    # A = -1, ratio = 1.5: -A * ratio = 1.5; -A * 1.2 = 1.2; max = 1.5; gradient = -A * ratio = 1.5
    logp_new, logp_old, adv = _case(1.5, -1.0)
    loss, _ = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    loss.backward()
    assert loss.item() == pytest.approx(1.5) and logp_new.grad.item() == pytest.approx(1.5)
    assert m["clip_frac"] == 1.0  # |ratio - 1| > eps counts as clipped, CleanRL's definition


def test_no_clip_inside_the_trust_region():
    # A = 1, ratio = 1.1: both terms -1.1; loss -1.1; gradient -A * ratio = -1.1; clip_frac 0
    logp_new, logp_old, adv = _case(1.1, 1.0)
    loss, m = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1) and logp_new.grad.item() == pytest.approx(-1.1)
    assert m["clip_frac"] == 0.0
    # approx_kl = 0.1 - log 1.1 = 0.1 - 0.0953102 = 0.0046898
    assert m["approx_kl"] == pytest.approx(0.0046898, abs=1e-6)


def test_zero_advantage_gives_zero_loss_and_gradient():
    logp_new, logp_old, adv = _case(1.3, 0.0)
    loss, _ = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    loss.backward()
    assert loss.item() == 0.0 and logp_new.grad.item() == 0.0


def test_batch_mean_and_broadcast_advantages():
    # (N=2, K=2): ratios [[1.5, 1.1], [0.5, 1.0]], advantages per decision [2, -1] broadcast over K
    # per edge: row 0 (A = 2): 1.5 -> -2.4 (clipped), 1.1 -> -2.2; row 1 (A = -1): 0.5 -> 0.8 (clipped), 1.0 -> 1.0
    # sum = -2.4 - 2.2 + 0.8 + 1.0 = -2.8; mean = -0.7
    logp_old = torch.zeros(2, 2)
    logp_new = torch.log(torch.tensor([[1.5, 1.1], [0.5, 1.0]]))
    adv = torch.tensor([[2.0], [-1.0]])
    loss, m = grpo_clip_loss(logp_new, logp_old, adv, EPS)
    assert loss.item() == pytest.approx(-0.7)
    # clip_frac = 2 / 4; ratio mean = (1.5 + 1.1 + 0.5 + 1.0) / 4 = 1.025
    assert m["clip_frac"] == 0.5
    assert m["ratio_mean"] == pytest.approx(1.025) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio_min"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in m.values())


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="differs"):
        grpo_clip_loss(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2, 2), EPS)
    with pytest.raises(ValueError, match="broadcast"):
        grpo_clip_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3), EPS)
    with pytest.raises(ValueError, match="no edges"):
        grpo_clip_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), EPS)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_clip_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0)


def test_kl_to_reference_hand_computed():
    # row 0: one of 4 elements differs by 1, std 0.5 -> 1 / (2 * 0.25) = 2 per element, mean 2 / 4 = 0.5
    # row 1: every element differs by 0.1, std 0.1 -> 0.01 / (2 * 0.01) = 0.5
    mean = torch.zeros(2, 1, 2, 2, requires_grad=True)
    ref = torch.zeros(2, 1, 2, 2)
    ref[0, 0, 0, 0] = 1.0
    ref[1] = 0.1
    std = torch.tensor([0.5, 0.1]).reshape(2, 1, 1, 1)
    kl = kl_to_reference(mean, ref, std)
    torch.testing.assert_close(kl, torch.tensor([0.5, 0.5]))
    kl.sum().backward()
    # d/d mean of row 0, element (0,0,0): (mean - ref) / (std^2 * 4) = -1 / (0.25 * 4) = -1
    assert mean.grad[0, 0, 0, 0].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="std > 0"):
        kl_to_reference(mean, ref, torch.zeros(2, 1, 1, 1))


def test_decoupled_weights_hand_computed():
    """Decoupled PPO: per-edge weights multiply the clipped terms. Edge 0: r = 1, A = 1 -> -1 x w 2;
    edge 1: r = 1.5 clipped to 1.2 at eps 0.2, A = 1 -> -1.2 x w 0.5; mean = (-2 - 0.6) / 2 = -1.3."""
    logp_new = torch.tensor([0.0, math.log(1.5)], requires_grad=True)
    loss, _ = grpo_clip_loss(logp_new, torch.zeros(2), torch.ones(2), 0.2, weights=torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx(-1.3)
    loss.backward()
    # d/dlogp of -w A r / 2 at the unclipped edge 0: -2 x 1 x 1 / 2 = -1; the clipped edge has none
    assert logp_new.grad.tolist() == pytest.approx([-1.0, 0.0])
    unit, _ = grpo_clip_loss(logp_new, torch.zeros(2), torch.ones(2), 0.2, weights=torch.ones(2))
    plain, _ = grpo_clip_loss(logp_new, torch.zeros(2), torch.ones(2), 0.2)
    assert unit.item() == plain.item()
    with pytest.raises(ValueError, match="weights shape"):
        grpo_clip_loss(logp_new, torch.zeros(2), torch.ones(2), 0.2, weights=torch.ones(3))


def test_flow_grpo_kl_is_the_exact_kl_times_minus_dt_hand_computed():
    # row 0: one of 4 elements differs by 1, std 0.5 at dt -0.25 -> sigma_t = 0.5 / sqrt(0.25) = 1:
    #   Flow-GRPO: 1 / (2 * 1^2) / 4 = 0.125 (the exact KL: 0.5)
    # row 1: every element differs by 0.1, std 0.1 at dt -0.5 -> sigma_t^2 = 0.01 / 0.5 = 0.02:
    #   Flow-GRPO: 0.01 / (2 * 0.02) = 0.25 (the exact KL: 0.5)
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.zeros(2, 1, 2, 2)
    ref[0, 0, 0, 0] = 1.0
    ref[1] = 0.1
    std = torch.tensor([0.5, 0.1]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(flow_grpo_kl(mean, ref, std, torch.tensor([-0.25, -0.5])), torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(kl_to_reference(mean, ref, std), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="dt = sigma_next - sigma < 0"):
        flow_grpo_kl(mean, ref, std, torch.tensor([0.1, -0.5]))
