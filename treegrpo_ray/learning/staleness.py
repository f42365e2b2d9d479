"""What the learner does with trees grown by weights older than its own (max_staleness >= 1),
chosen once when the learner is built (`CORRECTIONS[learner.stale_correction]`). Each correction
looks at an update's stale edges once, before its steps, and returns a `Correction`: what the
clipped loss compares against and, for recenter, how the stored children move.

* "none": clip against the trees' own log-probs, as if on-policy.
* "decoupled": decoupled PPO (Hilton et al., arXiv 2110.00641): clip against the proximal policy (the weights
  the update starts from; the edges re-scored under them, without gradient) and weight each edge
  by pi_prox / pi_tree.
* "recenter" (the default): move each stale child by mu_prox - mu_tree (same noise), so it is
  the child the weights the update starts from would have drawn; clip against the trees' own
  log-probs (see `recenter`).

A correction gets `rescored(rows)`: (chunk, SDEStep) of those decisions under the current weights,
no gradient, one micro-batch at a time (the learner's own forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

Rescored = Callable[[torch.Tensor], Iterable[tuple[torch.Tensor, object]]]


@dataclass
class Correction:
    """One update's view of its stale edges (every field None: on-policy, or no correction)."""
    prox: torch.Tensor | None = None    # (N, K) proximal log-probs at the update's rows, NaN elsewhere
    shift: torch.Tensor | None = None   # (N, C, H, W) mu_prox - mu_tree at the update's rows, NaN elsewhere
    metrics: dict[str, float] = field(default_factory=dict)

    def clip_against(self, batch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs the ratio is taken against, per-edge weights or None) for decisions `rows`."""
        if self.prox is None:
            return batch.old_log_probs[rows], None
        return self.prox[rows], importance_weights(batch, self.prox, rows)


def importance_weights(batch, prox: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pi_prox / pi_behaviour per edge of `rows`: the importance weight of a stale tree's edge."""
    return (prox[rows] - batch.old_log_probs[rows].float()).exp()


def no_correction(batch, rows: torch.Tensor, rescored: Rescored) -> Correction:
    return Correction()


def decoupled(batch, rows: torch.Tensor, rescored: Rescored) -> Correction:
    """Decoupled PPO's proximal log-probs: the edges of `rows` re-scored under the weights the
    update starts from."""
    prox = torch.full_like(batch.old_log_probs, float("nan"))
    for chunk, new in rescored(rows):
        prox[chunk] = new.log_prob.float().cpu()
    w = importance_weights(batch, prox, rows)
    return Correction(prox=prox, metrics={"staleness/is_weight_mean": float(w.mean()),
                                          "staleness/is_weight_max": float(w.max())})


def recenter(batch, rows: torch.Tensor, rescored: Rescored) -> Correction:
    """mu_prox - mu_tree per decision, and its mean RMS over `rows` in units of each decision's
    std s (`staleness/shift_over_std`).

    A stale child is c = mu_tree + s*eps. The learner trains on c' = c + (mu_prox - mu_tree) =
    mu_prox + s*eps instead: the child the weights the update starts from would have drawn with
    the same noise, under which its log-prob is the tree's own (s does not depend on the weights).
    The clip is then against the tree's log-probs with ratio 1 at the start, as on-policy, and
    the score no longer carries the lag's (mu_tree - mu_theta) / s^2 term, which the decoupled
    weights (pi_prox / pi_tree near 1 for per-element-mean log-probs) leave in. What remains
    is the reward of c standing in for that of c': second order in the shift."""
    if not batch.old_means.numel():
        raise ValueError("stale_correction=recenter needs the sampler's means (TreeBatch.old_means); the "
                         "samplers were built without keep_means (builders.build_sampler sets it when "
                         "max_staleness >= 1 and learner.stale_correction=recenter)")
    shift = torch.full_like(batch.latents, float("nan"), dtype=torch.float32)
    moved = []
    for chunk, new in rescored(rows):
        shift[chunk] = new.mean.float().cpu() - batch.old_means[chunk].float()
        latent_dims = tuple(range(1, shift.dim()))  # (C, H, W), or (C, F, H, W) for video
        moved.append(shift[chunk].pow(2).mean(latent_dims).sqrt() / new.std.float().cpu().reshape(-1))
    return Correction(shift=shift, metrics={"staleness/shift_over_std": float(torch.cat(moved).mean())})


CORRECTIONS = {"none": no_correction, "decoupled": decoupled, "recenter": recenter}
