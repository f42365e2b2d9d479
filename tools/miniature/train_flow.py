"""Train the miniature `SD3Transformer2DModel` with the rectified-flow objective.

Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; SD3, Esser et al. 2024 eq. 1-3):
x_σ = (1 - σ)·x0 + σ·ε, target velocity v = ε - x0, loss ||v_θ(x_σ, σ, c) - v||².
The SD3 pipeline's Euler step x' = x + (σ' - σ)·v_θ then integrates from noise (σ = 1) to data.

Departures from SD3's recipe: σ ~ Uniform(0, 1) instead of logit-normal (the miniature samples
with shift 1.0, i.e. uniform sigmas); conditioning embeddings are precomputed once with the
pipeline's own `encode_prompt` (text encoders are frozen); classifier-free-guidance dropout
replaces the whole conditioning (sequence and pooled) by that of the empty prompt, which is the
pipeline's default negative prompt. No EMA: the base model is meant to be imperfect.
"""
from __future__ import annotations

import math
import time

import torch
from diffusers import SD3Transformer2DModel

TIMESTEP_SCALE = 1000.0  # the pipeline feeds timestep = σ · num_train_timesteps


def flow_matching_loss(transformer: SD3Transformer2DModel, x0: torch.Tensor, context: torch.Tensor,
                       pooled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x0: (B, C, h, w) normalised latents; context: (B, S, D); pooled: (B, Dp). Scalar loss."""
    b = x0.shape[0]
    sigma = torch.rand(b, generator=generator)                   # (B,)
    noise = torch.randn(x0.shape, generator=generator)           # (B, C, h, w)
    s = sigma.view(b, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    pred = transformer(hidden_states=x_sigma, encoder_hidden_states=context,
                       pooled_projections=pooled, timestep=sigma * TIMESTEP_SCALE).sample
    return (pred.float() - (noise - x0)).pow(2).mean()


def train_flow(transformer: SD3Transformer2DModel, latents: torch.Tensor, prompt_index: torch.Tensor,
               prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor, null_index: int, *,
               steps: int, batch_size: int = 64, lr: float = 1e-3, cfg_dropout: float = 0.1,
               warmup: int = 50, seed: int = 0, log_every: int = 100) -> dict[str, float]:
    """Train in place.

    latents: (N, C, h, w) already shifted and scaled; prompt_index: (N,) rows of the embedding
    tables; prompt_embeds: (P, S, D); pooled_embeds: (P, Dp); null_index: row of the empty prompt.
    """
    gen = torch.Generator().manual_seed(seed)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    start, running = time.time(), []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        rows = prompt_index[idx].clone()
        rows[torch.rand(batch_size, generator=gen) < cfg_dropout] = null_index
        loss = flow_matching_loss(transformer, latents[idx], prompt_embeds[rows], pooled_embeds[rows], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"flow step {step + 1}/{steps} loss {sum(running[-log_every:]) / log_every:.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    transformer.eval().requires_grad_(False)
    tail = running[-min(len(running), 100):]
    return {"flow/loss": sum(tail) / len(tail), "flow/seconds": time.time() - start}
