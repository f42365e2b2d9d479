"""Reward scorers: `scorer(images (B, 3, H, W) float in [0, 1], prompts list[str]) -> (B,) float32`.

Implemented rewards and their sources:
* `HPSv2Scorer` -- Human Preference Score v2.0 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2):
  open_clip ViT-H-14 with the HPS checkpoint's weights; score = <f_img, f_txt> of the unit-norm
  features (the diagonal of image_features @ text_features.T in hpsv2's `score()`, no logit
  scale). Departures from the `hpsv2` package: the model is loaded once and scores batches;
  images stay tensors (no PIL round trip, see open_clip_loader); float32 unless dtype says
  otherwise (hpsv2 runs under CUDA autocast).
* `ClipScoreScorer` -- CLIPScore (Hessel et al. 2021): w * max(cos(f_img, f_txt), 0) with
  w = 2.5, or the raw cosine with `raw_cosine=True`.
* `JpegCompressibility` / `JpegIncompressibility` -- DDPO (Black et al. 2023): -/+ the size in
  kB (bytes / 1000) of the image saved by PIL as JPEG at quality 95 after rounding to uint8.
* `MiniatureScorer` -- the miniature world's reward (`treegrpo_ray.miniature.reward.MiniatureReward`).

Common contract (enforced by `Scorer.__call__`): images must be a float (B, 3, H, W) tensor with
B > 0 and values in [0, 1] (a [-1, 1] image is an error, not a silent shift); prompts a list of B
strings. A row with non-finite pixels scores NaN, and scorers never hide NaN: `leaf_advantages`
counts and drops those leaves. Scores come back as CPU float32.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from treegrpo_ray.miniature import REWARD_DIR
from treegrpo_ray.rewards.open_clip_loader import (OPENAI_L14_FILES, OPENAI_L14_MODEL, OPENAI_L14_REPO, load_open_clip,
                                                  locate_openai_l14, resolve_checkpoint)

_RANGE_TOL = 1e-3
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_HF_REPO = "xswu/HPSv2"
DEFAULT_MINIATURE_DIR = Path(REWARD_DIR)


def check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise ValueError unless images is a non-empty float (B, 3, H, W) batch in [0, 1] with B prompts."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("empty batch: images has B = 0")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images: they must match one to one")
    finite = images[torch.isfinite(images)]
    if finite.numel() and (float(finite.min()) < -_RANGE_TOL or float(finite.max()) > 1 + _RANGE_TOL):
        raise ValueError(f"images must lie in [0, 1], got [{float(finite.min()):.3f}, {float(finite.max()):.3f}]"
                         f" (a [-1, 1] image needs x / 2 + 0.5)")


class Scorer:
    """Base: validates the batch, scores it in chunks of `batch_size`, marks rows with non-finite
    pixels NaN, checks the output shape. Subclasses implement `_score(images, prompts) -> (b,)`."""

    name = "scorer"

    def __init__(self, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        prompts = list(prompts)
        bad = ~torch.isfinite(images).flatten(1).all(dim=1)                  # (B,)
        images = torch.nan_to_num(images.clamp(0.0, 1.0), nan=0.0)
        parts = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size]
            out = self._score(chunk, prompts[start:start + self.batch_size])
            if tuple(out.shape) != (chunk.shape[0],):
                raise ValueError(f"scorer '{self.name}' returned shape {tuple(out.shape)} for a batch of "
                                 f"{chunk.shape[0]}; expected ({chunk.shape[0]},)")
            parts.append(out.detach().float().cpu())
        scores = torch.cat(parts)                                            # (B,)
        return torch.where(bad.cpu(), torch.full_like(scores, float("nan")), scores)


def locate_hps(checkpoint=None, version: str = "v2.1", hf_cache_dir=None) -> Path:
    """The HPS checkpoint file (the path given, else the HF cache's), or FileNotFoundError saying how to get it."""
    filename = HPS_FILES[version]
    hint = (f"Download it once with `hf download {HPS_HF_REPO} {filename}` (older CLI: "
            f"`huggingface-cli download {HPS_HF_REPO} {filename}`) and pass its path as the reward's "
            f"checkpoint, or leave it in the Hugging Face cache.")
    return resolve_checkpoint(checkpoint or None, what=f"HPS {version} checkpoint", hint=hint, hf_repo=HPS_HF_REPO,
                              hf_filename=filename, hf_cache_dir=hf_cache_dir)


class HPSv2Scorer(Scorer):
    """HPS v2.0 / v2.1 reward. `checkpoint`: a local path; if None the file is taken from the HF
    cache (repo xswu/HPSv2) or a FileNotFoundError says how to fetch it. `model_name` /
    `model_config` choose the architecture (ViT-H-14 for the real checkpoints; tests pass a tiny
    config)."""

    name = "hpsv2"

    def __init__(self, checkpoint: str | Path | None = None, *, version: str = "v2.1", model_name: str | None = None,
                 model_config: dict | str | Path | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, hf_cache_dir: str | Path | None = None):
        super().__init__(batch_size)
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got '{version}'")
        if model_name is None and model_config is None:
            model_name = "ViT-H-14"
        path = locate_hps(checkpoint, version, hf_cache_dir)
        self.version = version
        self.clip = load_open_clip(checkpoint=path, model_name=model_name, config=model_config,
                                   device=device, dtype=dtype)

    def _score(self, images, prompts):
        return self.clip.cosine(images, prompts)                              # (b,)


def locate_clipscore(checkpoint=None, model_name: str | None = None, hf_cache_dir=None) -> Path:
    hint = (f"Pass the local open_clip weights file of model_name (.safetensors, or .bin/.pt loadable with "
            f"weights_only), e.g. for ViT-H-14: `hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
            f"open_clip_model.safetensors`; with neither set, CLIPScore reads OpenAI's ViT-L/14 from the Hugging Face "
            f"cache: `hf download {OPENAI_L14_REPO} {OPENAI_L14_FILES[0]}`.")
    return locate_openai_l14(checkpoint, f"CLIPScore checkpoint for {model_name or OPENAI_L14_MODEL}", hint,
                             hf_cache_dir)


class ClipScoreScorer(Scorer):
    """CLIPScore = w * max(cos, 0) (Hessel et al. 2021, w = 2.5), or the raw cosine in [-1, 1]
    with raw_cosine=True. `checkpoint` is a local open_clip weights file for `model_name`; both
    left empty: OpenAI's ViT-L/14 (torchmetrics' default CLIPScore model) from the HF cache."""

    name = "clipscore"

    def __init__(self, checkpoint: str | Path | None = None, *, model_name: str | None = None,
                 model_config: dict | str | Path | None = None, w: float = 2.5, raw_cosine: bool = False,
                 device="cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32,
                 hf_cache_dir: str | Path | None = None):
        super().__init__(batch_size)
        if model_name is None and model_config is None:
            model_name = OPENAI_L14_MODEL
        path = locate_clipscore(checkpoint, model_name, hf_cache_dir)
        self.w, self.raw_cosine = float(w), raw_cosine
        self.clip = load_open_clip(checkpoint=path, model_name=model_name, config=model_config,
                                   device=device, dtype=dtype)

    def _score(self, images, prompts):
        cos = self.clip.cosine(images, prompts)                               # (b,)
        return cos if self.raw_cosine else self.w * cos.clamp(min=0.0)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) float32 JPEG sizes in kB (bytes / 1000), as DDPO computes them."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Scorer):
    """DDPO's compressibility reward: -(JPEG size in kB) at quality 95. Prompts are ignored."""

    name = "jpeg_compressibility"
    sign = -1.0

    def __init__(self, quality: int = 95, batch_size: int = 32):
        super().__init__(batch_size)
        self.quality = quality

    def _score(self, images, prompts):
        return self.sign * jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """DDPO's incompressibility reward: +(JPEG size in kB) at quality 95."""

    name = "jpeg_incompressibility"
    sign = 1.0


class MiniatureScorer(Scorer):
    """The miniature world's reward model, loaded once from `reward_dir` (default: the shipped
    assets/miniature/reward)."""

    name = "miniature"

    def __init__(self, reward_dir: str | Path | None = None, *, device="cpu", batch_size: int = 64):
        super().__init__(batch_size)
        from treegrpo_ray.miniature.reward import MiniatureReward   # only the miniature reward needs it

        reward_dir = Path(reward_dir) if reward_dir is not None else DEFAULT_MINIATURE_DIR
        if not reward_dir.is_dir():
            raise FileNotFoundError(f"miniature reward directory not found: '{reward_dir}' (the package ships it "
                                    f"at {DEFAULT_MINIATURE_DIR}; rebuild it with `python -m tools.miniature.build` from a checkout)")
        self.device = torch.device(device)
        self.reward = MiniatureReward.from_dir(reward_dir, device=self.device)

    def _score(self, images, prompts):
        try:
            with torch.no_grad():
                return self.reward(images.to(self.device), prompts)
        except KeyError as e:                    # a prompt outside the world's closed prompt list
            raise ValueError(f"miniature reward: {e.args[0] if e.args else e}") from e


class MiniatureColourScorer(Scorer):
    """A miniature-world metric that no network computes: the fraction of the prompt's two objects
    whose colour is right, read off the pixels. In each half of the image the object is the pixels
    farther than `threshold` (max over channels) from the world's background; its mean colour is
    matched to the nearest of the world's four colours. Score per image: 0, 0.5 or 1 (a half with no
    object pixels counts as wrong). The miniature reward model (`miniature`) judges colours and
    shapes through a CLIP model; this checks the colours alone and cannot be fooled the same way,
    so it is the miniature's metric a run does not train on (evaluate, `eval_metrics`)."""

    name = "miniature_colour"

    def __init__(self, threshold: float = 0.25, batch_size: int = 256):
        super().__init__(batch_size)
        from treegrpo_ray.miniature.world import BACKGROUND, COLOURS
        self.threshold = threshold
        self.names = list(COLOURS)
        self.palette = torch.tensor([COLOURS[c] for c in self.names])          # (4, 3)
        self.background = torch.tensor(BACKGROUND).view(1, 3, 1, 1)

    def _score(self, images, prompts):
        from treegrpo_ray.miniature.world import parse_prompt
        try:
            scenes = [parse_prompt(p) for p in prompts]
        except ValueError as e:
            raise ValueError(f"miniature_colour scores miniature-world prompts only: {e}") from e
        x = images.float().cpu()
        half = x.shape[-1] // 2
        right = torch.zeros(x.shape[0])
        for side, part in (("left", x[..., :half]), ("right", x[..., half:])):
            mask = (part - self.background).abs().amax(dim=1) > self.threshold           # (B, H, W/2)
            count = mask.flatten(1).sum(1)                                                # (B,)
            mean = (part * mask[:, None]).flatten(2).sum(2) / count.clamp_min(1)[:, None]  # (B, 3)
            nearest = torch.cdist(mean, self.palette).argmin(dim=1)                      # (B,)
            want = torch.tensor([self.names.index(getattr(s, side).colour) for s in scenes])
            right += ((nearest == want) & (count > 0)).float()
        return right / 2
