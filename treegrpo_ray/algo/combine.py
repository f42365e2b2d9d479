"""Multi-reward combination: several raw rewards per leaf -> one advantage per leaf.

Two aggregation modes (TreeGRPO's multi-reward setting uses HPSv2.1 + CLIPScore, Sec. 4):
* "raw":       r = sum_n w_n r_n, then A = normalize_per_prompt(r)  (clip applies once, to A);
* "advantage": A = sum_n w_n normalize_per_prompt(r_n), then clamp to +-clip. Each reward is put
  on its own per-prompt scale first, so a reward with a large numeric range (JPEG kB) does not
  drown a small one (HPS ~0.3); the sum is not re-normalised, so sum |w_n| sets its scale.

Non-finite rewards: a leaf with NaN/inf in any reward is dropped -- excluded from its prompt's
mean/std and given advantage exactly 0 -- and counted in `reward/<name>/nonfinite` and
`reward/dropped`. No NaN reaches the advantages. `finite_mask` returns the mask for callers that
also want to keep dropped leaves out of tree value propagation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from treegrpo_ray.algo.advantages import normalize_per_prompt

MODES = ("raw", "advantage")


def _check(raw: dict[str, torch.Tensor], weights: dict[str, float], prompt_ids: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if not raw:
        raise ValueError("no rewards given")
    unknown = sorted(set(raw) - set(weights))
    if unknown:
        raise ValueError(f"no weight for reward(s) {unknown}; known rewards: {sorted(weights)}")
    missing = sorted(set(weights) - set(raw))
    if missing:
        raise ValueError(f"weighted reward(s) {missing} missing from the scores; got {sorted(raw)}")
    for name, w in weights.items():
        if not math.isfinite(float(w)):
            raise ValueError(f"weight of reward '{name}' must be finite, got {w}")
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty (L,) tensor, got shape {tuple(prompt_ids.shape)}")
    for name, r in raw.items():
        if tuple(r.shape) != tuple(prompt_ids.shape):
            raise ValueError(f"reward '{name}' has shape {tuple(r.shape)}; expected {tuple(prompt_ids.shape)} "
                             f"like prompt_ids")


def finite_mask(raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """(L,) bool, True where every reward is finite, and the per-reward non-finite counts."""
    names = sorted(raw)
    finite = {n: torch.isfinite(raw[n].float()) for n in names}
    mask = torch.stack([finite[n] for n in names]).all(dim=0)               # (L,)
    metrics = {f"reward/{n}/nonfinite": float((~finite[n]).sum()) for n in names}
    metrics["reward/dropped"] = float((~mask).sum())
    return mask, metrics


def _stats(prefix: str, r: torch.Tensor) -> dict[str, float]:
    if r.numel() == 0:
        return {}
    return {f"{prefix}/mean": float(r.mean()), f"{prefix}/std": float(r.std(unbiased=False)),
            f"{prefix}/min": float(r.min()), f"{prefix}/max": float(r.max())}


def combine_rewards(raw: dict[str, torch.Tensor], weights: dict[str, float], prompt_ids: torch.Tensor,
                    mode: str = "raw", eps: float = 1e-4,
                    clip: float | None = None, std: str = "prompt",
                    normalize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """raw: name -> (L,) rewards; weights: name -> float (same names); prompt_ids (L,) long;
    std: how centred rewards are scaled (`algo.advantages.normalize_per_prompt`); normalize:
    (combined finite rewards (L',), their prompt_ids) -> (L',) advantages in place of the group
    normalisation ("raw" mode only; e.g. DDPO's `RunningPromptStats`), clipped to +-clip after.
    Returns (advantages (L,) float32, metrics of python floats)."""
    _check(raw, weights, prompt_ids, mode)
    mask, metrics = finite_mask(raw)
    ids = prompt_ids[mask]                                                  # (L',)
    kept = {n: raw[n].float()[mask].double() for n in sorted(raw)}          # name -> (L',)
    for n, r in kept.items():
        metrics.update(_stats(f"reward/{n}", r))
    adv = torch.zeros(prompt_ids.shape[0], dtype=torch.float32, device=prompt_ids.device)
    if ids.numel() == 0:
        return adv, metrics
    if mode == "raw":
        combined = sum(float(weights[n]) * r for n, r in kept.items())      # (L',) float64
        metrics.update(_stats("reward/combined", combined))
        if normalize is None:
            a = normalize_per_prompt(combined, ids, eps=eps, clip=clip, std=std)
        else:
            a = normalize(combined, ids)
            a = a.clamp(-clip, clip) if clip is not None else a
    elif normalize is not None:
        raise ValueError("a custom normalize needs mode='raw' (one combined reward per leaf)")
    else:
        a = sum(float(weights[n]) * normalize_per_prompt(r, ids, eps=eps, clip=None, std=std) for n, r in kept.items())
        if clip is not None:
            if clip <= 0:
                raise ValueError(f"clip must be > 0 or None, got {clip}")
            a = a.clamp(-clip, clip)
    adv[mask] = a.float().to(adv.device)
    metrics["adv/leaf_abs_mean"] = float(adv[mask].abs().mean())
    return adv, metrics
