"""Reward hacking in plain sight: metrics the run does not train on (config `eval_metrics`), watched
at every evaluation.

The rule: every evaluation scores the same images of the training prompts (the same prompts and
noise, driver.EVAL_SEED), so a change since the run's first evaluation is a paired difference per
image. With d_m the per-image change of watched metric m, the run warns when the training reward's
mean change is > 0 and mean(d_m) < -2 * s.e.(d_m) (the standard error of the per-image changes):
the metric fell by more than twice its own noise over the same images while the reward rose.
Logged every evaluation: drift/reward and drift/<m> (mean changes), drift/<m>_stderr. A resumed
run's first evaluation after the resume is its baseline.
"""
from __future__ import annotations

import math

import torch


class DriftWatch:
    def __init__(self, watched: list[str]):
        self.watched = list(watched)
        self.first: dict[str, torch.Tensor] | None = None

    def observe(self, per_image: dict[str, torch.Tensor]) -> tuple[dict[str, float], str | None]:
        """per_image: "reward" (the combined training reward) and each watched metric, (B,) over the
        evaluation's images. -> (drift metrics, a warning line or None)."""
        if not self.watched:
            return {}, None
        if self.first is None:
            self.first = {k: v.detach().float().clone() for k, v in per_image.items()}
            return {}, None
        out, falling = {}, []
        for m in ["reward", *self.watched]:
            d = per_image[m].float() - self.first[m]
            d = d[torch.isfinite(d)]
            mean = float(d.mean()) if d.numel() else math.nan
            se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else math.nan
            out[f"drift/{m}"] = mean
            if m != "reward":
                out[f"drift/{m}_stderr"] = se
                if mean < 0 and mean < -2 * (se if math.isfinite(se) else 0.0):
                    falling.append(f"{m} {mean:+.4f} ± {se:.4f}")
        if out["drift/reward"] > 0 and falling:
            return out, (f"treegrpo_ray: possible reward hacking: the training reward rose {out['drift/reward']:+.4f} "
                         f"since the first evaluation while {', '.join(falling)} (not trained on) fell by more than "
                         f"2 standard errors over the same {per_image['reward'].numel()} images")
        return out, None
