"""SD1.5 (`StableDiffusionPipeline`): epsilon-prediction UNet with DDIM, DDPO's setting.

As in diffusers' `StableDiffusionPipeline.__call__` and ddpo-pytorch's `pipeline_with_logprob`:
the UNet gets the scheduler's integer timestep t and the CLIP token embeddings (77, D); CFG runs
[uncond; cond] in one call with the empty prompt as uncond; a step t -> prev goes through
`algo.sde.ddim_step_with_logprob` with alpha_prod_t = alphas_cumprod[t] and alpha_prod_prev =
alphas_cumprod[t - num_train_timesteps // T] (the scheduler's `final_alpha_cumprod` below 0), which
is `DDIMScheduler.step`'s rule; eta = tree.noise_level (DDPO: 1.0), eta 0 is the deterministic
DDIM ODE step. Only schedules whose consecutive timesteps are that step apart ("leading" or
"trailing" spacing, as SD1.5 ships) are accepted, and only epsilon prediction. A pipeline saved
with another scheduler (SD1.5 ships PNDM) gets `DDIMScheduler.from_config` of its config, as
ddpo-pytorch does.

The same class would serve SDXL only with its added conditioning (pooled text embeds and time
ids); `StableDiffusionXLPipeline` is not accepted.
"""
from __future__ import annotations

import copy

import torch

from treegrpo_ray.algo.sde import ddim_step_with_logprob
from treegrpo_ray.models.families.base import check_schedule, linear_cfg


class SD15Family:
    pipeline_classes = ("StableDiffusionPipeline",)
    kind = "ddim"
    denoiser_name = "unet"
    negative_prompt = ""
    guide = staticmethod(linear_cfg)

    def __init__(self, pipeline, *, vae_scale_factor: int, guidance_scale: float, true_cfg_scale: float = 1.0,
                 max_sequence_length: int = 77):
        if true_cfg_scale != 1.0:
            raise ValueError("true_cfg_scale is FLUX's option; SD1.5 runs classifier-free guidance with guidance_scale")
        from diffusers import DDIMScheduler

        if not isinstance(pipeline.scheduler, DDIMScheduler):  # SD1.5 ships PNDM; DDPO swaps in DDIM the same way
            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        sched = pipeline.scheduler
        if sched.config.clip_sample:
            raise ValueError("the DDIM scheduler clips x0 (clip_sample=True), which the DDIM log-prob step does not "
                             "model; save the pipeline's scheduler with clip_sample=False (SD1.5's is)")
        if sched.config.prediction_type != "epsilon":
            raise ValueError(f"the scheduler predicts {sched.config.prediction_type!r}; only epsilon-prediction UNets "
                             "(SD1.x) are supported")
        self.pipeline, self.vae_scale_factor = pipeline, vae_scale_factor
        self.cfg_scale = float(guidance_scale)
        self.config = pipeline.unet.config
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.detach().to(torch.float32).cpu()     # (num_train_timesteps,)
        self.final_alpha_cumprod = float(sched.final_alpha_cumprod)

    def latent_shape(self, resolution):
        multiple = self.vae_scale_factor * 2 ** (len(self.config.block_out_channels) - 1)
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of vae_scale_factor * 2**(UNet downsamplings)"
                             f" = {multiple}")
        side = resolution // self.vae_scale_factor
        return (self.config.in_channels, side, side)

    def native_resolution(self) -> int:
        return self.config.sample_size * self.vae_scale_factor

    def schedule(self, num_steps, latent_shape):
        sched = copy.deepcopy(self.pipeline.scheduler)
        sched.set_timesteps(num_steps, device="cpu")
        ts = sched.timesteps.to(torch.long)                                               # (T,)
        ratio = self.num_train_timesteps // num_steps
        if not bool((ts[:-1] - ts[1:] == ratio).all()):
            raise ValueError(f"DDIM timesteps {ts.tolist()} are not {ratio} apart, which DDIMScheduler.step assumes "
                             f"(timestep_spacing={sched.config.timestep_spacing!r}); use 'leading' or 'trailing'")
        values = torch.cat([ts, ts[-1:] - ratio]).to(torch.float32) / self.num_train_timesteps  # (T+1,)
        return check_schedule(values, num_steps, "DDIMScheduler")

    def _timestep(self, s) -> torch.Tensor:
        """Schedule values -> integer timesteps (exact: t / 1000 round-trips in float32)."""
        return torch.round(torch.as_tensor(s, dtype=torch.float32) * self.num_train_timesteps).long()

    def _alpha(self, s, device) -> torch.Tensor:
        t = self._timestep(s).cpu().reshape(-1)
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.tensor(self.final_alpha_cumprod))
        return a.to(device)

    @torch.no_grad()
    def encode(self, prompt):
        embeds, _ = self.pipeline.encode_prompt(prompt=[prompt], device=self.pipeline.text_encoder.device,
                                                num_images_per_prompt=1, do_classifier_free_guidance=False)
        return (embeds[0],)  # (77, D)

    def forward(self, net, x, s, cond):
        (embeds,) = cond
        return net(x, self._timestep(s).to(x.device), encoder_hidden_states=embeds, return_dict=False)[0].float()

    def _step(self, x, out, s, s_next, eta, **kw):
        b = x.shape[0]
        a_t = self._alpha(torch.as_tensor(s).reshape(-1).expand(b), x.device)
        a_prev = self._alpha(torch.as_tensor(s_next).reshape(-1).expand(b), x.device)
        return ddim_step_with_logprob(x, out, a_t, a_prev, eta, **kw)

    def ode_step(self, x, out, s, s_next):
        return self._step(x, out, s, s_next, 0.0).sample[:, 0]

    def sde_step(self, x, out, s, s_next, noise_level, *, generator=None, prev_sample=None, n_children=1,
                 reduction="mean"):
        return self._step(x, out, s, s_next, noise_level, generator=generator, prev_sample=prev_sample,
                          n_children=n_children, reduction=reduction)
