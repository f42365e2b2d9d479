"""Leaf latents -> images with the pipeline's VAE, on the reward side; video latents -> clips with
Wan's AutoencoderKLWan (`VideoLatentDecoder`, below; `load_decoder` picks one).

The VAE class comes from its config's `_class_name` (one of `VAE_CLASSES`), and with it the
convention that turns the sampler's (B, C, h, w) latents into the VAE's input:

* AutoencoderKL (SD3, FLUX, SD1.5): the inverse of the pipelines' encode convention
  z = (vae.encode(x) - shift) * scaling, i.e. x = vae.decode(z / scaling_factor + shift_factor).
  SD3 VAEs have shift_factor 0.0609; SD1.x/SDXL VAEs have none (None -> 0);
* AutoencoderKLQwenImage (Qwen-Image): a causal 3-D VAE over (B, C, frames, h, w); an image is one
  frame. As `QwenImagePipeline.__call__` decodes: z[:, :, None] / (1 / latents_std) + latents_mean
  per channel, then frame 0 of the output.

Then [-1, 1] -> [0, 1] with x / 2 + 0.5 and a clamp, as diffusers' VaeImageProcessor.postprocess
does. Decoding runs batched, without grad, in the VAE's dtype; images come back float32 on the
VAE's device so GPU scorers need no copy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage")  # image VAEs; AutoencoderKLWan: VideoLatentDecoder


class ScaledShift:
    """AutoencoderKL's latent convention: z / scaling_factor + shift_factor, (b, C, h, w) in and out."""

    def __init__(self, config):
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.latent_channels = int(config.latent_channels)

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor

    def from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x


class OneFrameMeanStd:
    """AutoencoderKLQwenImage's convention: per-channel latents_mean / latents_std over one frame."""

    def __init__(self, config):
        self.latent_channels = int(config.z_dim)
        self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)      # (1, C, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        # (b, C, h, w) -> (b, C, 1, h, w); divided by 1/std as the pipeline writes it (the same rounding)
        return z[:, :, None] / self.inv_std.to(z.device) + self.mean.to(z.device)

    def from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0]                                                                            # (b, 3, H, W)


CONVENTIONS = {"AutoencoderKL": ScaledShift, "AutoencoderKLQwenImage": OneFrameMeanStd}


class LatentDecoder:
    """Holds a frozen VAE (see VAE_CLASSES) and decodes (B, C, h, w) latents in chunks of `batch_size`."""

    def __init__(self, vae: torch.nn.Module, *, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        name = next((c.__name__ for c in type(vae).__mro__ if c.__name__ in CONVENTIONS), None)
        if name is None:
            raise ValueError(f"{type(vae).__name__} is not a VAE the decoder knows; known: {', '.join(VAE_CLASSES)}")
        self.vae = vae.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.convention = CONVENTIONS[name](vae.config)
        self.latent_channels = self.convention.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.convention.scaling_factor  # AutoencoderKL only

    @property
    def shift_factor(self) -> float:
        return self.convention.shift_factor    # AutoencoderKL only

    @classmethod
    def from_pretrained(cls, pipeline_dir_or_id: str | Path, *, subfolder: str | None = "vae", device="cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 16,
                        local_files_only: bool = True) -> "LatentDecoder":
        """Load the VAE of a diffusers pipeline directory (or a hub id already in the HF cache), of
        the class its config names. A directory that is itself a VAE (config.json, no `subfolder`)
        is accepted too. Nothing is downloaded unless local_files_only=False."""
        import diffusers

        root = Path(pipeline_dir_or_id).expanduser()
        if subfolder and root.is_dir() and not (root / subfolder).is_dir() and (root / "config.json").is_file():
            subfolder = None
        where = str(pipeline_dir_or_id) if not root.is_dir() else str(root)
        try:
            config = diffusers.AutoencoderKL.load_config(where, subfolder=subfolder, local_files_only=local_files_only)
            name = config.get("_class_name", "AutoencoderKL")
            if name not in VAE_CLASSES:
                raise ValueError(f"its VAE is a {name}; the decoder knows {', '.join(VAE_CLASSES)}")
            vae = getattr(diffusers, name).from_pretrained(where, subfolder=subfolder, torch_dtype=dtype,
                                                           local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"could not load the VAE from '{pipeline_dir_or_id}' (subfolder '{subfolder}'): {e}. Give a local "
                f"diffusers pipeline directory, or fetch the model first (`hf download <repo id>`).") from e
        return cls(vae.to(device), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [0, 1] on the VAE's device.
        Non-finite latents give non-finite images; the scorers turn those into NaN scores that
        leaf_advantages counts and drops."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        if latents.shape[0] == 0:
            raise ValueError("empty batch: latents has B = 0")
        dtype = next(self.vae.parameters()).dtype
        out = []
        for chunk in latents.split(self.batch_size):
            z = self.convention.to_vae(chunk.to(self.device, torch.float32))              # the VAE's latent layout
            x = self.convention.from_vae(self.vae.decode(z.to(dtype)).sample).float()     # (b, 3, H, W)
            out.append((x / 2 + 0.5).clamp(0.0, 1.0))
        return torch.cat(out)


class VideoLatentDecoder:
    """Holds a frozen AutoencoderKLWan and decodes (B, C, F, h, w) video latents into (B, T, 3, H, W)
    clips in [0, 1], T = (F - 1) * temporal + 1 frames, `batch_size` clips per VAE call (a clip's
    decode holds all its frames' activations: memory, not speed, sets the chunk).

    As `WanPipeline.__call__` does: z = latents * latents_std + latents_mean per channel (the
    pipeline divides by 1 / std), x = vae.decode(z) in (B, 3, T, H, W), then its VideoProcessor's
    postprocess: x / 2 + 0.5 clamped to [0, 1], frames first. Float32 out, on the VAE's device."""

    def __init__(self, vae: torch.nn.Module, *, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.latent_channels = int(vae.config.z_dim)
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # the pipeline's own arithmetic (divide by 1 / std), so the decode matches it to rounding
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, T, 3, H, W) float32 clips in [0, 1] on the VAE's device."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, F, h, w), got {tuple(latents.shape)}")
        if latents.shape[0] == 0:
            raise ValueError("empty batch: latents has B = 0")
        dtype = next(self.vae.parameters()).dtype
        mean, inv_std = self.mean.to(self.device), self.inv_std.to(self.device)
        out = []
        for chunk in latents.split(self.batch_size):
            z = chunk.to(self.device, torch.float32) / inv_std + mean          # (b, C, F, h, w)
            x = self.vae.decode(z.to(dtype), return_dict=False)[0].float()     # (b, 3, T, H, W)
            out.append((x / 2 + 0.5).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4))  # (b, T, 3, H, W)
        return torch.cat(out)


def load_decoder(pipeline_dir_or_id: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16, video_batch_size: int = 1, local_files_only: bool = True):
    """The decoder of a pipeline's VAE: `VideoLatentDecoder` for Wan's AutoencoderKLWan (its
    `_class_name` in vae/config.json), else `LatentDecoder`. Nothing is downloaded unless asked."""
    root = Path(pipeline_dir_or_id).expanduser()
    config = root / "vae" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKLWan":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype,
                                               local_files_only=local_files_only)
        return VideoLatentDecoder(vae.to(device), batch_size=video_batch_size)
    return LatentDecoder.from_pretrained(pipeline_dir_or_id, device=device, dtype=dtype, batch_size=batch_size,
                                         local_files_only=local_files_only)
