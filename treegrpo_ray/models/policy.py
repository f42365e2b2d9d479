"""The diffusion policy: a diffusers flow-matching pipeline seen as pi_theta(x_{t-1} | x_t, c).

What the sampler and learner need from the model, and nothing else:

* loading by hub id or local dir through `DiffusionPipeline.from_pretrained` (HF_HUB_OFFLINE is
  honoured by huggingface_hub); components saved as null (e.g. SD3 without T5) load as None;
* the transformer is the trainable module (LoRA via peft, or full fine-tune); text encoders are
  frozen; the VAE is never loaded (the reward pool decodes leaf latents);
* `velocity`: the CFG-guided velocity for a batch of nodes at mixed timesteps, cond and uncond
  rows in ONE transformer call of 2B rows. As in diffusers' `StableDiffusion3Pipeline.__call__`
  the transformer gets timestep = sigma * num_train_timesteps and the guided output is
  v = v_uncond + g * (v_cond - v_uncond); g <= 1 runs the cond half only (diffusers' rule);
* `sigmas`: the scheduler's (shifted) noise levels for T steps, including resolution-dependent
  dynamic shifting (mu from `calculate_shift`) when the scheduler config asks for it;
* broadcast state (the tensors that change in training), export for plain diffusers, and the
  reference policy for the optional KL term.

Departures from the diffusers pipeline: no skip-layer guidance, no negative prompt other than
"" (what the pipeline uses by default), and the latent state is kept in float32 by the sampler
while the transformer runs in `dtype`. Only the SD3 family (SD3, SD3.5) is supported for
kind="flow"; FLUX packs latents and takes extra ids, and kind="ddim" (epsilon-prediction UNets)
is not implemented (see `from_pretrained`).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from treegrpo_ray.models.devices import resolve_device, resolve_dtype
from treegrpo_ray.models.fingerprint import Fingerprint, fingerprint, verify
from treegrpo_ray.models.lora import adapters_disabled, add_lora, export_lora
from treegrpo_ray.models.prompts import PromptCache

SUPPORTED_FLOW_PIPELINES = ("StableDiffusion3Pipeline",)
def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (deprecating the old name); pass whichever it takes."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _load_flow_pipeline(path_or_id: str, dtype: torch.dtype):
    """Load an SD3-family pipeline without its VAE; returns (pipeline, vae_scale_factor)."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    index = DiffusionPipeline.load_config(path_or_id)
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_FLOW_PIPELINES:
        raise NotImplementedError(f"{path_or_id} is a {cls_name}; kind='flow' supports {SUPPORTED_FLOW_PIPELINES} "
                                  "(SD3 / SD3.5). FLUX-style pipelines need latent packing and are not wired up.")
    # components saved as [null, null] (e.g. text_encoder_3 of an SD3 without T5) must be passed
    # explicitly or diffusers refuses to build the pipeline
    absent = {k: None for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is None}
    vae_scale_factor = 8  # diffusers' default when a pipeline has no VAE
    if index.get("vae", [None])[0] is not None:
        vae_cfg = AutoencoderKL.load_config(path_or_id, subfolder="vae")
        vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    pipe = DiffusionPipeline.from_pretrained(path_or_id, **dtype_kwargs(dtype), **{**absent, "vae": None})
    return pipe, vae_scale_factor


def _tensor_named(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


class DiffusionPolicy:
    """A flow-matching text-to-image policy (see module docstring). Build with `from_pretrained`."""

    def __init__(self, pipeline, *, source: str, vae_scale_factor: int, device: torch.device, dtype: torch.dtype,
                 lora_rank: int, lora_alpha: float | None, lora_targets: tuple[str, ...], guidance_scale: float,
                 max_sequence_length: int, resolution: int | None, seed: int = 0):
        self.pipeline, self.source = pipeline, source
        self.device, self.dtype = device, dtype
        self.guidance_scale = float(guidance_scale)
        self.transformer = pipeline.transformer.to(device).eval()
        self.scheduler = pipeline.scheduler
        for name, comp in pipeline.components.items():
            if isinstance(comp, torch.nn.Module) and name != "transformer":
                comp.to(device).requires_grad_(False).eval()
        self.lora = lora_rank > 0
        if self.lora:
            self._trainable = add_lora(self.transformer, rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets),
                                       seed=seed)
        else:
            self.transformer.requires_grad_(True)
            self._trainable = [n for n, _ in self.transformer.named_parameters()]
        cfg = self.transformer.config
        self.vae_scale_factor = vae_scale_factor
        self.resolution = resolution or cfg.sample_size * vae_scale_factor
        if self.resolution % (vae_scale_factor * cfg.patch_size):
            raise ValueError(f"resolution {self.resolution} must be a multiple of vae_scale_factor * patch_size = "
                             f"{vae_scale_factor * cfg.patch_size}")
        side = self.resolution // vae_scale_factor
        self.latent_shape = (cfg.in_channels, side, side)  # (C, h, w)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prompts = PromptCache(pipeline, device=device, dtype=dtype, max_sequence_length=max_sequence_length)
        self.negative_prompt = ""
        self._reference: torch.nn.Module | None = None
        self._in_reference = False

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, kind: str = "flow", dtype="float32", device="cpu",
                        lora_rank: int = 0, lora_alpha: float | None = None,
                        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                        guidance_scale: float = 4.5, max_sequence_length: int = 256,
                        resolution: int | None = None, seed: int = 0) -> "DiffusionPolicy":
        """Load a diffusers pipeline (hub id or local `save_pretrained` dir) as a policy.

        kind: "flow" (SD3 / SD3.5 flow matching). "ddim" (StableDiffusionPipeline + DDIMScheduler,
        epsilon prediction) raises NotImplementedError. dtype: "float32" | "bfloat16" | "float16"
        (weights of transformer and text encoders; LoRA adapters stay float32). device: "cpu",
        "cuda[:i]" or "auto". lora_rank 0 = full fine-tune; lora_alpha None = rank.
        max_sequence_length: T5 tokens per prompt (an SD3 saved without T5 gets that many zero
        tokens). resolution: image side in pixels (None = the transformer's
        native sample_size * vae_scale_factor). seed: LoRA init.
        """
        if kind == "ddim":
            raise NotImplementedError("kind='ddim' (epsilon-prediction UNet: StableDiffusionPipeline + "
                                      "DDIMScheduler) is not implemented by DiffusionPolicy yet; "
                                      "algo.sde.ddim_step_with_logprob has the step math. Use kind='flow'.")
        if kind != "flow":
            raise ValueError(f"kind must be 'flow' or 'ddim', got {kind!r}")
        torch_dtype = resolve_dtype(dtype)
        pipe, vsf = _load_flow_pipeline(str(path_or_id), torch_dtype)
        return cls(pipe, source=str(path_or_id), vae_scale_factor=vsf, device=resolve_device(device),
                   dtype=torch_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                   guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, resolution=resolution,
                   seed=seed)

    # ------------------------------------------------------------------ model calls
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """(T+1,) float32 CPU noise levels sigmas[0] = 1 ... sigmas[T] = 0, as the pipeline uses them."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        sched = copy.deepcopy(self.scheduler)  # set_timesteps mutates; keep the policy's scheduler untouched
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            patches = (self.latent_shape[1] // self.transformer.config.patch_size) ** 2
            kwargs["mu"] = calculate_shift(patches, sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
        sigmas = sched.sigmas.detach().to("cpu", torch.float32).clone()
        if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(f"scheduler {type(sched).__name__} gave sigmas {sigmas.tolist()}; expected {num_steps + 1} "
                             "strictly decreasing values ending at 0")
        return sigmas

    def velocity(self, latents: torch.Tensor, sigmas, prompts: list[str], *, module: torch.nn.Module | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """Guided velocity (B, C, h, w) float32 for latents (B, C, h, w) at noise levels sigmas (B,) or float.

        One transformer call on 2B rows [uncond; cond] when guidance > 1, else on the B cond rows.
        Gradients flow when called outside no_grad (the learner); `module` replaces the transformer
        (e.g. its DDP wrapper). Inside `reference()` the reference model is used by default.
        """
        b = latents.shape[0]
        if len(prompts) != b:
            raise ValueError(f"velocity got {b} latents but {len(prompts)} prompts")
        g = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        sig = torch.as_tensor(sigmas, dtype=torch.float32, device=self.device).reshape(-1).expand(b)  # (B,)
        embeds, pooled = self.prompts.encode(list(prompts))  # (B, S, D), (B, P)
        x = latents.to(self.device, self.dtype)
        t = sig * self.num_train_timesteps
        if g > 1:
            neg_embeds, neg_pooled = self.prompts.encode([self.negative_prompt])
            x, t = torch.cat([x, x]), torch.cat([t, t])  # (2B, ...)
            embeds = torch.cat([neg_embeds.expand(b, -1, -1), embeds])
            pooled = torch.cat([neg_pooled.expand(b, -1), pooled])
        net = module if module is not None else (self._reference if self._in_reference and not self.lora
                                                 else self.transformer)
        out = net(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                  return_dict=False)[0].float()
        if g > 1:
            uncond, cond = out.chunk(2)
            return uncond + g * (cond - uncond)
        return out

    # ------------------------------------------------------------------ training state
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = dict(self.transformer.named_parameters())
        return [params[n] for n in self._trainable]

    def _broadcast_source(self) -> dict[str, torch.Tensor]:
        if self.lora:
            params = dict(self.transformer.named_parameters())
            return {n: params[n] for n in self._trainable}
        return self.transformer.state_dict()

    def state_for_broadcast(self) -> dict[str, torch.Tensor]:
        """The tensors that training changes (LoRA adapters, or the whole transformer), as
        contiguous CPU copies (safe to `ray.put` while training goes on)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._broadcast_source().items()}

    def live_state(self) -> dict[str, torch.Tensor]:
        """The broadcast tensors looked up by name on the transformer the forward pass runs (not
        through `_broadcast_source`, the path loading writes through): what a fingerprint of
        loaded weights must be computed from."""
        names = self._trainable if self.lora else list(self.transformer.state_dict(keep_vars=True))
        return {n: _tensor_named(self.transformer, n) for n in names}

    def fingerprint(self) -> Fingerprint:
        return fingerprint(self.live_state())

    @torch.no_grad()
    def load_broadcast_state(self, state: dict[str, torch.Tensor], expected: Fingerprint | None = None,
                             version: int = -1) -> None:
        """Copy a `state_for_broadcast()` dict in. Wrong keys or shapes raise ValueError. With the
        publisher's fingerprint, the live weights are checked against it afterwards
        (WeightSyncError on any difference)."""
        target = self._broadcast_source()
        missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        if missing or extra:
            raise ValueError(f"broadcast state keys differ from this policy's (lora={self.lora}): "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        bad = [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
        if bad:
            raise ValueError(f"broadcast state shapes differ for {bad[:3]}: got {tuple(state[bad[0]].shape)}, "
                             f"expected {tuple(target[bad[0]].shape)}")
        for k, t in target.items():
            t.copy_(state[k])
        if expected is not None:
            verify(expected, self.fingerprint(), version=version, where="this policy's transformer")

    def export(self, out_dir: str | Path) -> Path:
        """Write the trained result for plain diffusers.

        LoRA: `pytorch_lora_weights.safetensors` in out_dir -> `pipe.load_lora_weights(out_dir)`.
        Full: out_dir/transformer (`save_pretrained`) -> `StableDiffusion3Pipeline.from_pretrained(
        base, transformer=SD3Transformer2DModel.from_pretrained(out_dir, subfolder="transformer"))`.
        """
        out_dir = Path(out_dir)
        if self.lora:
            return export_lora(type(self.pipeline), self.transformer, out_dir)
        self.transformer.save_pretrained(out_dir / "transformer")
        return out_dir

    @contextlib.contextmanager
    def reference(self):
        """Inside the block `velocity` runs the reference (pre-training) policy; yields its module.

        LoRA: the same transformer with adapters disabled. Full fine-tune: a frozen copy of the
        base transformer re-loaded from `source` on first use (so it is the true starting point
        even after resume, and costs memory only when the KL term is used).
        """
        if self.lora:
            with adapters_disabled(self.transformer) as module:
                yield module
            return
        if self._reference is None:
            self._reference = self._load_reference()
        self._in_reference = True
        try:
            yield self._reference
        finally:
            self._in_reference = False

    def _load_reference(self) -> torch.nn.Module:
        cls = type(self.transformer)
        ref = cls.from_pretrained(self.source, subfolder="transformer", **dtype_kwargs(self.dtype))
        return ref.to(self.device).requires_grad_(False).eval()
