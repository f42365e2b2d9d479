"""Measure the miniature world: reward of real (rendered) images vs samples of the base model.

    python -m tools.miniature.evaluate [--assets treegrpo_ray/assets/miniature] [--split held_out]

Samples come from the shipped pipeline's own `StableDiffusion3Pipeline.__call__` (Euler,
`--steps` 10, CFG `--guidance-scale` 4.5, max_sequence_length 16, 32x32), i.e. the plain ODE
sampler with no RL. Besides the mean reward, it reports how often the reward model's top-1 prompt
gets each object's colour and shape right (a readable breakdown of what the model gets wrong).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from treegrpo_ray.miniature import ASSETS_DIR, world
from tools.miniature.components import MAX_SEQUENCE_LENGTH
from treegrpo_ray.miniature.reward import MiniatureReward


@torch.no_grad()
def sample_images(pipe, prompts: list[str], *, seed: int, steps: int = 10, guidance_scale: float = 4.5,
                  batch_size: int = 96) -> torch.Tensor:
    """Generate one image per prompt with the pipeline. Returns (B, 3, 32, 32) in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        res = pipe(prompt=prompts[i : i + batch_size], num_inference_steps=steps,
                   guidance_scale=guidance_scale, max_sequence_length=MAX_SEQUENCE_LENGTH,
                   generator=gen, output_type="pt")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def attribute_accuracy(predicted: list[str], prompts: list[str]) -> dict[str, float]:
    """Fraction of objects (2 per image) whose colour / shape the predicted prompt gets right."""
    colour = shape = 0
    for pred, true in zip(predicted, prompts):
        p, t = world.parse_prompt(pred), world.parse_prompt(true)
        for a, b in ((p.left, t.left), (p.right, t.right)):
            colour += a.colour == b.colour
            shape += a.shape == b.shape
    n = 2 * len(prompts)
    return {"colour_acc": colour / n, "shape_acc": shape / n}


def score(reward: MiniatureReward, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    r = reward(images, prompts)
    predicted = reward.predict(images)
    top1 = sum(p == t for p, t in zip(predicted, prompts)) / len(prompts)
    metrics = {"reward_mean": r.mean().item(), "top1_acc": top1}
    metrics.update(attribute_accuracy(predicted, prompts))
    return metrics


def evaluate(assets: str, *, split: str = "held_out", images_per_prompt: int = 4, seed: int = 1234,
             steps: int = 10, guidance_scale: float = 4.5) -> dict[str, dict[str, float]]:
    """Data vs base-model metrics on one split ("train" | "held_out" | "all")."""
    from diffusers import StableDiffusion3Pipeline

    train, held_out = world.split_prompts()
    base = {"train": train, "held_out": held_out, "all": world.all_prompts()}[split]
    prompts = [p for p in base for _ in range(images_per_prompt)]
    reward = MiniatureReward.from_dir(os.path.join(assets, "reward"))
    data = world.render_batch(prompts, torch.Generator().manual_seed(seed))
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    shuffled = [prompts[i] for i in perm.tolist()]
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(assets, "pipeline"))  # float32 weights
    pipe.set_progress_bar_config(disable=True)
    samples = sample_images(pipe, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
    return {
        "data": score(reward, data, prompts),
        "data_shuffled_prompts": {"reward_mean": reward(data, shuffled).mean().item()},
        "base_model": score(reward, samples, prompts),
        "setup": {"split": split, "num_images": len(prompts), "steps": steps,
                  "guidance_scale": guidance_scale, "seed": seed},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=ASSETS_DIR, help="miniature assets dir (pipeline/, reward/)")
    parser.add_argument("--split", default="held_out", choices=["train", "held_out", "all"])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.assets, split=args.split, images_per_prompt=args.images_per_prompt,
                      seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
