"""Issue 8 item 3: Ray overhead. The same iterations (same seed, same config) in-process
(`mode=local`) and on Ray (1 sampler, 1 reward actor, 1 Ray Train worker), strictly on-policy;
prints median seconds per iteration of each and the ratio ray/local (target <= 1.10).
Startup (Ray, Ray Train, model loads) is excluded: it is paid once per run.

Threads: in-process the one process gets --threads; on Ray each stage runs in its own actor with
the same --threads (stages run one after another when max_staleness=0, so they do not compete).

    PYTHONPATH=. python bench/bench_ray_overhead.py [--iterations 10] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from treegrpo_ray.config import load_config
from treegrpo_ray.driver import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    iters = 3 if args.quick else args.iterations
    torch.set_num_threads(args.threads)
    common = [f"iterations={iters}", "eval_every=0", "checkpoint.every=0", "tracking.progress=false",
              "tree.window=sliding", f"pools.sampler.num_cpus={args.threads}", f"pools.reward.num_cpus={args.threads}",
              f"learner.resources.num_cpus={args.threads}"]
    out = {}
    for mode in ("local", "ray"):
        with tempfile.TemporaryDirectory() as d:
            summary = run(load_config(None, [*common, f"mode={mode}", f"tracking.output_dir={d}"]))
        times = summary["iter_s"][1:]  # the first iteration pays lazy initialisation in both modes
        out[mode] = (statistics.median(times), summary["train_rewards"])
        print(f"{mode:6} median {out[mode][0]:.3f} s/iter over {len(times)} iterations: "
              f"{', '.join(f'{t:.2f}' for t in times)}")
    same = all(abs(a - b) < 1e-4 for a, b in zip(out["local"][1], out["ray"][1]))
    print(f"ray/local = {out['ray'][0] / out['local'][0]:.3f} (target <= 1.10); train rewards identical: {same}")


if __name__ == "__main__":
    main()
