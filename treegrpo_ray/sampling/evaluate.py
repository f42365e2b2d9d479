"""Deterministic evaluation sampling: the policy's ODE step (flow: Euler; DDIM: eta 0) with CFG from a fixed seed,
so eval rewards of different iterations compare the policy, not the noise."""
from __future__ import annotations

import torch


@torch.no_grad()
def ode_sample(policy, prompts: list[str], *, num_steps: int, seed: int, max_batch: int = 64) -> torch.Tensor:
    """Final latents (B, C, H, W) (video: (B, C, F, H, W)) for `prompts`, one trajectory each, noise from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), *policy.latent_shape), generator=gen)  # (B, C, H, W)
    sigmas = policy.sigmas(num_steps)
    device = getattr(policy, "device", None) or next(iter(policy.trainable_parameters())).device
    outs = []
    for start in range(0, len(prompts), max_batch):
        xb, pb = x[start:start + max_batch].to(device), prompts[start:start + max_batch]
        for i in range(num_steps):
            s = torch.full((xb.shape[0],), float(sigmas[i]), device=device)
            s_next = torch.full_like(s, float(sigmas[i + 1]))
            xb = policy.ode_step(xb, policy.predict(xb, s, pb), s, s_next)
        outs.append(xb.float().cpu())
    return torch.cat(outs)
