"""Train the miniature `AutoencoderKL` on world images and set its latent statistics.

Loss: pixel MSE of the decoded posterior sample plus a small KL to N(0, I) (Kingma & Welling
2014; the weight is tiny, as in LDM's KL-f8 autoencoders, so latents stay informative). No
perceptual or GAN loss: the world is flat colours on a flat background.

After training, `shift_factor` = mean and `scaling_factor` = 1 / std of the posterior means over
the training images, so that `(z - shift) * scale` has zero mean and unit variance, which is what
the SD3 pipeline and the flow model expect (SD3's VAE uses the same two factors).
"""
from __future__ import annotations

import math
import time

import torch
from diffusers import AutoencoderKL

KL_WEIGHT = 1e-6


def train_vae(vae: AutoencoderKL, images: torch.Tensor, *, steps: int, batch_size: int = 32,
              lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """images: (N, 3, 32, 32) in [0, 1]. Trains in place; returns final metrics (floats)."""
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    start, mse = time.time(), float("nan")
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx] * 2 - 1  # (B, 3, 32, 32) in [-1, 1], the diffusers VAE convention
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen)
        z = posterior.mean + posterior.std * eps  # (B, 4, 16, 16)
        recon = vae.decode(z).sample
        rec_loss = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mse = rec_loss.item() / 4  # MSE in [0, 1] pixel units
    vae.eval().requires_grad_(False)
    return {"vae/mse": mse, "vae/seconds": time.time() - start}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of images in [0, 1]. Returns (N, 4, 16, 16), un-normalised."""
    chunks = [vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist.mean
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def set_latent_stats(vae: AutoencoderKL, latents: torch.Tensor) -> dict[str, float]:
    """Write shift_factor / scaling_factor into the VAE config from raw latents (N, C, h, w)."""
    mean, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return {"vae/shift_factor": mean, "vae/scaling_factor": 1.0 / std}


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mean) and decode images in [0, 1]; returns the reconstruction in [0, 1]."""
    z = vae.encode(images * 2 - 1).latent_dist.mean
    return (vae.decode(z).sample.clamp(-1, 1) + 1) / 2
