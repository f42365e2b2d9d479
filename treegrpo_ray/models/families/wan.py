"""Wan2.1 text-to-video (`WanPipeline`, the T2V 1.3B and 14B structures): flow matching over clips.

As in diffusers' `WanPipeline.__call__` (diffusers/pipelines/wan/pipeline_wan.py):
* latents are (B, C, F, h, w) with F = (num_frames - 1) // vae_scale_factor_temporal + 1 latent
  frames (Wan's VAE: 4x in time, the first frame alone) and h = w = resolution / 8; the
  transformer patchifies (1, 2, 2), so the resolution must be a multiple of 16 and num_frames of
  the form 4k + 1 (the pipeline rounds other values; we refuse them);
* prompts go through the pipeline's `encode_prompt`: UMT5 token states (S, 4096) with S =
  max_sequence_length (the pipeline's default 512), zeroed past each prompt's own tokens;
* the transformer gets timestep = sigma * num_train_timesteps (the scheduler's timesteps) and
  the token states, nothing pooled;
* classifier-free guidance is real CFG (no distilled guidance): out = uncond + g * (cond - uncond)
  with g = guidance_scale (the pipeline's default 5.0) and the negative prompt's states as uncond.
  The pipeline's default negative prompt is "" (negative_prompt=None -> ""), which is what the
  policy uses; Wan's model card suggests a long negative prompt, which the pipeline does not apply
  by itself. The pipeline runs cond and uncond as two calls; the policy runs them as one call of
  [uncond; cond] rows (equal up to float rounding).

Departure (the schedule): the hub's Wan2.1-Diffusers pipelines ship `UniPCMultistepScheduler`
(flow sigmas, flow_shift 3.0 for 480p, 5.0 for 720p), a multistep predictor-corrector. A TreeGRPO
step must be a one-step Gaussian with a log-prob, so we step with the flow Euler SDE/ODE
(`algo/sde.py`, as Flow-GRPO and DanceGRPO do for Wan) on the sigmas of a
`FlowMatchEulerDiscreteScheduler` with shift = the shipped `flow_shift`: a pipeline saved with
UniPC gets `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=flow_shift)` swapped in
(as SD1.5's PNDM is swapped for DDIM). The two schedulers' grids differ slightly (UniPC: shifted
linspace(1, 1/1000, T+1)[:-1] then 0; Euler: its own shifted linspace ending at 0), and so do
the samples: a checkpoint trained here is sampled best with the Euler scheduler
(`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(..., shift=flow_shift)`).

Export: LoRA loads with `pipe.load_lora_weights(dir)`; a full fine-tune with `pipe.transformer =
AutoModel.from_pretrained(dir, subfolder="transformer")`, because diffusers 0.42's
`from_pretrained(base, transformer=...)` ignores the keyword for WanPipeline (its transformer is an
optional component, taken for an optional keyword, and the saved one is loaded over it).

Not served: Wan2.2's two-expert pipelines (`transformer_2` / `boundary_ratio`) and its TI2V
per-token timesteps (`expand_timesteps`); image-to-video (`WanImageToVideoPipeline`). Sizes are
square (resolution x resolution), as for the image families; Wan's native 832x480 is not square.
"""
from __future__ import annotations

import torch

from treegrpo_ray.models.families.base import FlowSteps, flow_sigmas

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s default: 5 s at 16 fps + 1


def check_num_frames(num_frames: int, temporal: int = 4) -> int:
    """num_frames must be temporal * k + 1 >= 1 (Wan's VAE keeps the first frame alone, then
    compresses each `temporal` frames into one latent frame)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k + 1 (e.g. 1, 5, 9, ..., 81), got {num_frames}")
    return num_frames


def euler_scheduler_for(scheduler):
    """The FlowMatchEulerDiscreteScheduler a Wan pipeline is stepped with: the pipeline's own if it
    is one, else one with shift = the shipped scheduler's flow_shift (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    cfg = scheduler.config
    if not cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") != "flow_prediction":
        raise ValueError(f"{type(scheduler).__name__} is not a flow scheduler (use_flow_sigmas, flow_prediction); "
                         "a Wan pipeline ships UniPC with flow sigmas or a FlowMatchEulerDiscreteScheduler")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(cfg.num_train_timesteps),
                                           shift=float(cfg.get("flow_shift", 1.0)))


class WanFamily(FlowSteps):
    pipeline_classes = ("WanPipeline",)
    denoiser_name = "transformer"
    video = True  # latents (C, F, h, w); the policy passes num_frames

    def __init__(self, pipeline, *, vae_scale_factor: int, guidance_scale: float, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = 512, num_frames: int | None = None, vae_scale_factor_temporal: int = 4):
        if true_cfg_scale != 1.0:
            raise ValueError("true_cfg_scale is FLUX's option; Wan runs classifier-free guidance with guidance_scale")
        if pipeline.transformer is None or getattr(pipeline, "transformer_2", None) is not None \
                or pipeline.config.get("boundary_ratio") is not None or pipeline.config.get("expand_timesteps"):
            raise NotImplementedError("only Wan2.1's single-transformer WanPipeline is served (not Wan2.2's two "
                                      "experts or per-token timesteps)")
        pipeline.scheduler = euler_scheduler_for(pipeline.scheduler)
        self.pipeline, self.vae_scale_factor = pipeline, vae_scale_factor
        self.temporal = int(vae_scale_factor_temporal)
        self.num_frames = check_num_frames(DEFAULT_NUM_FRAMES if num_frames is None else int(num_frames),
                                           self.temporal)
        self.cfg_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.config = pipeline.transformer.config
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal + 1

    def latent_shape(self, resolution):
        _, ph, pw = self.config.patch_size
        multiple = self.vae_scale_factor * max(ph, pw)
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of vae_scale_factor * patch = {multiple}")
        side = resolution // self.vae_scale_factor
        return (self.config.in_channels, self.latent_frames, side, side)  # (C, F, h, w)

    def native_resolution(self) -> int:
        return 480  # Wan2.1's 480p (its 832x480 is not square; see the module docstring)

    def schedule(self, num_steps, latent_shape):
        return flow_sigmas(self.pipeline.scheduler, num_steps)  # Wan has no dynamic shifting: a fixed shift

    @torch.no_grad()
    def encode(self, prompt):
        device = self.pipeline.text_encoder.device
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False,
                                                num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length,
                                                device=device)
        return (embeds[0],)  # (S, D) UMT5 token states, zero past the prompt's tokens

    def forward(self, net, x, s, cond):
        (embeds,) = cond
        return net(hidden_states=x, timestep=s * self.num_train_timesteps, encoder_hidden_states=embeds,
                   return_dict=False)[0].float()  # (B, C, F, h, w)
