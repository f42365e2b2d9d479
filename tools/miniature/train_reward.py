"""Train the miniature reward model: a tiny open_clip CLIP on world images and prompts.

Objective: CLIP's image->text cross-entropy (Radford et al. 2021, Fig. 3) with the *whole* closed
list of training prompts as the candidates instead of the in-batch texts (the world is
enumerable, so there is no reason to sample negatives). The text->image half of the CLIP loss is
dropped: with a fixed candidate list it adds nothing the image->text half lacks.

Augmentation, so that the judge generalises from clean renders to generated images: half the
images go through the trained VAE (its blur and colour bleeding are what generated images look
like), then Gaussian pixel noise (std up to 0.08) and, for a third, a 3x3 box blur.
"""
from __future__ import annotations

import json
import math
import os
import time

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Vision tower: open_clip's ModifiedResNet (CLIP's RN50 design: 3-conv stem, bottleneck stages,
# attention pooling) at width 8, one block per stage. It runs at 64 px (32 px renders are upsampled)
# so that its stride-32 trunk ends on a 2x2 grid and the attention pool's position embedding can
# tell left from right. A tiny ViT (patch 4, width 64-96, 3-4 layers) learned shapes far slower on
# this CPU budget: 36-49 % held-out shape accuracy after 200 steps against 91 % for this tower.
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    # open_clip's stock BPE tokenizer (vocab 49408) so `get_tokenizer("local-dir:...")` works as is
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "mlp_ratio": 2.0},
}
PREPROCESS_CFG = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "interpolation": "bilinear", "resize_mode": "shortest"}


def build_reward_model(seed: int = 0) -> open_clip.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.CLIP(**MODEL_CFG)


def augment(images: torch.Tensor, recon: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """images, recon: (B, 3, 32, 32) in [0, 1] (recon = VAE reconstruction of images)."""
    b = images.shape[0]
    use_recon = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)
    x = torch.where(use_recon, recon, images)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where((torch.rand(b, generator=gen) < 0.33).view(b, 1, 1, 1), blurred, x)
    noise_std = 0.08 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] images -> the tower's input: resized to `size`, normalised (as MiniatureReward does)."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def prompt_logits(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """images (B, 3, 32, 32) in [0, 1], tokens (P, L) -> (B, P) scaled cosine logits."""
    x = preprocess(images, MODEL_CFG["vision_cfg"]["image_size"])
    img = F.normalize(model.encode_image(x), dim=-1)  # (B, E)
    txt = F.normalize(model.encode_text(tokens), dim=-1)               # (P, E)
    return model.logit_scale.exp() * img @ txt.T


def train_reward(model: open_clip.CLIP, images: torch.Tensor, recon: torch.Tensor,
                 targets: torch.Tensor, prompts: list[str], *, steps: int, batch_size: int = 128,
                 lr: float = 2e-3, seed: int = 0) -> dict[str, float]:
    """images/recon: (N, 3, 32, 32); targets: (N,) index into `prompts`. Trains in place."""
    tokens = open_clip.tokenize(prompts, context_length=MODEL_CFG["text_cfg"]["context_length"])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    start, losses = time.time(), []
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = augment(images[idx], recon[idx], gen)
        loss = F.cross_entropy(prompt_logits(model, x, tokens), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return {"reward/train_loss": sum(losses[-50:]) / len(losses[-50:]),
            "reward/logit_scale": model.logit_scale.exp().item(), "reward/seconds": time.time() - start}


@torch.no_grad()
def top1_accuracy(model: open_clip.CLIP, images: torch.Tensor, targets: torch.Tensor,
                  prompts: list[str]) -> float:
    """Fraction of images whose arg-max prompt (over `prompts`) is the target."""
    tokens = open_clip.tokenize(prompts, context_length=MODEL_CFG["text_cfg"]["context_length"])
    pred = torch.cat([prompt_logits(model, images[i : i + 512], tokens).argmax(-1)
                      for i in range(0, len(images), 512)])
    return (pred == targets).float().mean().item()


def save_reward_dir(model: open_clip.CLIP, out_dir: str, world: dict) -> None:
    """open_clip local-dir layout + world.json. Weights are stored float32."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "open_clip_model.safetensors"))
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(world, f, indent=2)
