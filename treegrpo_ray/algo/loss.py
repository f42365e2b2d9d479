"""GRPO clipped surrogate and the Flow-GRPO KL penalty.

Implements (DESIGN.md §1):

* the PPO/GRPO clipped objective (Schulman et al. 2017, Eq. 7; as used by DDPO, Flow-GRPO,
  DanceGRPO and TreeGRPO), written term by term in CleanRL's names:
  logratio = logp_new - logp_old, ratio = exp(logratio),
  pg_loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), averaged over
  every trained edge; diagnostics clip_frac = mean(|ratio - 1| > eps) and
  approx_kl = mean((ratio - 1) - logratio) (Schulman's k3 estimator, CleanRL's `approx_kl`);
* the KL to a reference policy in Flow-GRPO's closed form for two Gaussians with the same std:
  KL = ||mu - mu_ref||^2 / (2 std^2), here averaged (not summed) over latent elements, as
  Flow-GRPO does.

Departures: none in the math. Inputs are cast to float32; `logp_old`, `advantages` and
`mean_ref` are treated as constants (detached).
"""
from __future__ import annotations

import torch

KL_FORMS = ("flow_grpo", "exact")                     # learner.kl_form: see flow_grpo_kl, kl_to_reference
STALE_CORRECTIONS = ("recenter", "decoupled", "none")  # learner.stale_correction: how trees older than the learner train


def grpo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                   clip_eps: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss averaged over edges. logp_new, logp_old: any shape, e.g. (N, K);
    advantages broadcastable to it. Returns (scalar loss, metrics of python floats).

    weights (optional, shape of logp_new, no gradient): per-edge importance weights. Decoupled PPO
    (Hilton et al. 2021, "Batch size-invariance for policy optimization") for stale trees: logp_old
    is the proximal policy's (the weights the update starts from, recomputed by the learner), the
    ratio is clipped against it, and weights = pi_prox / pi_behaviour corrects for the older
    weights that grew the tree: loss = mean(w * max(-A r, -A clip(r, 1 +- eps)))."""
    if logp_old.shape != logp_new.shape:
        raise ValueError(f"logp_old shape {tuple(logp_old.shape)} differs from logp_new {tuple(logp_new.shape)}")
    try:
        broadcastable = torch.broadcast_shapes(advantages.shape, logp_new.shape) == logp_new.shape
    except RuntimeError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} does not broadcast to {tuple(logp_new.shape)}")
    if logp_new.numel() == 0:
        raise ValueError("grpo_clip_loss got no edges to train on")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    adv = advantages.detach().float()
    logratio = logp_new.float() - logp_old.detach().float()
    ratio = torch.exp(logratio)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = torch.max(pg_loss1, pg_loss2)
    if weights is not None:
        if weights.shape != logp_new.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} differs from logp_new {tuple(logp_new.shape)}")
        pg_loss = pg_loss * weights.detach().float()
    loss = pg_loss.mean()
    with torch.no_grad():
        metrics = {
            "clip_frac": ((ratio - 1.0).abs() > clip_eps).float().mean().item(),
            "approx_kl": ((ratio - 1.0) - logratio).mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
            "ratio_min": ratio.min().item(),
        }
    return loss, metrics


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over (C, H, W) (video: (C, F, H, W)).

    mean, mean_ref (B, C, H, W) or (B, C, F, H, W); std broadcastable, e.g. (B, 1, 1, 1), must be > 0.
    Returns (B,).
    """
    if mean.dim() < 4 or mean_ref.shape != mean.shape:
        raise ValueError(f"mean and mean_ref must both be (B, C, H, W) or (B, C, F, H, W), got {tuple(mean.shape)} "
                         f"and {tuple(mean_ref.shape)}")
    std = std.float()
    if not bool((std > 0).all()):
        raise ValueError("kl_to_reference needs std > 0 (a deterministic step has no Gaussian KL)")
    sq = (mean.float() - mean_ref.detach().float()) ** 2       # (B, C, H, W)
    return (sq / (2 * std ** 2)).mean(dim=tuple(range(1, mean.dim())))  # (B,)


def flow_grpo_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL term: |mean - mean_ref|^2 / (2 sigma_t^2) averaged over (C, H, W), where the
    step's std is s = sigma_t * sqrt(-dt); i.e. kl_to_reference(mean, mean_ref, s) * (-dt). It is
    the exact step KL scaled by -dt (dt = sigma_next - sigma < 0), so a beta tuned on Flow-GRPO
    means the same here. dt broadcastable to (B,), e.g. (B,). Returns (B,)."""
    dt = dt.float().reshape(-1)
    if not bool((dt < 0).all()):
        raise ValueError("flow_grpo_kl needs dt = sigma_next - sigma < 0 (a denoising step)")
    return kl_to_reference(mean, mean_ref, std) * (-dt)
