"""Time growing one default miniature tree batch and the share of it spent in the transformer.

Default: 4 prompts, tree k=3, d=3, T=10, CFG 4.5 (the embedded default run's sampler shape).
The transformer's `forward` is wrapped with a timer; everything else (prompt lookup, CFG
concat, SDE/ODE step math, tree bookkeeping, batch assembly) is overhead. Target: >= 80 % of
wall time inside the forward (issue 3, "the tree bookkeeping is not the bottleneck").

Model: the shipped miniature pipeline (treegrpo_ray/assets/miniature/pipeline) when it exists;
otherwise a random-init pipeline of the same architecture built with tools.miniature.components
(speed does not depend on the weights); `--pipeline DIR` picks any SD3-family pipeline dir.

    PYTHONPATH=. python bench/bench_sampler.py                # all window starts 0..T-d
    PYTHONPATH=. python bench/bench_sampler.py --window-start 0 --variant flat --group-size 27
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from treegrpo_ray.miniature import PIPELINE_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (the miniature's build tooling) is in the checkout

SHIPPED = Path(PIPELINE_DIR)


def random_miniature(out_dir: str) -> str:
    """Save a random-init pipeline with the miniature's architecture; returns its dir."""
    from tools.miniature import components
    from treegrpo_ray.miniature import world
    from tools.miniature.tokenizer import build_t5_tokenizer, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    t5_tok = build_t5_tokenizer(sorted({w for p in world.all_prompts() for w in p.split()}))
    encoders = (components.build_text_encoder(tok, components.TEXT_HIDDEN[0], 1),
                components.build_text_encoder(tok, components.TEXT_HIDDEN[1], 2),
                components.build_t5_encoder(t5_tok, 3))
    pipe = components.assemble_pipeline(components.build_transformer(), components.build_vae(), encoders,
                                        (tok, tok, t5_tok))
    pipe.save_pretrained(os.path.join(out_dir, "pipeline"))
    return os.path.join(out_dir, "pipeline")


class ForwardTimer:
    """Wraps module.forward; accumulates wall seconds and rows (CPU: no device sync needed)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        inner = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += kwargs["hidden_states"].shape[0]
            return out

        module.forward = timed

    def reset(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0


def prompts_for(n: int) -> list[str]:
    try:
        from treegrpo_ray.miniature import world
        return world.all_prompts()[:n]
    except ImportError:
        return [f"a red circle {i}" for i in range(n)]


def run(args) -> list[dict]:
    from treegrpo_ray.models import DiffusionPolicy
    from treegrpo_ray.sampling import TreeSampler

    policy = DiffusionPolicy.from_pretrained(args.pipeline, max_sequence_length=args.max_sequence_length,
                                             guidance_scale=args.guidance_scale, device=args.device)
    sampler = TreeSampler(policy, variant=args.variant, num_steps=args.steps, k=args.k, depth=args.depth,
                          group_size=args.group_size or args.k ** args.depth)
    timer = ForwardTimer(policy.denoiser)
    prompts = prompts_for(args.prompts)
    sampler.sample(prompts, window_start=0, seed=0)  # warm-up: encodes prompts, first-call allocations
    starts = [args.window_start] if args.window_start >= 0 else list(range(args.steps - args.depth + 1))
    results = []
    for p in starts:
        timer.reset()
        t0 = time.perf_counter()
        batch = sampler.sample(prompts, window_start=p, seed=1 + p)
        wall = time.perf_counter() - t0
        results.append({"window_start": p, "wall_s": round(wall, 4), "forward_s": round(timer.seconds, 4),
                        "forward_fraction": round(timer.seconds / wall, 4), "nfe": batch.nfe,
                        "transformer_calls": timer.calls, "rows": timer.rows, "leaves": batch.num_leaves,
                        "ms_per_nfe": round(1000 * wall / batch.nfe, 3)})
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default=None, help="pipeline dir (default: shipped miniature, else random-init)")
    ap.add_argument("--variant", default="tree", choices=("tree", "flat", "mix"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=0, help="flat/mix trajectories per prompt (0 = k**depth)")
    ap.add_argument("--window-start", type=int, default=-1, help="-1 = time every start 0..T-d")
    ap.add_argument("--guidance-scale", type=float, default=4.5)
    ap.add_argument("--max-sequence-length", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev box has 2 shared cores)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.pipeline is None:
            args.pipeline = str(SHIPPED) if SHIPPED.is_dir() else random_miniature(tmp)
        source = "shipped miniature" if Path(args.pipeline) == SHIPPED else (
            "random-init miniature architecture" if args.pipeline.startswith(tmp) else args.pipeline)
        print(f"pipeline: {source}; threads {args.threads}; {args.variant} k={args.k} d={args.depth} "
              f"T={args.steps}, {args.prompts} prompts", flush=True)
        results = run(args)
    total = sum(r["wall_s"] for r in results)
    fraction = sum(r["forward_s"] for r in results) / total
    print(json.dumps({"summary": {"pipeline": source, "batches": len(results), "wall_s": round(total, 3),
                                  "forward_fraction": round(fraction, 4)}}))


if __name__ == "__main__":
    main()
