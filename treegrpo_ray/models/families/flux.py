"""FLUX.1 (`FluxPipeline`): packed latents, rotary position ids, guidance embedding, flow matching.

As in diffusers' `FluxPipeline.__call__`:
* latents (B, C, h, w) are packed into (B, h/2 * w/2, 4C) tokens of 2x2 patches for the
  transformer and unpacked after it; the sampler, the step math and the VAE see (B, C, h, w);
* image position ids are (row, column) of each patch, text ids are zeros;
* the transformer gets timestep = sigma (the pipeline passes t / 1000);
* FLUX.1-dev is guidance-distilled: `guidance_scale` goes in as the guidance embedding
  (`guidance_embeds` in the transformer's config; schnell has none) and there is NO [uncond; cond]
  batch. True classifier-free guidance (`true_cfg_scale` > 1, empty negative prompt) is an option;
* sigmas = linspace(1, 1/T, T) shifted by mu = calculate_shift(image tokens) (dynamic shifting).
Prompts: CLIP-L gives the pooled (P,) embedding, T5 the (S, D) token embeddings.
"""
from __future__ import annotations

import numpy as np
import torch

from treegrpo_ray.models.families.base import FlowSteps, dynamic_shift_mu, flow_sigmas


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch becomes one token (channel-major within it)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def packed_latent_shape(in_channels: int, vae_scale_factor: int, resolution: int, who: str) -> tuple[int, int, int]:
    """(C, h, w) of square latents a 2x2-packing transformer (FLUX, Qwen-Image) takes, in_channels = 4C."""
    multiple = vae_scale_factor * 2
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a multiple of vae_scale_factor * 2 = {multiple} "
                         f"({who} packs 2x2 latent patches)")
    side = resolution // vae_scale_factor
    return (in_channels // 4, side, side)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids: (0, row, column) of each packed patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowSteps):
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"

    def __init__(self, pipeline, *, vae_scale_factor: int, guidance_scale: float, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = 512):
        self.pipeline, self.vae_scale_factor = pipeline, vae_scale_factor
        self.config = pipeline.transformer.config
        self.guidance = float(guidance_scale) if self.config.guidance_embeds else None
        self.cfg_scale = float(true_cfg_scale)
        self.max_sequence_length = max_sequence_length
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)

    def latent_shape(self, resolution):
        return packed_latent_shape(self.config.in_channels, self.vae_scale_factor, resolution, "FLUX")

    def native_resolution(self) -> int:
        return 128 * self.vae_scale_factor  # FluxPipeline: default_sample_size 128 * vae_scale_factor

    def schedule(self, num_steps, latent_shape):
        sched = self.pipeline.scheduler
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if sched.config.get("use_dynamic_shifting", False):
            tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
            kwargs["mu"] = dynamic_shift_mu(sched, tokens, max_shift=1.15)
        return flow_sigmas(sched, num_steps, **kwargs)

    @torch.no_grad()
    def encode(self, prompt):
        device = self.pipeline.text_encoder.device
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
        return embeds[0], pooled[0]  # (S, D) T5 tokens, (P,) CLIP pooled

    def forward(self, net, x, s, cond):
        embeds, pooled = cond
        b, _, h, w = x.shape
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device,
                                                                 dtype=torch.float32)
        t = (s * self.num_train_timesteps).to(x.dtype) / 1000  # the pipeline's timestep / 1000, in its dtype
        out = net(hidden_states=pack(x), timestep=t, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w).float()
