"""How much signal is in one iteration's policy gradient? (BENCHMARKS.md §2, "why the prompt pool")

At the shipped miniature's base weights, draws N independent iterations (the driver's own plan ->
sample -> score -> advantages), computes each one's GRPO gradient over all trainable parameters
(no step taken), and prints:

* the mean pairwise cosine between those gradients: ~0 means one iteration's gradient is mostly
  noise (two estimates of the same expected gradient g with per-iteration noise s would have
  cosine |g|^2 / (|g|^2 + s^2));
* per prompt group, the std of its leaves' rewards at several window starts: groups whose 27
  leaves all score alike carry no signal, yet per-prompt std normalisation gives them
  advantages of size ~1 (advantage.std).

    PYTHONPATH=. python bench/bench_grad_snr.py --draws 8 [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from treegrpo_ray.builders import load_prompts
from treegrpo_ray.config import load_config
from treegrpo_ray.driver import advantages, gather, requests_for
from treegrpo_ray.algo.advantages import child_advantages
from treegrpo_ray.local_system import LocalSystem
from treegrpo_ray.types import merge_batches


def gradient(system, batch, leaf_adv) -> torch.Tensor:
    learner = system.learner
    adv = child_advantages(batch, leaf_adv, weighting=learner.weighting, temperature=learner.temperature,
                              baseline=learner.baseline)
    learner.optimizer.zero_grad(set_to_none=True)
    loss, _ = learner._loss(batch, adv, torch.arange(batch.num_decisions), torch.device("cpu"))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.params if p.grad is not None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["mode=local", "eval_every=0", *args.overrides])
    system = LocalSystem(cfg)
    prompts = load_prompts(cfg)
    grads, windows = [], []
    for d in range(args.draws):
        reqs = requests_for(cfg, prompts, 10_000 + d)
        kept, raw, _ = gather(cfg, system.collect(system.launch(reqs)), system.version)
        batch = merge_batches(kept.batches)
        leaf_adv, _ = advantages(cfg, batch, raw)
        grads.append(gradient(system, batch, leaf_adv))
        windows.append(reqs[0].window_start)
    g = torch.stack(grads)
    unit = g / g.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[~torch.eye(len(grads), dtype=torch.bool)]
    print(f"prompts={cfg.prompts} per iteration {cfg.prompts_per_iteration}, windows {windows}")
    print(f"gradient norms {[round(float(x), 3) for x in g.norm(dim=1)]}")
    print(f"pairwise cosine of {len(grads)} iteration gradients: mean {float(cos.mean()):+.4f}, "
          f"sd {float(cos.std()):.4f} (mean ~0: no direction shared between iterations)")
    print("per-prompt std of leaf rewards by window start (8 groups each):")
    for w in (0, 2, 4, 7):
        reqs = [dataclasses.replace(r, window_start=w) for r in requests_for(cfg, prompts, 20_000 + w)]
        kept, raw, _ = gather(cfg, system.collect(system.launch(reqs)), system.version)
        batch = kept.info
        r = sum(raw.values()) / len(raw)
        stds = sorted(float(r[batch.leaf_prompt == p].std(unbiased=False)) for p in range(len(batch.prompts)))
        tiny = sum(s < 0.01 for s in stds)
        print(f"  window {w}: median {statistics.median(stds):.3f}, {tiny}/{len(stds)} groups below 0.01, "
              f"stds {[round(s, 3) for s in stds]}")


if __name__ == "__main__":
    main()
