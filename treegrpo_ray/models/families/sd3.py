"""SD3 / SD3.5 (`StableDiffusion3Pipeline`): MMDiT transformer, flow matching.

As in diffusers' `StableDiffusion3Pipeline.__call__`: the transformer gets timestep = sigma *
num_train_timesteps; prompts are encoded by CLIP-L + CLIP-G (+ T5 when present, else zeros) into
(S, D) token embeddings and (P,) pooled embeddings; sigmas come from the FlowMatchEuler scheduler,
with resolution-dependent dynamic shifting (mu from `calculate_shift`) when its config asks for it.
"""
from __future__ import annotations

import torch

from treegrpo_ray.models.families.base import FlowSteps, dynamic_shift_mu, flow_sigmas


class SD3Family(FlowSteps):
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    def __init__(self, pipeline, *, vae_scale_factor: int, guidance_scale: float, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = 256):
        if true_cfg_scale != 1.0:
            raise ValueError("true_cfg_scale is FLUX's option; SD3 runs classifier-free guidance with guidance_scale")
        self.pipeline, self.vae_scale_factor = pipeline, vae_scale_factor
        self.cfg_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.config = pipeline.transformer.config
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)

    def latent_shape(self, resolution):
        multiple = self.vae_scale_factor * self.config.patch_size
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of vae_scale_factor * patch_size = {multiple}")
        side = resolution // self.vae_scale_factor
        return (self.config.in_channels, side, side)

    def native_resolution(self) -> int:
        return self.config.sample_size * self.vae_scale_factor

    def schedule(self, num_steps, latent_shape):
        sched = self.pipeline.scheduler
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            tokens = (latent_shape[1] // self.config.patch_size) ** 2
            kwargs["mu"] = dynamic_shift_mu(sched, tokens, max_shift=1.16)
        return flow_sigmas(sched, num_steps, **kwargs)

    @torch.no_grad()
    def encode(self, prompt):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.pipeline.text_encoder.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return embeds[0], pooled[0]  # (S, D), (P,)

    def forward(self, net, x, s, cond):
        embeds, pooled = cond
        return net(hidden_states=x, timestep=s * self.num_train_timesteps, encoder_hidden_states=embeds,
                   pooled_projections=pooled, return_dict=False)[0].float()
