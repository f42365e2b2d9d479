"""The diffusion policy: a diffusers text-to-image pipeline seen as pi_theta(x_{t-1} | x_t, c).

What the sampler and learner need from the model, and nothing else, for every supported family
(SD3/SD3.5, FLUX.1, SD1.5 with DDIM, Qwen-Image, Wan2.1 text-to-video: `models/families/`), chosen
once from the pipeline's class. Video latents are (B, C, F, h, w) where images have (B, C, h, w):

* loading by hub id or local dir through `DiffusionPipeline.from_pretrained` (HF_HUB_OFFLINE is
  honoured by huggingface_hub); components saved as null (e.g. SD3 without T5) load as None;
* the denoiser (the transformer, or SD1.5's UNet) is the trainable module (LoRA via peft, or full
  fine-tune); text encoders are frozen; the VAE is never loaded (the reward pool decodes leaves);
* `predict`: the guided denoiser output (flow: velocity; DDIM: epsilon) for a batch of nodes at
  mixed steps, cond and uncond rows in ONE call of 2B rows when the family runs classifier-free
  guidance: out = out_uncond + g * (out_cond - out_uncond) (Qwen-Image then rescales it to the
  cond half's norm per token: `families/qwenimage.py`); g <= 1 runs the cond half only
  (diffusers' rule). FLUX.1-dev's guidance is an embedding instead (see `families/flux.py`);
* `sigmas`, `ode_step`, `sde_step`: the family's schedule and steps (flow SDE/ODE or DDIM);
* broadcast state (the tensors that change in training), export for plain diffusers, and the
  reference policy for the optional KL term.

Departures from the diffusers pipelines: no skip-layer guidance, no negative prompt other than
the family's ("", what the pipelines use by default; Qwen-Image " ", its published example), and
the latent state is kept in float32 by the sampler while the denoiser runs in `dtype`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from treegrpo_ray.algo.sde import SDEStep
from treegrpo_ray.models.devices import resolve_device, resolve_dtype
from treegrpo_ray.models.families import family_for
from treegrpo_ray.models.fingerprint import Fingerprint, fingerprint, verify
from treegrpo_ray.models.lora import adapters_disabled, add_lora, export_lora
from treegrpo_ray.models.prompts import PromptCache

def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (deprecating the old name); pass whichever it takes."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def vae_scale_factor_of(vae_config: dict) -> int:
    """Pixels per latent side, as the pipelines compute it: AutoencoderKLWan states it
    (scale_factor_spatial); AutoencoderKL 2**(levels - 1); Qwen-Image's 3-D VAE
    2**len(temperal_downsample)."""
    if "scale_factor_spatial" in vae_config:
        return int(vae_config["scale_factor_spatial"])
    if "temperal_downsample" in vae_config:  # diffusers' spelling
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _load_pipeline(path_or_id: str, dtype: torch.dtype, kind: str = "auto"):
    """Load a supported pipeline without its VAE (and safety checker); returns (pipeline, vae_scale_factor)."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    index = DiffusionPipeline.load_config(path_or_id)
    family = family_for(index.get("_class_name"))  # NotImplementedError names the supported pipelines
    if kind not in ("auto", family.kind):
        raise ValueError(f"model.kind={kind!r} but {path_or_id} is a {index.get('_class_name')} ({family.kind}); "
                         "use model.kind=auto")
    # components saved as [null, null] (e.g. text_encoder_3 of an SD3 without T5) must be passed
    # explicitly or diffusers refuses to build the pipeline
    absent = {k: None for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is None}
    skip = {name: None for name in ("vae", "safety_checker", "feature_extractor", "image_encoder") if name in index}
    vae_scale_factor = 8  # diffusers' default when a pipeline has no VAE
    temporal = None
    if index.get("vae", [None])[0] is not None:
        vae_cfg = AutoencoderKL.load_config(path_or_id, subfolder="vae")
        vae_scale_factor = vae_scale_factor_of(vae_cfg)
        if index.get("_class_name") == "WanPipeline" and "scale_factor_temporal" in vae_cfg:
            temporal = int(vae_cfg["scale_factor_temporal"])  # AutoencoderKLWan states it (4)
    extra = {"requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(path_or_id, **dtype_kwargs(dtype), **{**absent, **skip}, **extra)
    if temporal is not None:  # what WanPipeline.__init__ reads off the VAE it was not given here
        pipe.vae_scale_factor_temporal = temporal
    return pipe, vae_scale_factor


def _tensor_named(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


class DiffusionPolicy:
    """A text-to-image policy over one model family (see module docstring). Build with `from_pretrained`."""

    def __init__(self, pipeline, *, source: str, vae_scale_factor: int, device: torch.device, dtype: torch.dtype,
                 lora_rank: int, lora_alpha: float | None, lora_targets: tuple[str, ...], guidance_scale: float,
                 max_sequence_length: int, resolution: int | None, true_cfg_scale: float = 1.0, seed: int = 0,
                 num_frames: int | None = None):
        self.pipeline, self.source = pipeline, source
        self.device, self.dtype = device, dtype
        family = family_for(type(pipeline).__name__)
        video = {}
        if getattr(family, "video", False):
            video = {"num_frames": num_frames,
                     "vae_scale_factor_temporal": getattr(pipeline, "vae_scale_factor_temporal", 4)}
        elif num_frames is not None:
            raise ValueError(f"num_frames={num_frames} is for video pipelines; {type(pipeline).__name__} makes images")
        self.family = family(pipeline, vae_scale_factor=vae_scale_factor, guidance_scale=guidance_scale,
                             true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, **video)
        self.denoiser = getattr(pipeline, self.family.denoiser_name).to(device).eval()
        for name, comp in pipeline.components.items():
            if isinstance(comp, torch.nn.Module) and name != self.family.denoiser_name:
                comp.to(device).requires_grad_(False).eval()
        self.lora = lora_rank > 0
        if self.lora:
            self._trainable = add_lora(self.denoiser, rank=lora_rank, alpha=lora_alpha, targets=tuple(lora_targets),
                                       seed=seed)
        else:
            self.denoiser.requires_grad_(True)
            self._trainable = [n for n, _ in self.denoiser.named_parameters()]
        self.vae_scale_factor = vae_scale_factor
        self.resolution = resolution or self.family.native_resolution()
        self.latent_shape = self.family.latent_shape(self.resolution)  # (C, h, w) or video's (C, F, h, w); checks it
        self.num_frames = getattr(self.family, "num_frames", None)    # video frames in pixels; None for images
        self.prompts = PromptCache(self.family.encode, device=device, dtype=dtype)
        self.negative_prompt = self.family.negative_prompt
        self._reference: torch.nn.Module | None = None
        self._in_reference = False

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, kind: str = "auto", dtype="float32", device="cpu",
                        lora_rank: int = 0, lora_alpha: float | None = None,
                        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                        guidance_scale: float = 4.5, true_cfg_scale: float = 1.0, max_sequence_length: int = 256,
                        resolution: int | None = None, seed: int = 0,
                        num_frames: int | None = None) -> "DiffusionPolicy":
        """Load a diffusers pipeline (hub id or local `save_pretrained` dir) as a policy.

        The family comes from the pipeline's class (model_index.json): StableDiffusion3Pipeline,
        FluxPipeline, StableDiffusionPipeline (with a DDIMScheduler), QwenImagePipeline or WanPipeline. kind:
        "auto", or "flow" / "ddim" to insist on one. dtype: "float32" | "bfloat16" | "float16" (weights of the denoiser
        and text encoders; LoRA adapters stay float32). device: "cpu", "cuda[:i]" or "auto".
        lora_rank 0 = full fine-tune; lora_alpha None = rank. guidance_scale: CFG scale (FLUX.1-dev:
        the guidance embedding); true_cfg_scale: FLUX and Qwen-Image, real CFG with the family's
        negative prompt.
        max_sequence_length: T5 tokens per prompt (SD3 saved without T5 gets that many zero tokens).
        resolution: image side in pixels (None = the model's native size). seed: LoRA init.
        num_frames: video pipelines (WanPipeline) only, frames per clip, 4k + 1 (None = 81, the
        pipeline's default); an image pipeline refuses it.
        """
        if kind not in ("auto", "flow", "ddim"):
            raise ValueError(f"kind must be 'auto', 'flow' or 'ddim', got {kind!r}")
        torch_dtype = resolve_dtype(dtype)
        pipe, vsf = _load_pipeline(str(path_or_id), torch_dtype, kind)
        return cls(pipe, source=str(path_or_id), vae_scale_factor=vsf, device=resolve_device(device),
                   dtype=torch_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                   guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                   max_sequence_length=max_sequence_length, resolution=resolution, seed=seed, num_frames=num_frames)

    # ------------------------------------------------------------------ model calls
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """(T+1,) float32 CPU schedule as the pipeline uses it: flow sigmas 1 ... 0, or DDIM's
        t / num_train_timesteps (see `families/base.py`)."""
        return self.family.schedule(num_steps, self.latent_shape)

    def predict(self, latents: torch.Tensor, sigmas, prompts: list[str], *, module: torch.nn.Module | None = None,
                cfg_scale: float | None = None, uncond_grad: bool = True) -> torch.Tensor:
        """Guided denoiser output (B, C, h, w) float32 for latents (B, C, h, w) at schedule values sigmas (B,) or float.

        One denoiser call on 2B rows [uncond; cond] when the CFG scale is > 1, else on the B cond rows.
        Gradients flow when called outside no_grad (the learner): through both halves (ddpo-pytorch,
        DanceGRPO's SD trainer, Flow-GRPO since mid-2025), or with `uncond_grad=False` through the
        conditional half only (Flow-GRPO's July-2025 trainer detaches the unconditional output).
        `module` replaces the denoiser (e.g. its DDP wrapper). Inside `reference()` the reference
        model is used by default.
        """
        b = latents.shape[0]
        if len(prompts) != b:
            raise ValueError(f"predict got {b} latents but {len(prompts)} prompts")
        g = self.family.cfg_scale if cfg_scale is None else float(cfg_scale)
        s = torch.as_tensor(sigmas, dtype=torch.float32, device=self.device).reshape(-1).expand(b)  # (B,)
        cond = self.prompts.encode(list(prompts))  # each (B, ...)
        x = latents.to(self.device, self.dtype)
        if g > 1:
            neg = self.prompts.encode([self.negative_prompt])
            x, s = torch.cat([x, x]), torch.cat([s, s])  # (2B, ...)
            cond = tuple(torch.cat([n.expand(b, *n.shape[1:]), c]) for n, c in zip(neg, cond))
        net = module if module is not None else (self._reference if self._in_reference and not self.lora
                                                 else self.denoiser)
        out = self.family.forward(net, x, s, cond)
        if g > 1:
            uncond, cond_out = out.chunk(2)
            if not uncond_grad:
                uncond = uncond.detach()
            return self.family.guide(uncond, cond_out, g)  # Qwen-Image also rescales to the cond norm
        return out

    def ode_step(self, x: torch.Tensor, out: torch.Tensor, s, s_next) -> torch.Tensor:
        """Deterministic step s -> s_next (flow: Euler; DDIM: eta 0), float32."""
        return self.family.ode_step(x, out, s, s_next)

    def sde_step(self, x: torch.Tensor, out: torch.Tensor, s, s_next, noise_level: float, *,
                 generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
                 n_children: int = 1, reduction: str = "mean") -> SDEStep:
        """Stochastic step with log-prob (flow: Flow-GRPO's SDE; DDIM: DDPO's step): draw n_children
        from one Gaussian, or re-score prev_sample (B, K, C, h, w)."""
        return self.family.sde_step(x, out, s, s_next, noise_level, generator=generator, prev_sample=prev_sample,
                                    n_children=n_children, reduction=reduction)

    # ------------------------------------------------------------------ training state
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = dict(self.denoiser.named_parameters())
        return [params[n] for n in self._trainable]

    def trainable_names(self) -> list[str]:
        """Names of the tensors the optimizer steps, in its order."""
        params = dict(self.denoiser.named_parameters())
        return [n for n in self._trainable if params[n].requires_grad]

    def _broadcast_source(self) -> dict[str, torch.Tensor]:
        if self.lora:
            params = dict(self.denoiser.named_parameters())
            return {n: params[n] for n in self._trainable}
        return self.denoiser.state_dict()

    def broadcast_tensors(self):
        """(name, whole tensor) of the tensors that training changes (LoRA adapters, or the whole
        denoiser), one at a time, on the model's device: the denoiser's in `model.dtype` (a sharded
        learner's float32 shards are gathered and cast: a collective every rank runs), LoRA
        adapters in float32. The publisher streams these; nothing holds them all at once."""
        from torch.distributed.tensor import DTensor
        for name, t in self._broadcast_source().items():
            t = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            yield name, (t.to(self.dtype) if not self.lora and t.is_floating_point() and t.dtype != self.dtype else t)

    def state_for_broadcast(self) -> dict[str, torch.Tensor]:
        """`broadcast_tensors` as a dict of contiguous CPU copies (safe to keep while training goes on)."""
        return {k: v.to("cpu", copy=True).contiguous() for k, v in self.broadcast_tensors()}

    def live_state(self) -> dict[str, torch.Tensor]:
        """The broadcast tensors looked up by name on the denoiser the forward pass runs (not
        through `_broadcast_source`, the path loading writes through): what a fingerprint of
        loaded weights must be computed from."""
        names = self._trainable if self.lora else list(self.denoiser.state_dict(keep_vars=True))
        return {n: _tensor_named(self.denoiser, n) for n in names}

    def fingerprint(self) -> Fingerprint:
        return fingerprint(self.live_state())

    @torch.no_grad()
    def load_broadcast_state(self, state: dict[str, torch.Tensor], expected: Fingerprint | None = None,
                             version: int = -1) -> None:
        """Copy a `state_for_broadcast()` dict in, checked whole first: wrong keys or shapes raise
        ValueError before any weight changes. With the publisher's fingerprint, the live weights
        are checked against it afterwards (WeightSyncError on any difference)."""
        target = self._broadcast_source()
        missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        if missing or extra:
            raise ValueError(f"broadcast state keys differ from this policy's (lora={self.lora}): "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        self.load_broadcast_parts([state], expected, version)

    @torch.no_grad()
    def load_broadcast_parts(self, parts, expected: Fingerprint | None = None, version: int = -1) -> None:
        """Copy the parts (dicts) of a broadcast state into the live weights, one part at a time
        (the weight store's buckets). A wrong key, shape or a missing tensor raises ValueError; the
        weights may then be partly loaded (the caller treats them as no version)."""
        target, seen = self._broadcast_source(), set()
        for part in parts:
            for k, v in part.items():
                if k not in target:
                    raise ValueError(f"broadcast state has a tensor this policy lacks (lora={self.lora}): {k}")
                if tuple(v.shape) != tuple(target[k].shape):
                    raise ValueError(f"broadcast state shapes differ for {k}: got {tuple(v.shape)}, "
                                     f"expected {tuple(target[k].shape)}")
                target[k].copy_(v)
                seen.add(k)
        missing = sorted(set(target) - seen)
        if missing:
            raise ValueError(f"broadcast state keys differ from this policy's (lora={self.lora}): "
                             f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if expected is not None:
            verify(expected, self.fingerprint(), version=version, where="this policy's denoiser")

    def export(self, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained result for plain diffusers. state: the full broadcast state of a
        sharded learner (gathered by its caller; written through an unsharded copy of the
        denoiser's class built on the meta device, so no second copy of the weights).

        LoRA: `pytorch_lora_weights.safetensors` in out_dir -> `pipe.load_lora_weights(out_dir)`.
        Full: out_dir/<transformer|unet> (`save_pretrained`) -> `DiffusionPipeline.from_pretrained(
        base, transformer=AutoModel.from_pretrained(out_dir, subfolder="transformer"))` (unet= for SD1.5).
        """
        out_dir = Path(out_dir)
        name = self.family.denoiser_name
        if self.lora:
            return export_lora(type(self.pipeline), self.denoiser, out_dir, denoiser_name=name)
        if state is None:
            self.denoiser.save_pretrained(out_dir / name)
            return out_dir
        cls = next(c for c in type(self.denoiser).__mro__ if c.__module__.startswith("diffusers."))  # FSDP2 subclasses it
        with torch.device("meta"):
            whole = cls.from_config(self.denoiser.config)
        whole.load_state_dict(state, assign=True)
        whole.save_pretrained(out_dir / name)
        return out_dir

    @contextlib.contextmanager
    def reference(self):
        """Inside the block `velocity` runs the reference (pre-training) policy; yields its module.

        LoRA: the same denoiser with adapters disabled. Full fine-tune: a frozen copy of the
        base denoiser re-loaded from `source` on first use (so it is the true starting point
        even after resume, and costs memory only when the KL term is used).
        """
        if self.lora:
            with adapters_disabled(self.denoiser) as module:
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
        cls = type(self.denoiser)
        ref = cls.from_pretrained(self.source, subfolder=self.family.denoiser_name, **dtype_kwargs(self.dtype))
        return ref.to(self.device).requires_grad_(False).eval()
