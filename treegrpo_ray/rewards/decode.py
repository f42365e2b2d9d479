"""Leaf latents -> images with the pipeline's VAE (diffusers AutoencoderKL), on the reward side.

The inverse of the pipelines' encode convention z = (vae.encode(x) - shift) * scaling:
x = vae.decode(z / scaling_factor + shift_factor), then [-1, 1] -> [0, 1] with x / 2 + 0.5 and a
clamp, as diffusers' VaeImageProcessor.postprocess does. SD3 VAEs have shift_factor 0.0609;
SD1.x/SDXL VAEs have none (None -> 0). Decoding runs batched, without grad, in the VAE's dtype;
images come back float32 on the VAE's device so GPU scorers need no copy.
"""
from __future__ import annotations

from pathlib import Path

import torch


class LatentDecoder:
    """Holds a frozen AutoencoderKL and decodes (B, C, h, w) latents in chunks of `batch_size`."""

    def __init__(self, vae: torch.nn.Module, *, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.latent_channels = int(vae.config.latent_channels)

    @classmethod
    def from_pretrained(cls, pipeline_dir_or_id: str | Path, *, subfolder: str | None = "vae", device="cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 16,
                        local_files_only: bool = True) -> "LatentDecoder":
        """Load the VAE of a diffusers pipeline directory (or a hub id already in the HF cache).
        A directory that is itself a VAE (config.json, no `subfolder`) is accepted too. Nothing is
        downloaded unless local_files_only=False."""
        from diffusers import AutoencoderKL

        root = Path(pipeline_dir_or_id).expanduser()
        if subfolder and root.is_dir() and not (root / subfolder).is_dir() and (root / "config.json").is_file():
            subfolder = None
        try:
            vae = AutoencoderKL.from_pretrained(str(pipeline_dir_or_id) if not root.is_dir() else str(root),
                                                subfolder=subfolder, torch_dtype=dtype,
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
            z = chunk.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor  # (b, C, h, w)
            x = self.vae.decode(z.to(dtype)).sample.float()                                   # (b, 3, H, W)
            out.append((x / 2 + 0.5).clamp(0.0, 1.0))
        return torch.cat(out)
