"""SDE / ODE / DDIM steps with log-prob (treegrpo_ray/algo/sde.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treegrpo_ray.algo.sde import (SDEStep, ddim_step_with_logprob, flow_ode_step, flow_sde_step,
                                   gaussian_log_prob)

torch.set_num_threads(1)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # 0.9189385


def _full(value, shape=(1, 1, 2, 2)):
    return torch.full(shape, float(value))


def test_flow_sde_step_hand_computed_mean_std_logprob():
    # sigma = 0.5, sigma' = 0.25, eta = 1: Delta = -0.25, sigma_t = sqrt(0.5 / 0.5) = 1
    # mean = x * (1 + 1 * (-0.25) / (2 * 0.5)) + v * (1 + 1 * 0.5 / (2 * 0.5)) * (-0.25)
    #      = 0.75 x - 0.375 v = 0.75 * 2 - 0.375 * 1 = 1.125     (x = 2, v = 1)
    # std  = sigma_t * sqrt(0.25) = 0.5
    x, v = _full(2.0), _full(1.0)
    # child 0 at z = +1 (1.625), child 1 at z = -2 (0.125)
    children = torch.stack([_full(1.625)[0], _full(0.125)[0]])[None]  # (1, 2, 1, 2, 2)
    out = flow_sde_step(x, v, 0.5, 0.25, 1.0, prev_sample=children)
    assert isinstance(out, SDEStep)
    torch.testing.assert_close(out.mean, _full(1.125))
    torch.testing.assert_close(out.std, torch.full((1, 1, 1, 1), 0.5))
    # log p(z=+1) = -1/2 - log 0.5 - 0.9189385 = -0.5 + 0.6931472 - 0.9189385 = -0.7257914
    # log p(z=-2) = -4/2 + 0.6931472 - 0.9189385 = -2.2257914
    torch.testing.assert_close(out.log_prob, torch.tensor([[-0.7257914, -2.2257914]]))
    # sum over the 1*2*2 = 4 elements: 4 * -0.7257914 = -2.9031655; 4 * -2.2257914 = -8.9031655
    out_sum = flow_sde_step(x, v, 0.5, 0.25, 1.0, prev_sample=children, reduction="sum")
    torch.testing.assert_close(out_sum.log_prob, torch.tensor([[-2.9031655, -8.9031655]]))


def test_flow_sde_step_mixed_elements_mean_reduction():
    # same step (mean 1.125, std 0.5); elements at z = 0, 1, -1, 2 -> samples 1.125, 1.625, 0.625, 2.125
    # mean of -z^2/2 = -(0 + 0.5 + 0.5 + 2) / 4 = -0.75; log p = -0.75 + 0.6931472 - 0.9189385 = -0.9757914
    child = torch.tensor([1.125, 1.625, 0.625, 2.125]).reshape(1, 1, 1, 2, 2)
    out = flow_sde_step(_full(2.0), _full(1.0), 0.5, 0.25, 1.0, prev_sample=child)
    torch.testing.assert_close(out.log_prob, torch.tensor([[-0.9757914]]))


def test_flow_sde_step_at_sigma_one_uses_sigma_next_in_std():
    # sigma = 1, sigma' = 0.8, eta = 0.5: sigma_t = 0.5 * sqrt(1 / (1 - 0.8)) = 0.5 * sqrt(5), sigma_t^2 = 1.25
    # mean = x * (1 + 1.25 * (-0.2) / 2) + v * (1 + 1.25 * 0 / 2) * (-0.2) = 0.875 x - 0.2 v = 1.75 - 0.2 = 1.55
    # std  = 0.5 * sqrt(5) * sqrt(0.2) = 0.5;  log p(sample = mean) = -log 0.5 - 0.9189385 = -0.2257914
    out = flow_sde_step(_full(2.0), _full(1.0), 1.0, 0.8, 0.5, prev_sample=_full(1.55)[None])
    torch.testing.assert_close(out.mean, _full(1.55))
    torch.testing.assert_close(out.std, torch.full((1, 1, 1, 1), 0.5))
    torch.testing.assert_close(out.log_prob, torch.tensor([[-0.2257914]]))
    assert torch.isfinite(out.mean).all()


def test_flow_ode_step_hand_computed():
    # x' = x + (sigma' - sigma) v = 2 + (0.25 - 0.5) * 1 = 1.75
    torch.testing.assert_close(flow_ode_step(_full(2.0), _full(1.0), 0.5, 0.25), _full(1.75))


def test_ddim_step_hand_computed():
    # a_t = 0.25, a_prev = 0.5, eta = sqrt(0.75):
    # variance = (1 - 0.5) / (1 - 0.25) * (1 - 0.25 / 0.5) = (2/3) * 0.5 = 1/3; std^2 = 0.75 / 3 = 0.25, std = 0.5
    # x = 1, eps = 1: x0 = (1 - sqrt(0.75)) / sqrt(0.25) = (1 - 0.8660254) / 0.5 = 0.2679492
    # mean = sqrt(0.5) * 0.2679492 + sqrt(1 - 0.5 - 0.25) * 1 = 0.1894687 + 0.5 = 0.6894687
    out = ddim_step_with_logprob(_full(1.0), _full(1.0), 0.25, 0.5, math.sqrt(0.75),
                                 prev_sample=_full(0.6894687 + 0.5)[None])  # child at z = +1
    torch.testing.assert_close(out.mean, _full(0.6894687))
    torch.testing.assert_close(out.std, torch.full((1, 1, 1, 1), 0.5))
    torch.testing.assert_close(out.log_prob, torch.tensor([[-0.7257914]]))  # as in the flow test


def test_ddim_eta_zero_is_deterministic_ddim():
    # eta = 0: mean = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, std 0, log-prob 0, sample = mean
    out = ddim_step_with_logprob(_full(1.0), _full(1.0), 0.25, 0.5, 0.0, n_children=3,
                                 generator=torch.Generator().manual_seed(0))
    expected = math.sqrt(0.5) * (1 - math.sqrt(0.75)) / 0.5 + math.sqrt(0.5)  # 0.1894687 + 0.7071068
    torch.testing.assert_close(out.mean, _full(expected))
    torch.testing.assert_close(out.sample, _full(expected)[:, None].expand(1, 3, 1, 2, 2))
    assert out.log_prob.shape == (1, 3) and (out.log_prob == 0).all()


def test_gaussian_log_prob_zero_std_rows_are_zero_with_finite_grad():
    sample = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    mean = torch.zeros(2, 1, 1, 2, 2, requires_grad=True)
    std = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1)
    lp = gaussian_log_prob(sample, mean, std)
    assert (lp[0] == 0).all() and (lp[1] < 0).all()
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and (mean.grad[0] == 0).all()


def test_bf16_inputs_give_float32_outputs():
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    v = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = flow_sde_step(x, v, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(2), n_children=2)
    assert all(t.dtype == torch.float32 for t in out)
    ref = flow_sde_step(x.float(), v.float(), 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(2),
                        n_children=2)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    assert flow_ode_step(x, v, 0.7, 0.6).dtype == torch.float32


def test_sampling_is_seeded_and_children_are_gaussian():
    x, v = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    a = flow_sde_step(x, v, 0.5, 0.25, 1.0, generator=torch.Generator().manual_seed(3), n_children=4)
    b = flow_sde_step(x, v, 0.5, 0.25, 1.0, generator=torch.Generator().manual_seed(3), n_children=4)
    torch.testing.assert_close(a.sample, b.sample)
    assert a.sample.shape == (1, 4, 4, 16, 16) and a.log_prob.shape == (1, 4)
    z = (a.sample - a.mean[:, None]) / a.std[:, None]  # 4 * 1024 = 4096 standard normals
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05
    assert not torch.equal(a.sample[0, 0], a.sample[0, 1])  # k independent children


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.5, sigma_next=0.6), "sigma > sigma_next"),
    (dict(sigma=1.2, sigma_next=0.6), "1 >= sigma"),
    (dict(sigma=torch.tensor([0.5, 0.5, 0.5]), sigma_next=0.1), r"\(2,\) tensor"),
    (dict(sigma=0.5, sigma_next=0.1, noise_level=-1.0), "noise_level"),
    (dict(sigma=0.5, sigma_next=0.1, prev_sample=torch.zeros(2, 1, 4, 2, 2)), "prev_sample"),
    (dict(sigma=0.5, sigma_next=0.1, reduction="max"), "reduction"),
])
def test_flow_sde_step_rejects_bad_arguments(kwargs, match):
    kwargs = {"noise_level": 0.7, **kwargs}
    with pytest.raises(ValueError, match=match):
        flow_sde_step(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), generator=torch.Generator(), **kwargs)


def test_ddim_rejects_bad_alphas():
    with pytest.raises(ValueError, match="alpha_prod_t < alpha_prod_prev"):
        ddim_step_with_logprob(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.6, 0.5, 1.0)


# ---------------------------------------------------------------- property tests

def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


sigma_pairs = st.tuples(st.floats(0.05, 1.0), st.floats(0.0, 0.95)).map(
    lambda p: (p[0], p[0] * p[1]))  # 1 >= sigma > sigma_next >= 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 3), k=st.integers(1, 3),
       std_scale=st.floats(0.05, 3.0))
def test_gaussian_log_prob_equals_torch_normal_mean_reduced(seed, batch, k, std_scale):
    sample, mean = _randn(seed, batch, k, 2, 3, 3), _randn(seed + 1, batch, 1, 2, 3, 3)
    std = std_scale * (0.5 + _randn(seed + 2, batch, 1, 1, 1, 1).abs())
    expected = torch.distributions.Normal(mean, std).log_prob(sample).mean(dim=(-3, -2, -1))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), expected, atol=1e-5, rtol=1e-5)
    expected_sum = torch.distributions.Normal(mean, std).log_prob(sample).sum(dim=(-3, -2, -1))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std, "sum"), expected_sum, atol=1e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), sig=sigma_pairs, eta=st.floats(0.1, 1.5), k=st.integers(1, 4),
       reduction=st.sampled_from(["mean", "sum"]))
def test_rescoring_a_sampled_child_reproduces_its_log_prob(seed, sig, eta, k, reduction):
    x, v = _randn(seed, 2, 3, 4, 4), _randn(seed + 1, 2, 3, 4, 4)
    drawn = flow_sde_step(x, v, *sig, eta, generator=torch.Generator().manual_seed(seed), n_children=k,
                          reduction=reduction)
    again = flow_sde_step(x, v, *sig, eta, prev_sample=drawn.sample, reduction=reduction)
    torch.testing.assert_close(again.log_prob, drawn.log_prob)
    torch.testing.assert_close(again.sample, drawn.sample)
    # a perturbed model output scores the same children differently
    moved = flow_sde_step(x, v + 0.5, *sig, eta, prev_sample=drawn.sample, reduction=reduction)
    assert not torch.allclose(moved.log_prob, drawn.log_prob)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), a=st.floats(0.05, 0.9), gap=st.floats(0.05, 1.0), eta=st.floats(0.1, 1.0))
def test_ddim_rescoring_reproduces_log_prob(seed, a, gap, eta):
    a_prev = a + (1 - a) * gap  # a < a_prev <= 1
    x, eps = _randn(seed, 2, 3, 4, 4), _randn(seed + 1, 2, 3, 4, 4)
    drawn = ddim_step_with_logprob(x, eps, a, a_prev, eta, generator=torch.Generator().manual_seed(seed),
                                   n_children=2)
    again = ddim_step_with_logprob(x, eps, a, a_prev, eta, prev_sample=drawn.sample)
    torch.testing.assert_close(again.log_prob, drawn.log_prob)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), sig=sigma_pairs, k=st.integers(1, 3))
def test_noise_level_zero_is_the_ode_step(seed, sig, k):
    x, v = _randn(seed, 2, 3, 4, 4), _randn(seed + 1, 2, 3, 4, 4)
    out = flow_sde_step(x, v, *sig, 0.0, generator=torch.Generator().manual_seed(seed), n_children=k)
    ode = flow_ode_step(x, v, *sig)
    torch.testing.assert_close(out.mean, ode)
    torch.testing.assert_close(out.sample, ode[:, None].expand(2, k, 3, 4, 4))
    assert (out.std == 0).all() and (out.log_prob == 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), sigs=st.lists(sigma_pairs, min_size=2, max_size=4), eta=st.floats(0.1, 1.0))
def test_per_row_sigma_tensors_equal_per_row_scalar_calls(seed, sigs, eta):
    sigs = [(1.0, 0.9)] + sigs  # always include a sigma == 1 row
    b = len(sigs)
    sigma = torch.tensor([s for s, _ in sigs])
    sigma_next = torch.tensor([s for _, s in sigs])
    x, v = _randn(seed, b, 2, 3, 3), _randn(seed + 1, b, 2, 3, 3)
    batched = flow_sde_step(x, v, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(seed),
                            n_children=2)
    for i, (s, s_next) in enumerate(sigs):
        row = flow_sde_step(x[i:i + 1], v[i:i + 1], s, s_next, eta, prev_sample=batched.sample[i:i + 1])
        torch.testing.assert_close(batched.mean[i:i + 1], row.mean)
        torch.testing.assert_close(batched.std[i:i + 1], row.std)
        torch.testing.assert_close(batched.log_prob[i:i + 1], row.log_prob)
        torch.testing.assert_close(flow_ode_step(x, v, sigma, sigma_next)[i:i + 1],
                                   flow_ode_step(x[i:i + 1], v[i:i + 1], s, s_next))


def test_video_latents_step_like_their_frames_stacked_as_channels():
    # (B, C, F, H, W) video latents: per-row sigmas broadcast over all four latent dims, and the
    # mean-reduced log-prob is the mean over C*F*H*W elements. Folding F into C, (B, C*F, H, W),
    # is the same set of elements, so every step must agree with the 4-D image path exactly.
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 5, 4, 4, generator=gen), torch.randn(2, 3, 5, 4, 4, generator=gen)
    s, s_next = torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.25])
    fold = lambda t: t.reshape(t.shape[0], -1, *t.shape[-2:])  # noqa: E731  (B, C*F, H, W)
    torch.testing.assert_close(fold(flow_ode_step(x, v, s, s_next)), flow_ode_step(fold(x), fold(v), s, s_next),
                               rtol=0, atol=0)
    video = flow_sde_step(x, v, s, s_next, 0.7, generator=torch.Generator().manual_seed(1), n_children=3)
    assert video.sample.shape == (2, 3, 3, 5, 4, 4) and video.std.shape == (2, 1, 1, 1, 1)
    image = flow_sde_step(fold(x), fold(v), s, s_next, 0.7, prev_sample=video.sample.reshape(2, 3, 15, 4, 4))
    torch.testing.assert_close(video.log_prob, image.log_prob, rtol=0, atol=1e-6)
    again = flow_sde_step(x, v, s, s_next, 0.7, prev_sample=video.sample)
    torch.testing.assert_close(again.log_prob, video.log_prob, rtol=0, atol=0)
    ddim = ddim_step_with_logprob(x, v, torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.9]), 1.0, n_children=2,
                                  generator=torch.Generator().manual_seed(2))
    assert ddim.log_prob.shape == (2, 2) and torch.isfinite(ddim.log_prob).all()
