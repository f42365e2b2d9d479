"""Scorer throughput (images/s) at batch 1 and batch 32 for every CPU-runnable reward.

    PYTHONPATH=. python bench/bench_rewards.py [--threads 1] [--resolution 64] [--min-seconds 1.0]

CLIPScore and HPSv2 run their real code path (checkpoint file -> safe load -> tensor
preprocessing -> open_clip forward) on a small custom open_clip config with random weights
written to a temp dir; `--model-name ViT-B-32` uses a real architecture instead (slow on CPU).
The miniature reward uses the shipped assets if present, else an untrained model of the same
architecture. Every image gets its own prompt (no text-feature sharing between leaves, the
least favourable case for batching). Prints a table and the batch-32 / batch-1 ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (the miniature's build tooling) is in the checkout

from treegrpo_ray.rewards.open_clip_loader import build_model, load_model_config
from treegrpo_ray.rewards.scorers import (DEFAULT_MINIATURE_DIR, ClipScoreScorer, HPSv2Scorer, JpegCompressibility,
                                          MiniatureScorer)

BENCH_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def throughput(scorer, images: torch.Tensor, prompts: list[str], batch: int, min_seconds: float) -> float:
    """images/s over repeated calls on `batch` images (one warm-up call first)."""
    x, p = images[:batch], prompts[:batch]
    scorer(x, p)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_seconds:
        scorer(x, p)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def make_scorers(tmp: Path, model_name: str | None) -> dict:
    from safetensors.torch import save_file

    cfg = None if model_name else BENCH_CLIP_CFG
    torch.manual_seed(0)
    model = build_model(load_model_config(model_name, cfg)[0])
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp / "hps.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "clip.safetensors"))
    kwargs = {"model_name": model_name, "model_config": cfg, "batch_size": 32}
    reward_dir = DEFAULT_MINIATURE_DIR
    if not reward_dir.is_dir():
        from treegrpo_ray.miniature import world
        from tools.miniature.train_reward import build_reward_model, save_reward_dir

        reward_dir = tmp / "miniature"
        save_reward_dir(build_reward_model(seed=0), str(reward_dir), world.world_spec())
    arch = model_name or "tiny cfg"
    return {"jpeg_compressibility": JpegCompressibility(),
            f"miniature ({'shipped' if reward_dir == DEFAULT_MINIATURE_DIR else 'untrained'})":
                MiniatureScorer(reward_dir, batch_size=32),
            f"clipscore ({arch})": ClipScoreScorer(tmp / "clip.safetensors", **kwargs),
            f"hpsv2 ({arch})": HPSv2Scorer(tmp / "hps.pt", **kwargs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--resolution", type=int, default=64, help="input image side (pixels)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per cell")
    ap.add_argument("--model-name", default=None, help="open_clip architecture for HPS/CLIPScore (default: tiny cfg)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from treegrpo_ray.miniature import world

    prompts = world.all_prompts()[:32]
    images = torch.nn.functional.interpolate(world.render_batch(prompts), size=(args.resolution,) * 2,
                                             mode="bilinear", align_corners=False).clamp(0, 1)  # (32, 3, R, R)
    with tempfile.TemporaryDirectory() as tmp:
        scorers = make_scorers(Path(tmp), args.model_name)
        print(f"threads={args.threads} resolution={args.resolution} torch={torch.__version__}")
        print(f"{'scorer':34s} {'b=1 img/s':>10s} {'b=32 img/s':>11s} {'b32/b1':>7s}")
        for name, scorer in scorers.items():
            one = throughput(scorer, images, prompts, 1, args.min_seconds)
            many = throughput(scorer, images, prompts, 32, args.min_seconds)
            print(f"{name:34s} {one:10.1f} {many:11.1f} {many / one:7.2f}")


if __name__ == "__main__":
    main()
