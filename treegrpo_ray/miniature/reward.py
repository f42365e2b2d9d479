"""The miniature world's reward: a tiny open_clip model's belief that an image shows its prompt.

r(image, prompt) = softmax_j( s · cos(f(image), g(p_j)) )[prompt]   over the world's prompts p_j,

with f, g the open_clip image and text towers and s = exp(logit_scale) (CLIP's zero-shot
classifier, Radford et al. 2021 §3.1.2, with the world's closed prompt list as the classes). It
lies in [0, 1] and is high only if colours *and* shapes on both sides are right.

The model directory is open_clip's own "local-dir" layout (`open_clip_config.json` with
`model_cfg` and `preprocess_cfg`, `open_clip_model.safetensors`), so it loads through exactly
`open_clip.create_model("local-dir:...")` / `open_clip.get_tokenizer("local-dir:...")`, the path
a real open_clip checkpoint takes; `world.json` adds the prompt list.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F


class MiniatureReward:
    """Scorer: `__call__(images (B, 3, H, W) in [0, 1], prompts list[str]) -> (B,) float32`."""

    name = "miniature"

    def __init__(self, model, tokenizer, prompts: list[str], image_size: int,
                 mean: list[float], std: list[float], device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.prompts = list(prompts)
        self._index = {p: i for i, p in enumerate(self.prompts)}
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            text = self.model.encode_text(tokenizer(self.prompts).to(self.device))
            self.text_features = F.normalize(text.float(), dim=-1)  # (P, E)

    @classmethod
    def from_dir(cls, path: str, device: str | torch.device = "cpu") -> "MiniatureReward":
        import open_clip

        path = os.path.abspath(path)
        model = open_clip.create_model(f"local-dir:{path}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        with open(os.path.join(path, "open_clip_config.json")) as f:
            pre = json.load(f).get("preprocess_cfg", {})
        with open(os.path.join(path, "world.json")) as f:
            prompts = json.load(f)["prompts"]
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model, tokenizer, prompts, size, pre.get("mean", [0.5] * 3),
                   pre.get("std", [0.5] * 3), device)

    def prompt_indices(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(f"prompts outside the miniature world: {missing[:3]}")
        return torch.tensor([self._index[p] for p in prompts], device=self.device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, P) logits over the world's prompts."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        feats = F.normalize(self.model.encode_image(x).float(), dim=-1)  # (B, E)
        return self.model.logit_scale.exp().float() * feats @ self.text_features.T  # (B, P)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        probs = self.logits(images).softmax(dim=-1)  # (B, P)
        return probs.gather(1, self.prompt_indices(prompts)[:, None]).squeeze(1).float().cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        """The world prompt each image most likely shows (top-1)."""
        return [self.prompts[i] for i in self.logits(images).argmax(dim=-1).tolist()]
