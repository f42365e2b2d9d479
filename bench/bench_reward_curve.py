"""Issue 15 item 4: reward against wall-clock and images, tree vs flat vs mix (the paper's Figure 1 in miniature).

Every run trains one variant in-process (`LocalSystem`, the driver's own stages) from its shipped
config (`miniature` = tree, `flat` = DanceGRPO, `mix` = MixGRPO; 27 leaves per prompt each) for a
training-time budget, and scores ODE samples at the fixed eval seed each time the training clock
passes one of `--eval-points` marks (that time is not charged to the run's clock): the 16 training
prompts x 2 images (`reward`, what RL optimises) and the 24 held-out prompts x 2 (`held_out`).
Two phases:

  1. sweep: every variant x every learning rate, seed 0;
  2. seeds: each variant's best lr (highest mean training reward over the last third of its
     budget) again with seeds 1..S-1, so no baseline is judged at a setting it is bad at;
  3. also (optional, `--also tree:lr5e-5 ...`): settings the sweep did not pick, on every seed,
     e.g. a variant's shipped default when the sweep, judging training reward, chose another.

Tree's budget is `--tree-budget` (default half of `--budget`): the claim under test is that tree
reaches flat's final reward within 1/2.4 of flat's time, which needs tree's curve only that far.
One JSON line per run is appended to --out; a rerun skips the runs already there, so the
benchmark can be run in pieces. `--plot` draws mean +- min/max over seeds against seconds and
against images generated, and prints when tree reaches flat's final mean reward.

    PYTHONPATH=. python bench/bench_reward_curve.py --budget 720 --seeds 3 --jobs 2 --out bench/curve_h.jsonl \
        --also tree:lr5e-5
    PYTHONPATH=. python bench/bench_reward_curve.py --plot bench/curve_h.jsonl --png bench/reward_vs_time.png
    PYTHONPATH=. python bench/bench_reward_curve.py --quick     # smoke, ~3 min: every code path, no figure worth quoting
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

VARIANTS = {"tree": "miniature", "flat": "flat", "mix": "mix"}  # variant -> its shipped config
SETTINGS = {"lr5e-5": ["learner.lr=5e-5"], "lr1e-4": ["learner.lr=1e-4"]}  # the sweep every variant gets
# evaluation: 16 training prompts x 2 images + 24 held-out x 2 (~6 s on one thread), as the default run's
COMMON = ["mode=local", "eval_every=0", "tracking.progress=false", "eval_images_per_prompt=2"]
TARGET = 1 / 2.4  # the paper's headline: TreeGRPO trains 2.4x faster than the GRPO baselines


def train_for(variant: str, setting: str, seed: int, budget_s: float, eval_points: int, extra: list[str]) -> dict:
    import torch

    from treegrpo_ray.builders import load_prompts
    from treegrpo_ray.config import load_config
    from treegrpo_ray.driver import advantages, evaluate, gather, requests_for
    from treegrpo_ray.local_system import LocalSystem

    torch.set_num_threads(1)
    cfg = load_config(VARIANTS[variant], [*COMMON, f"seed={seed}", "iterations=100000", *SETTINGS[setting], *extra])
    system = LocalSystem(cfg)
    prompts, eval_prompts, held_out = load_prompts(cfg, "train"), load_prompts(cfg, "eval"), load_prompts(cfg, "held_out")

    def point(clock: float, images: int, it: int) -> dict:
        out, _ = evaluate(cfg, system, eval_prompts, held_out)
        return {"seconds": clock, "images": images, "iteration": it, "reward": out["eval/reward"],
                "held_out": out["eval_held_out/reward"]}

    points = [point(0.0, 0, 0)]
    clock, images, it, mark = 0.0, 0, 0, 1
    while clock < budget_s:
        t0 = time.perf_counter()
        collected = system.collect(system.launch(requests_for(cfg, prompts, it)))
        kept, raw, _ = gather(cfg, collected, system.version)
        leaf_adv, _ = advantages(cfg, kept.info, raw)
        system.update(kept.batches, leaf_adv, it)
        clock += time.perf_counter() - t0
        images += kept.info.num_leaves
        it += 1
        if clock >= budget_s * mark / eval_points or clock >= budget_s:
            points.append(point(clock, images, it))
            while clock >= budget_s * mark / eval_points:
                mark += 1
    return {"variant": variant, "setting": setting, "seed": seed, "budget_s": budget_s, "points": points}


def _job(args):
    return train_for(*args)


def tail_mean(run: dict) -> float:
    """Mean training-prompt reward over the last third of the budget: the sweep's selection score."""
    pts = [p for p in run["points"] if p["seconds"] >= run["budget_s"] * 2 / 3] or run["points"][-1:]
    return sum(p["reward"] for p in pts) / len(pts)


def budget_of(variant: str, args) -> float:
    return args.tree_budget if variant == "tree" else args.budget


def run_all(args) -> None:
    extra = args.override or []
    settings = list(SETTINGS)[1:] if args.quick else list(SETTINGS)
    done = [json.loads(line) for line in open(args.out)] if os.path.exists(args.out) else []

    def key(r):
        return r["variant"], r["setting"], r["seed"], r["budget_s"]
    have = {key(r): r for r in done}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool, open(args.out, "a") as out:
        def run(phase, jobs):
            todo = [j for j in jobs if (j[0], j[1], j[2], j[3]) not in have]
            print(f"{phase}: {len(jobs) - len(todo)} of {len(jobs)} runs already in {args.out}", flush=True)
            for r in pool.imap_unordered(_job, todo):
                have[key(r)] = r
                out.write(json.dumps({"phase": phase, **r}) + "\n")
                out.flush()
                last = r["points"][-1]
                print(f"{phase} {r['variant']:5} {r['setting']:7} seed {r['seed']} reward {r['points'][0]['reward']:.3f} -> "
                      f"{last['reward']:.3f}, held-out {r['points'][0]['held_out']:.3f} -> {last['held_out']:.3f} "
                      f"({last['iteration']} iterations, tail {tail_mean(r):.3f})", flush=True)

        run("sweep", [(v, s, 0, budget_of(v, args), args.eval_points, extra) for v in VARIANTS for s in settings])
        best = {v: max((have[(v, s, 0, budget_of(v, args))] for s in settings), key=tail_mean)["setting"]
                for v in VARIANTS}
        print("best settings:", best, flush=True)
        run("seeds", [(v, best[v], seed, budget_of(v, args), args.eval_points, extra)
                      for v in VARIANTS for seed in range(1, args.seeds)])
        for spec in args.also or []:  # a setting the sweep did not pick, on every seed, to compare at equal seeds
            v, s = spec.split(":")
            if v not in VARIANTS or s not in SETTINGS:
                raise SystemExit(f"--also {spec}: expected VARIANT:SETTING with VARIANT in {list(VARIANTS)} "
                                 f"and SETTING in {list(SETTINGS)}")
            run("also", [(v, s, seed, budget_of(v, args), args.eval_points, extra) for seed in range(args.seeds)])


def curve(runs: list[dict], key: str, grid: list[float], value: str = "reward") -> tuple[list, list, list]:
    """Mean / min / max over runs of the latest eval value at or before each grid value."""
    per_run = []
    for r in runs:
        pts = r["points"]
        per_run.append([max((p for p in pts if p[key] <= g), key=lambda p: p[key])[value] for g in grid])
    cols = list(zip(*per_run))
    return [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(args.plot)]
    best, chosen = {}, {}
    for v in VARIANTS:
        sweep = [r for r in rows if r["phase"] == "sweep" and r["variant"] == v]
        for r in sorted(sweep, key=lambda r: r["setting"]):
            print(f"sweep {v:5} {r['setting']:7} final {r['points'][-1]['reward']:.3f} tail {tail_mean(r):.3f} "
                  f"held-out final {r['points'][-1]['held_out']:.3f} ({r['points'][-1]['iteration']} iterations)")
        best[v] = max(sweep, key=tail_mean)["setting"]
        chosen[v] = sorted((r for r in rows if r["variant"] == v and r["setting"] == best[v]), key=lambda r: r["seed"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    summary = {}
    for v, runs in chosen.items():
        # each run's last iteration ends past its budget: the curve runs to the earliest such end, so its
        # final value is every run's last evaluation, and "flat's time" is the time that reward took
        budget = min(r["points"][-1]["seconds"] for r in runs)
        grid_t = [budget * i / 200 for i in range(201)]
        mean, lo, hi = curve(runs, "seconds", grid_t)
        axes[0].plot(grid_t, mean, label=f"{v} ({best[v]}, {len(runs)} seeds)")
        axes[0].fill_between(grid_t, lo, hi, alpha=0.2)
        max_img = min(r["points"][-1]["images"] for r in runs)
        grid_i = [max_img * i / 200 for i in range(201)]
        mean_i, lo_i, hi_i = curve(runs, "images", grid_i)
        axes[1].plot(grid_i, mean_i, label=v)
        axes[1].fill_between(grid_i, lo_i, hi_i, alpha=0.2)
        mean_h, lo_h, hi_h = curve(runs, "seconds", grid_t, "held_out")
        axes[2].plot(grid_t, mean_h, label=v)
        axes[2].fill_between(grid_t, lo_h, hi_h, alpha=0.2)
        summary[v] = {"setting": best[v], "seeds": [r["seed"] for r in runs], "budget": budget, "grid": grid_t,
                      "curve": mean, "start": mean[0], "final": mean[-1], "final_min": lo[-1], "final_max": hi[-1],
                      "gains": [r["points"][-1]["reward"] - r["points"][0]["reward"] for r in runs],
                      "held_gains": [r["points"][-1]["held_out"] - r["points"][0]["held_out"] for r in runs],
                      "iterations": [r["points"][-1]["iteration"] for r in runs],
                      "images": max_img, "per_image": (grid_i, mean_i)}
    for ax, xlabel, ylabel in zip(axes, ("training seconds (eval excluded)", "images generated",
                                         "training seconds (eval excluded)"),
                                  ("reward, 16 training prompts", "reward, 16 training prompts",
                                   "reward, 24 held-out prompts")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + " (ODE, fixed seed)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TreeGRPO vs flat (DanceGRPO) vs MixGRPO on the miniature world: mean and min-max over seeds")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    for v, s in summary.items():
        g, h = s["gains"], s["held_gains"]
        print(f"{v:5} {s['setting']:7} seeds {s['seeds']} {s['budget']:.0f} s, iterations {s['iterations']}: reward "
              f"{s['start']:.3f} -> {s['final']:.3f} (min {s['final_min']:.3f}, max {s['final_max']:.3f}); gain "
              f"{sum(g) / len(g):+.3f} ({', '.join(f'{x:+.3f}' for x in g)}); held-out gain {sum(h) / len(h):+.3f} "
              f"({', '.join(f'{x:+.3f}' for x in h)})")
    for v in VARIANTS:  # settings the sweep did not pick but that were run on several seeds (--also)
        for setting in sorted({r["setting"] for r in rows if r["variant"] == v} - {best[v]}):
            runs = sorted((r for r in rows if r["variant"] == v and r["setting"] == setting), key=lambda r: r["seed"])
            if len(runs) < 2:
                continue
            g = [r["points"][-1]["reward"] - r["points"][0]["reward"] for r in runs]
            h = [r["points"][-1]["held_out"] - r["points"][0]["held_out"] for r in runs]
            print(f"{v:5} {setting:7} seeds {[r['seed'] for r in runs]} (not the sweep's pick), iterations "
                  f"{[r['points'][-1]['iteration'] for r in runs]}: gain {sum(g) / len(g):+.3f} "
                  f"({', '.join(f'{x:+.3f}' for x in g)}); held-out gain {sum(h) / len(h):+.3f} "
                  f"({', '.join(f'{x:+.3f}' for x in h)})")
    flat, tree = summary["flat"], summary["tree"]
    tree_curves = {tree["setting"]: (tree["grid"], tree["curve"])}
    for setting in sorted({r["setting"] for r in rows if r["variant"] == "tree"} - {tree["setting"]}):
        runs = [r for r in rows if r["variant"] == "tree" and r["setting"] == setting]
        if len(runs) >= 2:
            grid = [min(r["points"][-1]["seconds"] for r in runs) * i / 200 for i in range(201)]
            tree_curves[setting] = (grid, curve(runs, "seconds", grid)[0])
    for base in ("flat", "mix"):
        b = summary[base]
        for setting, (grid, mean) in tree_curves.items():
            # first time from which tree's mean stays at or above the baseline's final mean (a brief touch
            # before a dip does not count)
            hit = next((t for i, t in enumerate(grid) if all(r >= b["final"] for r in mean[i:])), None)
            pick = ", the sweep's pick" if setting == tree["setting"] else ""
            who = f"tree ({setting}{pick})"
            if hit is None:
                print(f"{who} does not stay at or above {base}'s final mean reward {b['final']:.3f} within its "
                      f"{grid[-1]:.0f} s")
            else:
                print(f"{who} stays at or above {base}'s final mean reward {b['final']:.3f} from {hit:.1f} s = "
                      f"{hit / b['budget']:.3f} of {base}'s {b['budget']:.0f} s (target <= {TARGET:.3f})")
    if flat["final"] - flat["start"] < 0.05:
        print(f"note: flat's mean gain {flat['final'] - flat['start']:+.3f} is below +0.05, so 'reaching flat's final "
              "reward' measures little; compare the gains above")
    n = min(s["images"] for s in summary.values())
    at = {v: s["per_image"][1][max(i for i, x in enumerate(s["per_image"][0]) if x <= n)] for v, s in summary.items()}
    print(f"per image, at {n} images (the fewest any variant generated): "
          + ", ".join(f"{v} {at[v]:.3f} ({at[v] - summary[v]['start']:+.3f})" for v in summary))
    print(f"wrote {args.png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=720.0, help="training seconds per flat and mix run")
    ap.add_argument("--tree-budget", type=float, default=None, help="training seconds per tree run (default budget/2)")
    ap.add_argument("--eval-points", type=int, default=12, help="evaluations per run, at even marks of its budget")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each")
    ap.add_argument("--out", default="bench/curve_h.jsonl")
    ap.add_argument("--override", nargs="*", help="extra key=value overrides for every run")
    ap.add_argument("--also", nargs="*", metavar="VARIANT:SETTING",
                    help="after the seeds phase, also run these settings on every seed (e.g. tree:lr5e-5)")
    ap.add_argument("--plot", default=None, help="a JSONL written by a previous run: plot it instead")
    ap.add_argument("--png", default="bench/reward_vs_time.png")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: 30 s per flat/mix run, 15 s per tree run, lr 1e-4 only, one seed, then plot")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.tree_budget, args.seeds, args.eval_points = 30.0, 15.0, 1, 3
        args.out = args.out if args.out != "bench/curve_h.jsonl" else "bench/curve_quick.jsonl"
        args.png = args.png if args.png != "bench/reward_vs_time.png" else "bench/reward_vs_time_quick.png"
        open(args.out, "w").close()
        run_all(args)
        args.plot = args.out
    args.tree_budget = args.tree_budget if args.tree_budget is not None else args.budget / 2
    plot(args) if args.plot else run_all(args)


if __name__ == "__main__":
    main()
