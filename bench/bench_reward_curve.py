"""Issue 8 item 2: reward against wall-clock, tree vs flat vs mix (the paper's Figure 1 in miniature).

Every run trains one variant in-process (`LocalSystem`, the driver's own stages) for the same
training-time budget and, after every iteration, scores ODE samples of the run's training
prompts at the fixed eval seed (that time is not charged to the run's clock). Two phases:

  1. sweep: every variant x every (lr, optimizer steps per iteration) setting, seed 0;
  2. seeds: each variant's best setting (highest mean eval reward over the last third of the
     budget) again with seeds 1..S-1, so no baseline is judged under-stepped.

It writes one JSON line per run to --out, then `--plot` draws mean +- min/max over seeds of the
eval reward against seconds and against images generated, and prints when tree first reaches
flat's final mean reward.

    PYTHONPATH=. python bench/bench_reward_curve.py --budget 150 --seeds 3 --jobs 2 --out bench/curve.jsonl
    PYTHONPATH=. python bench/bench_reward_curve.py --plot bench/curve.jsonl --png bench/reward_vs_time.png
    PYTHONPATH=. python bench/bench_reward_curve.py --quick     # smoke, ~2 min: every code path, no figure worth quoting
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

VARIANTS = {  # equal leaves per prompt: tree k**d = 27, flat/mix G = 27; same prompts, rewards, model
    "tree": [],
    "flat": ["tree.variant=flat", "tree.group_size=27", "learner.edge_baseline=none"],
    "mix": ["tree.variant=mix", "tree.group_size=27", "tree.window=sliding", "learner.edge_baseline=none"],
}
SETTINGS = {  # the sweep every variant gets: learning rate x optimizer steps per iteration
    "lr5e-5_mb1": ["learner.lr=5e-5", "learner.minibatches=1"],
    "lr1e-4_mb1": ["learner.lr=1e-4", "learner.minibatches=1"],
    "lr1e-4_mb2": ["learner.lr=1e-4", "learner.minibatches=2"],
}
# eval: the first 16 training prompts x 1 image at the fixed eval seed (what BENCHMARKS.md §2 recorded)
COMMON = ["mode=local", "eval_every=0", "tracking.progress=false", "eval_images_per_prompt=1"]


def train_for(variant: str, setting: str, seed: int, budget_s: float, extra: list[str]) -> dict:
    import torch

    from treegrpo_ray.builders import load_prompts
    from treegrpo_ray.config import load_config
    from treegrpo_ray.driver import advantages, evaluate, gather, plan
    from treegrpo_ray.local_system import LocalSystem

    torch.set_num_threads(1)
    cfg = load_config(None, [*COMMON, f"seed={seed}", "iterations=100000", *VARIANTS[variant], *SETTINGS[setting],
                             *extra])
    system = LocalSystem(cfg)
    prompts, eval_prompts = load_prompts(cfg, "train"), load_prompts(cfg, "eval")

    def eval_reward() -> float:
        return evaluate(cfg, system, eval_prompts, held_out=[])[0]["eval/reward"]

    points = [{"seconds": 0.0, "images": 0, "iteration": 0, "reward": eval_reward()}]
    clock, images, it = 0.0, 0, 0
    while clock < budget_s:
        t0 = time.perf_counter()
        collected = system.collect(system.launch(plan(cfg, prompts, it)))
        kept, raw, _ = gather(cfg, collected, system.version)
        leaf_adv, _ = advantages(cfg, kept.info, raw)
        system.update(kept.batches, leaf_adv, it)
        clock += time.perf_counter() - t0
        images += kept.info.num_leaves
        it += 1
        points.append({"seconds": clock, "images": images, "iteration": it, "reward": eval_reward()})
    return {"variant": variant, "setting": setting, "seed": seed, "budget_s": budget_s, "points": points}


def _job(args):
    return train_for(*args)


def tail_mean(run: dict) -> float:
    """Mean eval reward over the last third of the budget: the sweep's selection score."""
    pts = [p for p in run["points"] if p["seconds"] >= run["budget_s"] * 2 / 3] or run["points"][-1:]
    return sum(p["reward"] for p in pts) / len(pts)


def run_all(args) -> None:
    extra = args.override or []
    settings = dict(list(SETTINGS.items())[1:2]) if args.quick else SETTINGS
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool, open(args.out, "a") as out:
        sweep = [(v, s, 0, args.budget, extra) for v in VARIANTS for s in settings]
        runs = []
        for r in pool.imap_unordered(_job, sweep):
            runs.append(r)
            out.write(json.dumps({"phase": "sweep", **r}) + "\n")
            out.flush()
            print(f"sweep {r['variant']:5} {r['setting']:11} final {r['points'][-1]['reward']:.3f} "
                  f"tail {tail_mean(r):.3f} ({r['points'][-1]['iteration']} iterations)", flush=True)
        best = {v: max((r for r in runs if r["variant"] == v), key=tail_mean)["setting"] for v in VARIANTS}
        print("best settings:", best, flush=True)
        more = [(v, best[v], seed, args.budget, extra) for v in VARIANTS for seed in range(1, args.seeds)]
        for r in pool.imap_unordered(_job, more):
            out.write(json.dumps({"phase": "seeds", **r}) + "\n")
            out.flush()
            print(f"seed  {r['variant']:5} {r['setting']:11} seed {r['seed']} final {r['points'][-1]['reward']:.3f}",
                  flush=True)


def curve(runs: list[dict], key: str, grid: list[float]) -> tuple[list[float], list[float], list[float]]:
    """Mean / min / max over runs of the latest eval reward at or before each grid value."""
    per_run = []
    for r in runs:
        pts = r["points"]
        per_run.append([max((p for p in pts if p[key] <= g), key=lambda p: p[key])["reward"] for g in grid])
    cols = list(zip(*per_run))
    return [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.plot)]
    best = {}
    for v in VARIANTS:
        sweep = [r for r in rows if r["phase"] == "sweep" and r["variant"] == v]
        best[v] = max(sweep, key=tail_mean)["setting"]
    chosen = {v: [r for r in rows if r["variant"] == v and r["setting"] == best[v]] for v in VARIANTS}
    budget = min(r["budget_s"] for r in rows)
    grid_t = [budget * i / 200 for i in range(201)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    summary = {}
    for v, runs in chosen.items():
        mean, lo, hi = curve(runs, "seconds", grid_t)
        axes[0].plot(grid_t, mean, label=f"{v} ({best[v]}, {len(runs)} seeds)")
        axes[0].fill_between(grid_t, lo, hi, alpha=0.2)
        max_img = min(r["points"][-1]["images"] for r in runs)
        grid_i = [max_img * i / 200 for i in range(201)]
        mean_i, lo_i, hi_i = curve(runs, "images", grid_i)
        axes[1].plot(grid_i, mean_i, label=v)
        axes[1].fill_between(grid_i, lo_i, hi_i, alpha=0.2)
        summary[v] = {"setting": best[v], "seeds": sorted(r["seed"] for r in runs), "start": mean[0],
                      "final": mean[-1], "final_min": lo[-1], "final_max": hi[-1], "curve": mean,
                      "iterations": [r["points"][-1]["iteration"] for r in runs]}
    for ax, xlabel in zip(axes, ("training seconds (eval excluded)", "images generated")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("miniature reward (ODE eval, fixed seed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TreeGRPO vs flat (DanceGRPO/Flow-GRPO) vs MixGRPO on the miniature world: mean and min-max")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    flat_final = summary["flat"]["final"]
    tree_curve = summary["tree"]["curve"]
    # first time from which tree's mean stays at or above flat's final mean (a brief early touch
    # before a dip does not count)
    hit = next((t for i, t in enumerate(grid_t) if all(r >= flat_final for r in tree_curve[i:])), None)
    for v, s in summary.items():
        print(f"{v:5} {s['setting']:11} seeds {s['seeds']} iterations {s['iterations']} reward {s['start']:.3f} -> "
              f"{s['final']:.3f} (min {s['final_min']:.3f}, max {s['final_max']:.3f}; gain {s['final'] - s['start']:+.3f})")
    if hit is None:
        print(f"tree does not stay above flat's final mean reward {flat_final:.3f} within {budget:.0f} s")
    else:
        print(f"tree stays at or above flat's final mean reward {flat_final:.3f} from {hit:.1f} s = "
              f"{hit / budget:.2f} of flat's {budget:.0f} s (target <= 0.25)")
    if summary["flat"]["final_min"] <= summary["flat"]["start"]:
        print("note: flat's seeds do not all end above the start, so 'reaching flat's final reward' measures "
              "little; compare the gains above")
    print(f"wrote {args.png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    ap.add_argument("--out", default="bench/curve.jsonl")
    ap.add_argument("--override", nargs="*", help="extra key=value overrides for every run")
    ap.add_argument("--plot", default=None, help="a JSONL written by a previous run: plot it instead")
    ap.add_argument("--png", default="bench/reward_vs_time.png")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: 20 s per run, one setting (lr 1e-4, 1 step), one seed, then plot")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.seeds = 20.0, 1
        args.out = args.out if args.out != "bench/curve.jsonl" else "bench/curve_quick.jsonl"
        args.png = args.png if args.png != "bench/reward_vs_time.png" else "bench/reward_vs_time_quick.png"
        open(args.out, "w").close()
        run_all(args)
        args.plot = args.out
    plot(args) if args.plot else run_all(args)


if __name__ == "__main__":
    main()
