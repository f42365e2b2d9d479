"""GPU acceptance check, run by scripts/gpu_check.sh on a GPU machine before booking a cluster.

    PYTHONPATH=. python bench/gpu_check.py [--device cuda] [--out gpu_check.json] [--no-ray] [--prompts 4]

On the shipped miniature, in bf16 (float32 step math and log-probs), it prints:
  1. rescoring   start-of-update |ratio - 1| over one tree batch (the learner's micro-batches)
  2. throughput  denoiser rows/s of our TreeSampler against a bare diffusers denoising loop
                 (StableDiffusion3Pipeline.__call__, output_type="latent") over the same number
                 of rows, both timed after a warm-up, in this process; the ratio is ours / bare
  3. memory      CUDA peak (torch.cuda.max_memory_allocated) of one sampler batch and one learner
                 update, in this process, against `--plan`'s items for the same config (its CUDA
                 reserve left out)
  4. ray         (unless --no-ray) the miniature for 3 iterations through the real CLI on a local
                 Ray instance with every pool on the one GPU (num_gpus 0.25 each)
With --device cpu (tests/test_gpu_check.py) 1-2 run on CPU and 3 reports host RSS only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from treegrpo_ray import builders, plan
from treegrpo_ray.config import load_config

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle above a yellow circle",
           "a small purple square"]


def config(device: str, prompts: int, *extra: str):
    return load_config(None, [f"model.device={device}", "model.dtype=bfloat16", f"prompts_per_iteration={prompts}",
                              "learner.micro_batch=13", *extra])


class RowCounter:
    """Counts the rows every denoiser forward receives (a CFG pair counts as one latent row)."""

    def __init__(self, module: torch.nn.Module, cfg_rows: int):
        self.rows, self.cfg_rows = 0, cfg_rows
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.rows += x.shape[0] // self.cfg_rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rescoring_error(policy, batch, noise_level: float, micro_batch: int) -> float:
    s, s_next = batch.sigmas[batch.step_index], batch.sigmas[batch.step_index + 1]
    prompts = [batch.prompts[i] for i in batch.decision_prompt.tolist()]
    worst = 0.0
    for rows in torch.arange(batch.num_decisions).split(micro_batch):
        with torch.no_grad():
            out = policy.predict(batch.latents[rows], s[rows], [prompts[i] for i in rows.tolist()])
            new = policy.sde_step(batch.latents[rows].to(policy.device), out, s[rows], s_next[rows], noise_level,
                                  prev_sample=batch.children[rows])
        worst = max(worst, (new.log_prob.cpu() - batch.old_log_probs[rows]).exp().sub(1).abs().max().item())
    return worst


def throughput(cfg, policy, sampler, prompts: list[str]) -> dict:
    """Rows/s of our sampler and of the pipeline's own loop over the same number of rows."""
    from diffusers import StableDiffusion3Pipeline
    device, t = cfg.model.device, cfg.tree
    counter = RowCounter(policy.denoiser, 2 if cfg.model.guidance_scale > 1 else 1)
    sampler.sample(PROMPTS[:1], window_start=0, seed=1)          # warm-up
    counter.rows = 0
    sync(device)
    start = time.perf_counter()
    batch = sampler.sample(prompts, window_start=0, seed=0)      # window first: most rows are the leaves' ODE tails
    sync(device)
    ours, rows = time.perf_counter() - start, counter.rows
    pipe = StableDiffusion3Pipeline.from_pretrained(builders.pipeline_path(cfg), transformer=policy.denoiser,
                                                    dtype=policy.dtype).to(device)
    per_call = batch.num_leaves                                   # the leaves' rows, at once, T steps each
    steps = max(1, round(rows / per_call))
    gen = torch.Generator(device).manual_seed(0)
    prompts = [prompts[i % len(prompts)] for i in range(per_call)]
    kw = dict(num_inference_steps=steps, guidance_scale=cfg.model.guidance_scale, height=cfg.model.resolution,
              width=cfg.model.resolution, output_type="latent", max_sequence_length=cfg.model.max_sequence_length)
    pipe(prompts[:1], num_inference_steps=2, **{k: v for k, v in kw.items() if k != "num_inference_steps"})
    counter.rows = 0
    sync(device)
    start = time.perf_counter()
    pipe(prompts, generator=gen, **kw)
    sync(device)
    bare, bare_rows = time.perf_counter() - start, counter.rows
    return {"ours_rows_per_s": rows / ours, "bare_rows_per_s": bare_rows / bare,
            "ratio": (rows / ours) / (bare_rows / bare), "ours_rows": rows, "bare_rows": bare_rows, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (trees) in the measured batch")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on the GPU machine",
              file=sys.stderr)
        return 1
    cuda = args.device.startswith("cuda")
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    cfg = config(args.device, args.prompts)
    policy = builders.build_policy(cfg)
    sampler = builders.build_sampler(cfg, policy)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tp = throughput(cfg, policy, sampler, PROMPTS[:args.prompts])
    batch = tp.pop("batch")
    results["throughput"] = tp
    print(f"throughput: ours {tp['ours_rows_per_s']:.1f} rows/s vs bare diffusers loop {tp['bare_rows_per_s']:.1f} "
          f"rows/s -> {tp['ratio']:.2f}x ({tp['ours_rows']} vs {tp['bare_rows']} rows)", flush=True)
    err = rescoring_error(policy, batch, cfg.tree.noise_level, cfg.learner.micro_batch)
    results["rescoring_max_abs_ratio_minus_1"] = err
    print(f"rescoring: start-of-update |ratio - 1| max {err:.3e} over {batch.num_decisions} decisions", flush=True)

    layout = plan.make_plan(cfg)
    planned = {p.name: sum(b for what, b in p.items if not what.startswith("CUDA")) for p in layout.pools}
    if cuda:
        sampled_peak = torch.cuda.max_memory_allocated()
        learner = builders.build_learner(cfg, policy)
        torch.cuda.reset_peak_memory_stats()
        learner.update(batch, torch.randn(batch.num_leaves))
        learner_peak = torch.cuda.max_memory_allocated()
        results["memory"] = {"sampler_peak": sampled_peak, "sampler_plan": planned["sampler"],
                             "learner_peak": learner_peak, "learner_plan": planned["learner"]}
        print(f"memory: sampler peak {sampled_peak / 2**20:.0f} MiB (plan {planned['sampler'] / 2**20:.0f}), learner "
              f"peak {learner_peak / 2**20:.0f} MiB (plan {planned['learner'] / 2**20:.0f}); the learner's peak "
              "includes the sampler's model, which it shares here", flush=True)
    if not args.no_ray:
        gpus = "0.25" if cuda else "0"
        cmd = [sys.executable, "-m", "treegrpo_ray.run", "iterations=3", "eval_every=3", f"model.device={args.device}",
               "model.dtype=bfloat16", f"pools.sampler.num_gpus={gpus}", f"pools.reward.num_gpus={gpus}",
               f"learner.resources.num_gpus={gpus}", "tracking.output_dir=gpu_check_outputs"]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results["ray"] = {"rc": out.returncode, "seconds": time.perf_counter() - start,
                          "tail": out.stdout.strip().splitlines()[-3:]}
        print(f"ray: rc {out.returncode} in {results['ray']['seconds']:.0f} s; " + " | ".join(results["ray"]["tail"]))
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if results.get("ray", {}).get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
