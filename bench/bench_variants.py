"""Issue 8 item 1: tree vs flat (DanceGRPO/Flow-GRPO) vs mix (MixGRPO), same system, same run.

Each variant runs the real driver stages (plan -> sample -> score -> advantages -> update) on
the shipped miniature world through `LocalSystem` (one process, so Ray noise does not blur the
ratio; `bench_ray_overhead.py` measures Ray's share separately), with equal leaves per prompt
(27) and the same prompts/windows per iteration. Prints per-variant median seconds per
iteration, NFE (checked against count_nfe), learner forward+backward count, and the ratios.

    PYTHONPATH=. python bench/bench_variants.py [--iterations 6] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from treegrpo_ray.builders import load_prompts
from treegrpo_ray.config import load_config
from treegrpo_ray.driver import advantages, expected_nfe, gather, requests_for
from treegrpo_ray.local_system import LocalSystem

VARIANTS = {
    # equal leaves per prompt: tree k**d = 27, flat/mix G = 27
    "tree": [],
    "flat": ["tree.variant=flat", "tree.group_size=27", "learner.minibatches=1"],  # DanceGRPO's steps (5 of 9)
    "flat_batch": ["tree.variant=flat", "tree.group_size=27", "learner.minibatches=1", "tree.flat_steps=batch"],
    "mix": ["tree.variant=mix", "tree.group_size=27", "tree.window=random", "learner.minibatches=1"],
}


def run_variant(name: str, overrides: list[str], iterations: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(None, ["mode=local", "eval_every=0", "prompts_per_iteration=4", *overrides])
    system = LocalSystem(cfg)
    prompts = load_prompts(cfg)
    rows = []
    for it in range(iterations + 1):  # iteration 0 is warm-up (allocator, prompt cache)
        reqs = requests_for(cfg, prompts, it)
        t0 = time.perf_counter()
        collected = system.collect(system.launch(reqs))
        t1 = time.perf_counter()
        kept, raw, _ = gather(cfg, collected, system.version)
        batch = kept.info
        leaf_adv, _ = advantages(cfg, batch, raw)
        system.update(kept.batches, leaf_adv, it)
        t2 = time.perf_counter()
        assert batch.nfe == expected_nfe(cfg, reqs[0].window_start), (batch.nfe, expected_nfe(cfg, reqs[0].window_start))
        if it:
            rows.append({"iter_s": t2 - t0, "sample_score_s": t1 - t0, "learn_s": t2 - t1, "nfe": batch.nfe,
                         "learner_fwd_bwd": batch.num_decisions * cfg.learner.epochs,
                         "window": reqs[0].window_start})
    med = {k: statistics.median(r[k] for r in rows) for k in ("iter_s", "sample_score_s", "learn_s")}
    return {"variant": name, **med, "nfe_mean": statistics.mean(r["nfe"] for r in rows),
            "learner_fwd_bwd": rows[0]["learner_fwd_bwd"], "windows": [r["window"] for r in rows], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 iterations per variant (CI smoke)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="+", default=["tree", "flat", "mix"], choices=list(VARIANTS),
                    help="flat_batch: the first flat baseline (one draw of 6 of 10 steps per batch)")
    args = ap.parse_args()
    iters = 2 if args.quick else args.iterations
    results = {name: run_variant(name, VARIANTS[name], iters, args.threads) for name in args.variants}
    print(f"{'variant':8} {'s/iter':>8} {'sample+score':>13} {'learn':>8} {'NFE/iter':>9} {'learner f+b':>12}")
    for r in results.values():
        print(f"{r['variant']:8} {r['iter_s']:8.2f} {r['sample_score_s']:13.2f} {r['learn_s']:8.2f} "
              f"{r['nfe_mean']:9.0f} {r['learner_fwd_bwd']:12d}")
    t = results["tree"]["iter_s"]
    print("speedup per iteration: " + ", ".join(f"{n}/tree = {r['iter_s'] / t:.2f}x" for n, r in results.items()
                                                if n != "tree") + " (target flat/tree >= 4x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
