"""PickScore v1 (Kirstain et al. 2023, huggingface.co/yuvalkirstain/PickScore_v1): CLIP ViT-H/14
fine-tuned on Pick-a-Pic preferences, run through transformers exactly as its model card does:

    score = logit_scale.exp() * <f_img / |f_img|, f_txt / |f_txt|>        (about 18-24 for real images)

with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (CLIP tokenizer, max_length 77 with
truncation; images resized on the short side to 224 with bicubic, centre-cropped, OpenAI
mean/std). Flow-GRPO trains on score / 26; weight the term 1/26 for that scale.

Departure from the model card: images are given to the processor as float tensors in [0, 1]
(`do_rescale=False`, transformers' torchvision backend) instead of PIL images, so there is no
uint8 round trip and PIL's bicubic is torch's (a test bounds the gap on smooth images).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from treegrpo_ray.rewards.open_clip_loader import locate_dir
from treegrpo_ray.rewards.scorers import Scorer

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def locate(checkpoint=None, processor=None, hf_cache_dir=None) -> tuple[str, str]:
    model = locate_dir(checkpoint, MODEL_REPO, "PickScore model",
                       f"Download it once with `hf download {MODEL_REPO}` and pass the directory as the reward's "
                       "checkpoint, or leave it in the Hugging Face cache.", hf_cache_dir)
    proc = locate_dir(processor, PROCESSOR_REPO, "PickScore processor (CLIP-ViT-H-14's tokenizer and image settings)",
                      f"Download it once with `hf download {PROCESSOR_REPO} --include '*.json' '*.txt'` and pass the "
                      "directory as the reward's processor, or leave it in the Hugging Face cache.", hf_cache_dir)
    return model, proc


def _features(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or an output holding them (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PickScoreScorer(Scorer):
    """PickScore: `checkpoint` the PickScore_v1 directory, `processor` the CLIP-ViT-H-14 processor
    directory; either left empty is taken from the Hugging Face cache."""

    name = "pickscore"

    def __init__(self, checkpoint: str | Path | None = None, *, processor: str | Path | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, hf_cache_dir: str | Path | None = None):
        super().__init__(batch_size)
        from transformers import AutoProcessor, CLIPModel
        model_dir, proc_dir = locate(checkpoint, processor, hf_cache_dir)
        self.device, self.dtype = torch.device(device), dtype
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, cache_dir=hf_cache_dir)
        self.model.to(self.device, dtype)
        self.model.eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(proc_dir, local_files_only=True, cache_dir=hf_cache_dir)
        self.scale = float(self.model.logit_scale.exp())
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """(B, D) unit-norm float32; each distinct prompt encoded once, alone (a batch of one), so a
        prompt's features do not depend on the other prompts of the call."""
        for p in dict.fromkeys(prompts):
            if p not in self._text:
                tokens = self.processor.tokenizer([p], padding=True, truncation=True, max_length=77,
                                                  return_tensors="pt").to(self.device)
                self._text[p] = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)[0]
        return torch.stack([self._text[p] for p in prompts])

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor.image_processor(images=images.float().cpu(), do_rescale=False,
                                                return_tensors="pt")["pixel_values"]          # (b, 3, 224, 224)
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return F.normalize(_features(out).float(), dim=-1)

    def _score(self, images, prompts):
        return self.scale * (self.image_features(images) * self.text_features(prompts)).sum(-1)
