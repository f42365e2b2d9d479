"""Tiny models for the reward tests: an open_clip config small enough to build in milliseconds,
checkpoints written in the formats real reward checkpoints use, and a tiny AutoencoderKL.
Only the architecture differs from production; the loading code path is the same."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# A 1-layer ViT (32x32 input, 8x8 patches) and 1-layer text transformer. vocab_size must stay at
# 49408, the size of open_clip's BPE vocabulary, because the real tokenizer is used.
TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

PROMPTS = ["a red circle on the left", "a blue square", "a red circle on the left", "a green triangle"]


def tiny_clip(seed: int = 0, cfg: dict | None = None) -> torch.nn.Module:
    from treegrpo_ray.rewards.open_clip_loader import build_model

    torch.manual_seed(seed)
    model = build_model(cfg or TINY_CLIP_CFG).eval()
    with torch.no_grad():                       # open_clip inits proj/text_projection small; spread cosines out
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_hps_style(model: torch.nn.Module, path: Path) -> Path:
    """As HPS checkpoints are stored: {'state_dict': {'module.<key>': tensor}, ...} in a .pt pickle
    (the 'module.' prefix is what a DDP-wrapped model saves)."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def write_config(path: Path, cfg: dict | None = None, wrapped: bool = False) -> Path:
    cfg = cfg or TINY_CLIP_CFG
    path.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}} if wrapped else cfg))
    return path


def random_images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """(b, 3, h, w) smooth-ish images in [0, 1] (low-res noise upsampled)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, h // 4 + 1, w // 4 + 1, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def tiny_vae(scaling_factor: float = 0.5, shift_factor: float | None = 0.1, seed: int = 0):
    """AutoencoderKL with 2 blocks (downsampling factor 2), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()
