"""One denoising step with its Gaussian log-prob: sample k children, or re-score stored ones.

Implements (DESIGN.md §1):

* Flow-matching SDE step, Flow-GRPO form (arXiv 2505.05470, Eq. 9-10; upstream
  `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`): with sigma > sigma', Delta = sigma' - sigma,
  sigma_t = eta * sqrt(sigma / (1 - sigma))  (at sigma == 1: sqrt(sigma / (1 - sigma')), as
  Flow-GRPO substitutes sigmas[1] there),
  mu = x * (1 + sigma_t^2 * Delta / (2 sigma)) + v * (1 + sigma_t^2 * (1 - sigma) / (2 sigma)) * Delta,
  s = sigma_t * sqrt(-Delta), child = mu + s * eps.
* The plain Euler ODE step x' = x + Delta * v.
* DDIM step with log-prob, DDPO form (arXiv 2305.13301; upstream
  `ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`), for epsilon-prediction models.

TreeGRPO's branching is `n_children=k`: one model output gives (mu, s), and k independent noises
give k children of the same Gaussian. Passing `prev_sample` re-scores stored children under a
(new) model output instead of sampling; that is how the learner computes logp_new.

Departures / conventions:
* All math runs in float32 whatever the input dtype; outputs are float32.
* The log-prob is reduced over the latent elements (C, H, W), or (C, F, H, W) for video, with
  an explicit `reduction`: "mean" (what Flow-GRPO / DDPO / DanceGRPO do; a per-element average)
  or "sum" (the exact log-density of the latent).
* Latents may have any rank >= 4: (B, C, H, W) images or (B, C, F, H, W) video (Wan). Per-row
  schedule values broadcast over every trailing dim; shapes below write (C, H, W) for the
  trailing latent dims whatever their number.
* A zero std (noise_level 0, or DDIM eta 0, or a DDIM step to alpha_prev == 1) is a
  deterministic step: the sample is the mean and its log-prob is defined as 0 (a point mass has
  no density; 0 keeps ratios exp(0 - 0) = 1 and gradients finite).
* The sampled child is detached before scoring (the score-function estimator treats the child
  as data), as upstream does; stored `prev_sample` is used as given.
* Noise is drawn on the generator's device and moved to the latents' device, so a CPU generator
  gives the same children on CPU and GPU.
* DDPO's optional `clip_sample` of x0 is not implemented.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SDEStep(NamedTuple):
    sample: torch.Tensor    # (B, K, C, H, W) float32, the sampled or re-scored children (video: (B, K, C, F, H, W))
    log_prob: torch.Tensor  # (B, K) float32, log-prob of each child under N(mean, std^2)
    mean: torch.Tensor      # (B, C, H, W) float32
    std: torch.Tensor       # (B, 1, 1, 1) float32 (one 1 per latent dim)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduction: str = "mean", latent_dims: int = 3) -> torch.Tensor:
    """log N(sample; mean, std^2), reduced over the last `latent_dims` dims: (C, H, W) for images
    (3, the default), (C, F, H, W) for video (4).

    sample (..., C, H, W); mean and std broadcast against it. Returns (...) float32.
    Where std == 0 the log-prob is 0 (deterministic step; see the module docstring).
    """
    if latent_dims < 1 or sample.dim() < latent_dims:
        raise ValueError(f"sample must have {latent_dims} latent dims (..., C, H, W), got shape {tuple(sample.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    sample, mean = sample.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=sample.device)
    zero = std == 0
    safe_std = torch.where(zero, torch.ones_like(std), std)  # no inf/NaN in either branch's gradient
    logp = -((sample - mean) ** 2) / (2 * safe_std ** 2) - torch.log(safe_std) - _HALF_LOG_2PI
    logp = torch.where(zero, torch.zeros_like(logp), logp)  # (..., C, H, W)
    dims = tuple(range(-latent_dims, 0))  # images: (-3, -2, -1), as before video
    return logp.mean(dim=dims) if reduction == "mean" else logp.sum(dim=dims)


def _per_row(value, batch: int, device: torch.device, name: str, ndim: int = 4) -> torch.Tensor:
    """A python float, 0-d tensor or (B,) tensor -> (B, 1, ..., 1) float32 tensor, `ndim` dims in all
    (4 for (B, C, H, W) latents, 5 for video's (B, C, F, H, W)), so it broadcasts over every latent dim."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def _children(mean: torch.Tensor, std: torch.Tensor, *, generator, prev_sample, n_children: int,
              reduction: str) -> SDEStep:
    """Draw n_children ~ N(mean, std^2) per row (or take prev_sample) and score them."""
    b = mean.shape[0]
    if prev_sample is not None:
        if prev_sample.dim() != mean.dim() + 1 or prev_sample.shape[0] != b or prev_sample.shape[2:] != mean.shape[1:]:
            raise ValueError(f"prev_sample must be (B, K, *latent) with B={b} and latent="
                             f"{tuple(mean.shape[1:])}, got {tuple(prev_sample.shape)}")
        sample = prev_sample.to(device=mean.device, dtype=torch.float32)
    else:
        if n_children < 1:
            raise ValueError(f"n_children must be >= 1, got {n_children}")
        shape = (b, n_children, *mean.shape[1:])
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32)
        sample = (mean[:, None] + std[:, None] * noise.to(mean.device)).detach()  # (B, K, C, H, W)
    log_prob = gaussian_log_prob(sample, mean[:, None], std[:, None], reduction, latent_dims=mean.dim() - 1)  # (B, K)
    return SDEStep(sample=sample, log_prob=log_prob, mean=mean, std=std)


def _check_latents(x: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if x.dim() < 4:
        raise ValueError(f"latents must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(x.shape)}")
    if other.shape != x.shape:
        raise ValueError(f"{other_name} shape {tuple(other.shape)} differs from latents {tuple(x.shape)}")


def flow_ode_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of the flow ODE: x' = x + (sigma' - sigma) * v. x, velocity (B, C, H, W) -> float32."""
    _check_latents(x, velocity, "velocity")
    s = _per_row(sigma, x.shape[0], x.device, "sigma", x.dim())
    s_next = _per_row(sigma_next, x.shape[0], x.device, "sigma_next", x.dim())
    return x.float() + (s_next - s) * velocity.float()


def flow_sde_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, noise_level: float, *,
                  generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
                  n_children: int = 1, reduction: str = "mean") -> SDEStep:
    """Flow-GRPO SDE step sigma -> sigma' with log-prob (formulas in the module docstring).

    x, velocity: (B, C, H, W) latents and guided velocity. sigma, sigma_next: floats or (B,)
    tensors with 1 >= sigma > sigma_next >= 0 (rows may sit at different timesteps).
    Samples n_children children per row, or re-scores prev_sample (B, K, C, H, W).
    """
    _check_latents(x, velocity, "velocity")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    b = x.shape[0]
    sig = _per_row(sigma, b, x.device, "sigma", x.dim())    # (B, 1, 1, 1)
    sig_next = _per_row(sigma_next, b, x.device, "sigma_next", x.dim())
    if not bool(((sig <= 1) & (sig > sig_next) & (sig_next >= 0)).all()):
        raise ValueError("flow_sde_step needs 1 >= sigma > sigma_next >= 0 in every row")
    x, v = x.float(), velocity.float()
    delta = sig_next - sig                                  # (B, 1, 1, 1), negative
    # Flow-GRPO: at sigma == 1 the denominator 1 - sigma would be 0; it uses sigmas[1] instead.
    denom = 1 - torch.where(sig == 1, sig_next, sig)
    sigma_t = noise_level * torch.sqrt(sig / denom)
    mean = (x * (1 + sigma_t ** 2 / (2 * sig) * delta)
            + v * (1 + sigma_t ** 2 * (1 - sig) / (2 * sig)) * delta)  # (B, C, H, W)
    std = sigma_t * torch.sqrt(-delta)                      # (B, 1, 1, 1)
    return _children(mean, std, generator=generator, prev_sample=prev_sample, n_children=n_children,
                     reduction=reduction)


def ddim_step_with_logprob(x: torch.Tensor, eps: torch.Tensor, alpha_prod_t, alpha_prod_prev, eta: float, *,
                           generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
                           n_children: int = 1, reduction: str = "mean") -> SDEStep:
    """DDIM step t -> prev with log-prob (DDPO form) for an epsilon-prediction model.

    x, eps: (B, C, H, W). alpha_prod_t, alpha_prod_prev: cumulative alphas (floats or (B,)
    tensors) with 0 < alpha_prod_t < alpha_prod_prev <= 1. eta scales the DDIM noise (1 = DDPM).
      x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
      sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
      mu = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps
    """
    _check_latents(x, eps, "eps")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    b = x.shape[0]
    a_t = _per_row(alpha_prod_t, b, x.device, "alpha_prod_t", x.dim())        # (B, 1, 1, 1)
    a_prev = _per_row(alpha_prod_prev, b, x.device, "alpha_prod_prev", x.dim())
    if not bool(((a_t > 0) & (a_t < a_prev) & (a_prev <= 1)).all()):
        raise ValueError("ddim_step_with_logprob needs 0 < alpha_prod_t < alpha_prod_prev <= 1 in every row")
    x, eps = x.float(), eps.float()
    x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * torch.sqrt(variance)                                  # (B, 1, 1, 1)
    # clamp: 1 - a_prev - std^2 can dip below 0 by rounding when eta = 1 (std^2 = variance)
    direction = torch.sqrt((1 - a_prev - std ** 2).clamp(min=0)) * eps
    mean = torch.sqrt(a_prev) * x0 + direction                        # (B, C, H, W)
    return _children(mean, std, generator=generator, prev_sample=prev_sample, n_children=n_children,
                     reduction=reduction)
