"""What a model family must provide to the policy: the contract every family class implements.

A family is everything about a diffusers pipeline that differs between SD3/SD3.5, FLUX.1,
SD1.5 and Wan2.1 (video): which module is the denoiser, the latent shape, the per-step schedule, how a prompt is
encoded, how the denoiser is called, and the sampling step (flow SDE/ODE or DDIM) with its
log-prob. The policy (`models/policy.py`) holds one family object, chosen once from the
pipeline's class in `model_index.json`, and nothing above it asks which family it runs.

The schedule is one (T+1,) float32 tensor `s` per run, stored in every `TreeBatch` as `sigmas`:
step i goes s[i] -> s[i+1], and the denoiser's timestep at step i is s[i] * num_train_timesteps.
Flow families: s is the noise level sigma (1 -> 0), as diffusers' flow pipelines use it. DDIM:
s[i] = t_i / num_train_timesteps for the scheduler's timesteps t_i, and s[T] is the last step's
previous timestep (negative: the scheduler's final alpha), exactly as `DDIMScheduler.step` reads it.
"""
from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch

from treegrpo_ray.algo.sde import SDEStep, flow_ode_step, flow_sde_step


@runtime_checkable
class Family(Protocol):
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s this family serves
    kind: str                          # "flow" | "ddim" (model.kind)
    denoiser_name: str                 # pipeline attribute and subfolder of the trained network
    cfg_scale: float                   # classifier-free guidance scale of the [uncond; cond] batch (<= 1: none)
    negative_prompt: str               # the uncond rows' prompt ("" for all but Qwen-Image's " ")

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, h, w) of the sampler's latents for square images of `resolution` pixels; a video
        family (class attribute `video = True`, built with `num_frames`) gives (C, F, h, w)."""

    def schedule(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(T+1,) float32 CPU schedule (see the module docstring)."""

    def encode(self, prompt: str) -> tuple[torch.Tensor, ...]:
        """The conditioning of ONE prompt (no batch dim), as the pipeline's encode_prompt gives it."""

    def forward(self, net: torch.nn.Module, x: torch.Tensor, s: torch.Tensor,
                cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Raw denoiser output (B, *latent_shape) float32 for latents x (B, *latent_shape) at schedule values s (B,)."""

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, g: float) -> torch.Tensor:
        """The guided prediction (B, C, h, w) from the uncond and cond halves, as the pipeline combines them."""

    def ode_step(self, x: torch.Tensor, out: torch.Tensor, s, s_next) -> torch.Tensor:
        """Deterministic step s -> s_next."""

    def sde_step(self, x: torch.Tensor, out: torch.Tensor, s, s_next, noise_level: float, *,
                 generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
                 n_children: int = 1, reduction: str = "mean") -> SDEStep:
        """Stochastic step with log-prob: sample n_children, or re-score prev_sample (B, K, C, h, w)."""


def linear_cfg(uncond: torch.Tensor, cond: torch.Tensor, g: float) -> torch.Tensor:
    """Classifier-free guidance as SD3, FLUX (true CFG) and SD1.5 pipelines combine it."""
    return uncond + g * (cond - uncond)


def check_schedule(values: torch.Tensor, num_steps: int, source: str) -> torch.Tensor:
    if values.shape != (num_steps + 1,) or not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"scheduler {source} gave the schedule {values.tolist()}; expected {num_steps + 1} strictly "
                         "decreasing values")
    return values


def dynamic_shift_mu(sched, image_tokens: int, max_shift: float) -> float:
    """The mu diffusers' flow pipelines pass to a dynamically shifted scheduler: their
    `calculate_shift` over the scheduler's config, with the pipeline's own default where the config
    has none (max_shift: SD3 1.16, FLUX 1.15; the two pipelines' copies of the function agree)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    c = sched.config
    return calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", max_shift))


def flow_sigmas(scheduler, num_steps: int, **set_timesteps_kwargs) -> torch.Tensor:
    """(T+1,) sigmas of a FlowMatchEulerDiscreteScheduler after `set_timesteps`, ending at 0."""
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; keep the pipeline's scheduler untouched
    sched.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
    sigmas = check_schedule(sched.sigmas.detach().to("cpu", torch.float32).clone(), num_steps,
                            type(sched).__name__)
    if float(sigmas[-1]) != 0.0 or float(sigmas[0]) > 1.0:
        raise ValueError(f"{type(sched).__name__} gave sigmas {sigmas.tolist()}; a flow schedule runs from <= 1 to 0")
    return sigmas


class FlowSteps:
    """The flow-matching steps (Flow-GRPO's SDE, Euler ODE) shared by the flow families."""

    kind = "flow"
    negative_prompt = ""
    guide = staticmethod(linear_cfg)

    def ode_step(self, x, out, s, s_next):
        return flow_ode_step(x, out, s, s_next)

    def sde_step(self, x, out, s, s_next, noise_level, *, generator=None, prev_sample=None, n_children=1,
                 reduction="mean"):
        return flow_sde_step(x, out, s, s_next, noise_level, generator=generator, prev_sample=prev_sample,
                             n_children=n_children, reduction=reduction)
