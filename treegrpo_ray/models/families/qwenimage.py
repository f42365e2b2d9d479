"""Qwen-Image (`QwenImagePipeline`): dual-stream MMDiT over packed latents, Qwen2.5-VL prompts, flow matching.

As in diffusers' `QwenImagePipeline.__call__` (diffusers 0.42):
* latents (B, C, h, w) are packed into (B, h/2 * w/2, 4C) tokens of 2x2 patches for the
  transformer (FLUX's packing, `flux.pack`) and unpacked after it; the transformer also gets
  `img_shapes` = [(1 frame, h/2, w/2)] per row for its 3-axis RoPE. The sampler, the step math and
  the reward side keep (B, C, h, w); the VAE's one-frame axis is added only when decoding
  (`rewards/decode.py`);
* prompts go through the pipeline's own `encode_prompt`: the Qwen2.5-VL chat template, the last
  hidden state, the template's first 34 tokens (`prompt_template_encode_start_idx`) dropped, at
  most `max_sequence_length` tokens kept. The result has a prompt-dependent length S;
* the transformer gets timestep = sigma (the pipeline passes t / 1000); Qwen-Image has no
  guidance embedding (a transformer saved with one is refused);
* true classifier-free guidance, `true_cfg_scale` > 1 with a negative prompt, and then the
  combined prediction is rescaled per token to the conditional prediction's norm (`guide`);
* sigmas = linspace(1, 1/T, T) shifted by mu = calculate_shift(image tokens) over the scheduler's
  config (Qwen-Image ships dynamic exponential shifting with shift_terminal 0.02).

Variable-length prompts. The PromptCache stores one fixed-shape tuple per prompt and stacks them,
so `encode` pads each prompt's (S, D) embedding with zeros to (max_sequence_length, D) and returns
the (max_sequence_length,) mask of its valid tokens, as the pipeline pads a batch of prompts to
its longest one. `forward` cuts the batch back to its longest valid prompt before the transformer,
so a call costs what the pipeline's own batch would (not max_sequence_length text tokens), and it
passes no mask when every token is valid (the pipeline's `encode_prompt` rule). Padded text tokens
are excluded from attention by the mask and their RoPE positions follow the valid ones, so a
prompt's result does not depend on the padding (to float rounding; tests/test_family_qwenimage.py
holds it equal to the pipeline, which runs cond and uncond as two calls of different lengths).

Departures: the negative prompt is " " (Qwen's published example; the pipeline's default is none,
which turns CFG off); cond and uncond rows run in ONE transformer call of 2B rows, as the other
families (the pipeline makes two calls); the CFG rescale is computed on the float32 outputs.
"""
from __future__ import annotations

import numpy as np
import torch

from treegrpo_ray.models.families.base import FlowSteps, dynamic_shift_mu, flow_sigmas
from treegrpo_ray.models.families.flux import pack, packed_latent_shape, unpack


def norm_rescaled_cfg(uncond: torch.Tensor, cond: torch.Tensor, g: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG for (B, C, h, w) predictions: comb = uncond + g (cond - uncond),
    then each packed token (a 2x2 patch, 4C values) of comb is scaled to the norm of cond's:
    comb * ||cond_tok|| / ||comb_tok||. Computed on packed tokens as the pipeline does."""
    _, _, h, w = cond.shape
    comb, cond_tok = pack(uncond + g * (cond - uncond)), pack(cond)       # (B, h/2 * w/2, 4C)
    scale = cond_tok.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)  # (B, h/2 * w/2, 1)
    return unpack(comb * scale, h, w)


class QwenImageFamily(FlowSteps):
    pipeline_classes = ("QwenImagePipeline",)
    denoiser_name = "transformer"
    negative_prompt = " "  # Qwen-Image's published example (with true_cfg_scale 4.0)

    def __init__(self, pipeline, *, vae_scale_factor: int, guidance_scale: float, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = 512):
        self.pipeline, self.vae_scale_factor = pipeline, vae_scale_factor
        self.config = pipeline.transformer.config
        if self.config.guidance_embeds:
            raise NotImplementedError("this Qwen-Image transformer has a guidance embedding (a guidance-distilled "
                                      "variant); only Qwen-Image's true CFG (true_cfg_scale) is supported")
        if not 1 <= max_sequence_length <= 1024:  # QwenImagePipeline.check_inputs' limit
            raise ValueError(f"max_sequence_length must be in [1, 1024] for Qwen-Image, got {max_sequence_length}")
        self.cfg_scale = float(true_cfg_scale)  # guidance_scale is ignored, as the pipeline ignores it
        self.max_sequence_length = max_sequence_length
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)

    def latent_shape(self, resolution):
        return packed_latent_shape(self.config.in_channels, self.vae_scale_factor, resolution, "Qwen-Image")

    def native_resolution(self) -> int:
        return 128 * self.vae_scale_factor  # QwenImagePipeline: default_sample_size 128 * vae_scale_factor

    def schedule(self, num_steps, latent_shape):
        tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        # the pipeline passes mu always; the scheduler reads it only when use_dynamic_shifting is set
        mu = dynamic_shift_mu(self.pipeline.scheduler, tokens, max_shift=1.15)
        return flow_sigmas(self.pipeline.scheduler, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                           mu=mu)

    @torch.no_grad()
    def encode(self, prompt):
        device = self.pipeline.text_encoder.device
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1,
                                                max_sequence_length=self.max_sequence_length)
        s, length = embeds.shape[1], self.max_sequence_length       # (1, S, D): one prompt, all S tokens valid
        padded = embeds[0].new_zeros(length, embeds.shape[2])
        padded[:s] = embeds[0]
        mask = torch.zeros(length, device=embeds.device)
        mask[:s] = 1
        return padded, mask                                          # (L, D) zero-padded, (L,) 1 = valid token

    def forward(self, net, x, s, cond):
        embeds, mask = cond                                          # (B, L, D), (B, L)
        b, _, h, w = x.shape
        mask = mask > 0.5                                            # the cache keeps it in the model dtype
        n = int(mask.sum(dim=1).max())                               # the batch's longest prompt
        embeds, mask = embeds[:, :n], mask[:, :n]
        t = (s * self.num_train_timesteps).to(x.dtype) / 1000        # the pipeline's timestep / 1000, in its dtype
        out = net(hidden_states=pack(x), timestep=t, encoder_hidden_states=embeds,
                  encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out, h, w).float()

    @staticmethod
    def guide(uncond, cond, g):
        return norm_rescaled_cfg(uncond, cond, g)
