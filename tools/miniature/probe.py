"""Supervised probe: does fixing the base model on the RL prompts transfer to prompts it never saw?

    python -m tools.miniature.probe [--assets DIR] [--pool demo|train] [--steps 0 50 100 200] [--lr 1e-4]

Fine-tunes the miniature's flow model with its own rectified-flow loss on fresh renders of the
embedded default's 16 training prompts (`--pool demo`, `world.demo_prompts()`) or of all 120
(`--pool train`), i.e. on the images the reward model calls right, and evaluates after each
listed step count: ODE samples (the pipeline's own `__call__`, 10 steps, CFG 4.5, 4 images per
prompt, fixed seed) scored by the reward on the 16 demo prompts and on the 24 held-out prompts.
This is the most direct training signal there is: if the held-out reward does not rise here,
there is little reason to expect RL on the 16 prompts to raise it (issue 15's check before
rebuilding the miniature; BENCHMARKS.md §12).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers import StableDiffusion3Pipeline

from tools.miniature.build import conditioning, render_pool
from tools.miniature.evaluate import sample_images
from tools.miniature.train_flow import flow_matching_loss
from tools.miniature.train_vae import encode_latents
from treegrpo_ray.miniature import ASSETS_DIR, world
from treegrpo_ray.miniature.reward import MiniatureReward


def measure(pipe, reward: MiniatureReward, prompts: list[str], seed: int, per_prompt: int = 4) -> float:
    repeated = [p for p in prompts for _ in range(per_prompt)]
    return reward(sample_images(pipe, repeated, seed=seed), repeated).mean().item()


def probe(assets: str, *, checkpoints: list[int], lr: float, pool: str = "demo", batch_size: int = 16,
          seed: int = 0, eval_seed: int = 1234, sets: tuple[str, ...] = ("train16", "held_out")) -> list[dict]:
    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(assets, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    reward = MiniatureReward.from_dir(os.path.join(assets, "reward"))
    demo, held_out = world.demo_prompts(), world.split_prompts()[1]
    train = demo if pool == "demo" else world.split_prompts()[0]
    images, index = render_pool(train, 32, seed)
    vae = pipe.vae
    latents = (encode_latents(vae, images) - vae.config.shift_factor) * vae.config.scaling_factor
    embeds, pooled = conditioning(pipe, train)  # row len(train) is the empty prompt
    transformer = pipe.transformer
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    rows, step = [], 0
    for target in sorted(checkpoints):
        transformer.train().requires_grad_(True)
        while step < target:
            idx = torch.randint(len(latents), (batch_size,), generator=gen)
            cond = index[idx].clone()
            cond[torch.rand(batch_size, generator=gen) < 0.1] = len(train)
            loss = flow_matching_loss(transformer, latents[idx], embeds[cond], pooled[cond], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        transformer.eval().requires_grad_(False)
        prompts = {"train16": demo, "held_out": held_out}
        rows.append({"step": step, "pool": pool, **{s: measure(pipe, reward, prompts[s], eval_seed) for s in sets}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=ASSETS_DIR)
    parser.add_argument("--pool", default="demo", choices=["demo", "train"],
                        help="fine-tune on the 16 demo prompts or on all 120 training prompts")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 50, 100, 200])
    parser.add_argument("--lr", type=float, default=1e-4, help="the RL default's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe(args.assets, checkpoints=args.steps, lr=args.lr, pool=args.pool, seed=args.seed)


if __name__ == "__main__":
    main()
