"""Build the shipped miniature assets from scratch: tokenizer, text encoders, VAE, flow model, reward.

    python -m tools.miniature.build --out treegrpo_ray/assets/miniature --seed 0

Stages (each deterministic given --seed; wall time depends on the CPU):
  1. CLIP BPE tokenizer from open_clip's merges file, a tiny T5 Unigram tokenizer; two CLIP text
     encoders and one T5 encoder, random init, frozen.
  2. VAE: trained on renders of the training prompts; latent shift/scale set from data.
  3. Reward: tiny open_clip CLIP trained on the training prompts only (held-out prompts test
     whether it judges unseen combinations).
  4. Flow model: SD3 transformer trained with rectified flow on VAE latents of the training
     prompts, conditioning from the pipeline's own `encode_prompt`, 10 % empty-prompt dropout.
     --flow-defect gives the flow model's training images a flaw the reward model's never have
     (issue 15: a prompt-general weakness for RL to fix, `flawed_renders`); the default,
     recolour:0.5 (half the yellow objects drawn green), builds the shipped miniature; none
     builds one without a flaw (the miniature shipped until 2026-12-06).
  5. Save pipeline/ (StableDiffusion3Pipeline.save_pretrained) and reward/, evaluate data vs
     base-model samples on held-out and train prompts, write MODEL_CARD.md and build.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tools.miniature import components
from treegrpo_ray.miniature import world
from tools.miniature.evaluate import evaluate
from tools.miniature.model_card import write_model_card
from tools.miniature.tokenizer import build_t5_tokenizer, build_tokenizer
from tools.miniature.train_flow import train_flow
from tools.miniature.train_reward import build_reward_model, save_reward_dir, top1_accuracy, train_reward
from tools.miniature.train_vae import encode_latents, reconstruct, set_latent_stats, train_vae


def render_pool(prompts: list[str], per_prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_prompt jittered renders of each prompt. Returns images (N, 3, 32, 32), index (N,)."""
    index = torch.arange(len(prompts)).repeat_interleave(per_prompt)  # (N,)
    images = world.render_batch([prompts[i] for i in index.tolist()], torch.Generator().manual_seed(seed))
    return images, index


@torch.no_grad()
def conditioning(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of prompts + [""] (last row) exactly as the pipeline computes them."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts + [""], prompt_2=None, prompt_3=None, device=torch.device("cpu"),
        do_classifier_free_guidance=False, max_sequence_length=components.MAX_SEQUENCE_LENGTH)
    return embeds.float(), pooled.float()  # (P+1, S, D), (P+1, Dp)


def flawed_renders(prompts: list[str], index: torch.Tensor, defect: str, seed: int) -> torch.Tensor:
    """`render_pool`'s images (same jitter draws) with a flaw, drawn per image with generator seed + 7:

    fade:A    colours pulled toward the background by a factor f from U(A, 1):
              background + f·(image − background);
    shrink:A  both objects drawn at radius × U(A, 1);
    swap:P    with probability P the two objects on the wrong sides, the caption unchanged;
    recolour:P  with probability P every yellow object drawn green (RECOLOUR), the caption
              unchanged: a flaw tied to one word, in every prompt that names it.
    """
    kind, _, value = defect.partition(":")
    amount = float(value)
    draw = torch.rand(len(index), generator=torch.Generator().manual_seed(seed + 7)).tolist()  # (N,)
    scenes = [world.parse_prompt(prompts[i]) for i in index.tolist()]
    gen = torch.Generator().manual_seed(seed)
    if kind == "swap":
        scenes = [world.SceneSpec(s.right, s.left) if d < amount else s for s, d in zip(scenes, draw)]
    if kind == "recolour":
        scenes = [world.SceneSpec(_recolour(s.left), _recolour(s.right)) if d < amount else s
                  for s, d in zip(scenes, draw)]
    scales = [amount + (1 - amount) * d if kind == "shrink" else 1.0 for d in draw]
    images = torch.stack([world.render(s, gen, scale) for s, scale in zip(scenes, scales)])  # (N, 3, 32, 32)
    if kind == "fade":
        bg = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1)
        images = bg + (amount + (1 - amount) * torch.tensor(draw)).view(-1, 1, 1, 1) * (images - bg)
    return images


RECOLOUR = ("yellow", "green")  # recolour:P draws the first as the second
SHIPPED_DEFECT = "recolour:0.5"  # the flaw of treegrpo_ray/assets/miniature (MODEL_CARD.md says why)


def _recolour(obj: world.ObjectSpec) -> world.ObjectSpec:
    return world.ObjectSpec(RECOLOUR[1], obj.shape) if obj.colour == RECOLOUR[0] else obj


def check_defect(defect: str) -> None:
    """Raise ValueError unless `defect` is none, fade:A or shrink:A with 0 < A < 1, swap:P with
    0 < P < 0.5, or recolour:P with 0 < P < 1."""
    kind, _, value = defect.partition(":")
    if defect == "none":
        return
    limit = {"fade": 1.0, "shrink": 1.0, "swap": 0.5, "recolour": 1.0}.get(kind)
    try:
        ok = limit is not None and 0 < float(value) < limit
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--flow-defect {defect!r}: use none, fade:A or shrink:A (0 < A < 1, the smallest factor), "
                         "swap:P (0 < P < 0.5, the probability) or recolour:P (0 < P < 1)")


def build(out: str, *, seed: int, vae_steps: int, reward_steps: int, flow_steps: int,
          per_prompt: int, threads: int, flow_defect: str = SHIPPED_DEFECT) -> dict:
    t0 = time.time()
    metrics: dict[str, float] = {}
    train_prompts, held_out = world.split_prompts()
    torch.manual_seed(seed)  # module initialisation below; all data draws use explicit generators
    tokenizer = build_tokenizer()
    t5_tokenizer = build_t5_tokenizer(sorted({w for p in world.all_prompts() for w in p.split()}))
    text_encoders = (components.build_text_encoder(tokenizer, components.TEXT_HIDDEN[0], seed + 1),
                     components.build_text_encoder(tokenizer, components.TEXT_HIDDEN[1], seed + 2),
                     components.build_t5_encoder(t5_tokenizer, seed + 9))
    images, index = render_pool(train_prompts, per_prompt, seed + 3)

    vae = components.build_vae()
    metrics.update(train_vae(vae, images, steps=vae_steps, seed=seed + 4))
    raw = encode_latents(vae, images)  # (N, 4, 16, 16)
    metrics.update(set_latent_stats(vae, raw))
    print(f"vae done {metrics}", flush=True)

    recon = reconstruct(vae, images)
    clip = build_reward_model(seed + 5)
    metrics.update(train_reward(clip, images, recon, index, train_prompts, steps=reward_steps, seed=seed + 6))
    all_prompts = world.all_prompts()
    for name, prompts in (("train", train_prompts), ("held_out", held_out)):
        test_images, test_index = render_pool(prompts, 8, seed + 7)  # fresh renders
        targets = torch.tensor([all_prompts.index(prompts[i]) for i in test_index.tolist()])
        metrics[f"reward/top1_{name}_vs_all"] = top1_accuracy(clip, test_images, targets, all_prompts)
    save_reward_dir(clip, os.path.join(out, "reward"), world.world_spec())
    print(f"reward done {metrics}", flush=True)

    transformer = components.build_transformer()
    pipe = components.assemble_pipeline(transformer, vae, text_encoders, (tokenizer, tokenizer, t5_tokenizer))
    embeds, pooled = conditioning(pipe, train_prompts)
    if flow_defect != "none":
        raw = encode_latents(vae, flawed_renders(train_prompts, index, flow_defect, seed + 3))
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    metrics.update(train_flow(transformer, latents, index, embeds, pooled, len(train_prompts),
                              steps=flow_steps, seed=seed + 8))
    pipe.save_pretrained(os.path.join(out, "pipeline"))
    metrics["build/train_minutes"] = (time.time() - t0) / 60
    print(f"flow done {metrics}", flush=True)

    evaluation = {"held_out": evaluate(out, split="held_out", images_per_prompt=4),
                  "train": evaluate(out, split="train", images_per_prompt=1)}
    metrics["build/total_minutes"] = (time.time() - t0) / 60
    params = {"transformer": sum(p.numel() for p in transformer.parameters()),
              "vae": sum(p.numel() for p in vae.parameters()),
              "text_encoders": sum(p.numel() for m in text_encoders for p in m.parameters()),
              "reward": sum(p.numel() for p in clip.parameters())}
    report = {"seed": seed, "threads": threads, "flow_defect": flow_defect,
              "steps": {"vae": vae_steps, "reward": reward_steps, "flow": flow_steps},
              "per_prompt": per_prompt, "params": params, "metrics": metrics, "evaluation": evaluation}
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_model_card(out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="treegrpo_ray/assets/miniature", help="assets directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=150, help="VAE steps of batch 32")
    parser.add_argument("--reward-steps", type=int, default=500, help="reward-model steps of batch 128")
    parser.add_argument("--flow-steps", type=int, default=700, help="flow-model steps of batch 64")
    parser.add_argument("--per-prompt", type=int, default=32, help="jittered renders per training prompt")
    parser.add_argument("--flow-defect", default=SHIPPED_DEFECT,
                        help="none | fade:A | shrink:A | swap:P | recolour:P: a flaw in the flow model's training images "
                             f"(flawed_renders; the default, {SHIPPED_DEFECT}, builds the shipped miniature; none: no flaw)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 beats 2 on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    try:
        check_defect(args.flow_defect)
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    report = build(args.out, seed=args.seed, vae_steps=args.vae_steps, reward_steps=args.reward_steps,
                   flow_steps=args.flow_steps, per_prompt=args.per_prompt, threads=args.threads,
                   flow_defect=args.flow_defect)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
