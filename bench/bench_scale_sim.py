"""Scale by simulation (issues 8 and 14): sampler, reward and learner pools with simulated GPU
costs (bench/sim_actors.py: sleeps calibrated to SD3.5-medium on an H100) and no real compute,
driven by the system's own scheduling code, `actors.dispatch.collect_iteration`.

One iteration, as `RaySystem` and `driver.iteration` run it: one store lookup, then every sampler
gets `calls` queued calls (`pools.sampler_calls`), each growing k=3, d=3, T=10 trees for its share
of the sampler's prompts with the weights ref passed along; `collect_iteration` routes each
finished call's leaves by reference to the least-loaded reward actor and fetches only infos and
rewards; the (simulated data-parallel) learner fetches the batches by reference and updates; the
driver publishes new weights to a real WeightStore. With staleness >= 1 the next iteration's calls
are queued before this one is collected, as the driver does, so sampling overlaps rewards and
learning. "before" = staleness 0 and 1 call per sampler (the system before issue 14), "after" =
--staleness / --calls.

Modes: `layout` (the paper-like 4 sampler / 2 reward / 2 learner GPUs, before vs after),
`scaling` (N = 1..32 samplers with a reward pool of ceil(N/4) and N/2 learner GPUs, before vs
after: throughput, sampler idle, driver bytes; efficiency = thr(N) / (N x thr(1))), `sweep` (the
N x R table of issue 8 for the `after` setting, with the bottleneck `diagnose` names).

Time is compressed by `--scale` (sleeps x 0.2 by default); walls are divided by it to report
real seconds. Ray and driver overheads are not compressed, so they weigh 1/scale times more than
on a real cluster: the efficiencies here are lower bounds.

    PYTHONPATH=. python bench/bench_scale_sim.py            # layout + scaling, before and after
    PYTHONPATH=. python bench/bench_scale_sim.py --quick    # smoke, about a minute
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray

from bench.sim_actors import SimCosts, SimLearner, SimReward, SimSampler, nfe_by_window
from treegrpo_ray.diagnose import diagnose
from treegrpo_ray.actors.dispatch import collect_iteration
from treegrpo_ray.actors.weight_store import WeightStore
from treegrpo_ray.algo.tree import build_tree, count_nfe

ROOT = Path(__file__).resolve().parents[1]
LEAVES = 27  # k^d = 3^3


@dataclass
class Cell:
    samplers: int
    rewards: int
    learner_workers: int
    staleness: int
    calls: int
    wall_s: float          # mean iteration wall over the measured iterations, real seconds
    trees_per_s: float
    images_per_s: float
    sampler_idle: float    # 1 - sampler busy / (N x wall), over the measured iterations
    bottleneck: str
    advice: str
    max_lag: float         # weights versions between a tree's sampler and the learner
    driver_bytes: float    # per iteration, what the driver fetched (infos + rewards)


@dataclass(frozen=True)
class Setting:
    """How an iteration is pipelined: the system's `max_staleness` and `pools.sampler_calls`."""
    staleness: int
    calls: int

    def __str__(self) -> str:
        return f"staleness {self.staleness}, {self.calls} call{'s' if self.calls > 1 else ''}/sampler"


class Pools:
    """The largest pools of the sweep, created once; a cell uses the first N samplers / R rewards."""

    def __init__(self, costs: SimCosts, samplers: int, rewards: int):
        opts = dict(num_cpus=0.01, max_concurrency=1)
        self.store = WeightStore.remote()
        nfe = nfe_by_window()
        self.samplers = [ray.remote(SimSampler).options(**opts).remote(costs, 1, nfe) for _ in range(samplers)]
        self.rewards = [ray.remote(SimReward).options(**opts).remote(costs, actor_id=i) for i in range(rewards)]
        self.learner = ray.remote(SimLearner).options(**opts).remote(costs)
        self.version = 0
        ray.get(self.store.publish.remote(0, [ray.put({"w": np.zeros(4)})]))  # one bucket; numpy: no torch
        ray.get([a.ready.remote() for a in self.samplers + self.rewards] + [self.learner.update.remote(0, 1)])

    def launch(self, n: int, setting: Setting, chunks: int, *, prompts_per_sampler: int, window_start: int,
               seed: int):
        """As Pools.launch: one store lookup, its ref with every call; call j on sampler j // calls."""
        weights = ray.get(self.store.latest.remote(-1))
        per_call = prompts_per_sampler // setting.calls
        calls = [self.samplers[j // setting.calls].sample.options(num_returns=2 + chunks).remote(
                     [f"prompt {j}.{q}" for q in range(per_call)], window_start, seed * 1000 + j, weights)
                 for j in range(n * setting.calls)]
        return time.perf_counter(), calls

    def iteration(self, handle, n: int, r: int, setting: Setting, chunks: int, *, learner_workers: int, **plan):
        """driver.iteration's order: with staleness >= 1 the next iteration's calls are queued on the
        samplers first, then this one is collected, learned and published; with 0, after publishing."""
        t0 = time.perf_counter()
        nxt = self.launch(n, setting, chunks, **plan) if setting.staleness else None
        started, calls = handle
        got = collect_iteration(calls, self.rewards[:r], chunks, started=started, timeout_s=600)
        lag = max(self.version - i.policy_version for i in got.infos)
        decisions = sum(i.num_decisions for i in got.infos)
        learn_s = ray.get(self.learner.update.remote(decisions, learner_workers, got.batches))
        self.version += 1
        ray.get(self.store.publish.remote(self.version, [ray.put({"w": np.full(4, float(self.version))})]))
        if nxt is None:
            nxt = self.launch(n, setting, chunks, **plan)
        wall = time.perf_counter() - t0
        return nxt, {"wall_s": wall, "sample_s": got.sample_s, "reward_s": got.reward_s,
                     "learn_s": learn_s * learner_workers, "trees": float(sum(i.trees for i in got.infos)),
                     "lag": float(lag), "driver_bytes": float(got.driver_bytes)}


def run_cell(pools: Pools, n: int, r: int, setting: Setting, args, costs: SimCosts) -> Cell:
    w = max(1, round(n * args.learner_ratio)) if args.learner_workers == 0 else args.learner_workers
    chunks = 1  # one reward call per sampler call: pools.sampler_calls is what splits the work here
    plan = dict(prompts_per_sampler=args.prompts_per_sampler, window_start=args.window_start)
    handle = pools.launch(n, setting, chunks, seed=0, **plan)
    its = []
    for it in range(args.warmup + args.iterations):
        handle, m = pools.iteration(handle, n, r, setting, chunks, learner_workers=w, seed=it + 1, **plan)
        if it >= args.warmup:
            its.append(m)
    ray.get(handle[1][-1][0])  # let the last launched calls finish before the next cell
    total = {k: sum(m[k] for m in its) for k in ("wall_s", "sample_s", "reward_s", "learn_s", "trees")}
    d = diagnose({"sampler": total["sample_s"], "reward": total["reward_s"], "learner": total["learn_s"]},
                 {"sampler": n, "reward": r, "learner": w}, total["wall_s"])
    real_wall = total["wall_s"] / len(its) / costs.scale
    trees = total["trees"] / len(its)
    return Cell(samplers=n, rewards=r, learner_workers=w, staleness=setting.staleness, calls=setting.calls,
                wall_s=real_wall, trees_per_s=trees / real_wall, images_per_s=trees * LEAVES / real_wall,
                sampler_idle=1 - total["sample_s"] / (n * total["wall_s"]), bottleneck=d.bottleneck,
                advice=" ".join(f"{p}->{k}" for p, k in d.suggest.items() if p == "reward"),
                max_lag=max(m["lag"] for m in its), driver_bytes=statistics.mean(m["driver_bytes"] for m in its))


def sized_right(cells: dict, n: int, rewards: list[int]) -> int:
    """Smallest reward pool within 3 % of the best throughput at n samplers."""
    best = max(cells[(n, r)].trees_per_s for r in rewards)
    return min(r for r in rewards if cells[(n, r)].trees_per_s >= 0.97 * best)


def print_tables(cells: dict, samplers: list[int], rewards: list[int]) -> list[dict]:
    print("\nthroughput, trees per real second (images = x27); rows: samplers N, columns: reward actors R")
    print(f"{'N':>3} | " + " ".join(f"{'R=' + str(r):>9}" for r in rewards))
    for n in samplers:
        print(f"{n:>3} | " + " ".join(f"{cells[(n, r)].trees_per_s:>9.3f}" for r in rewards))
    print("\nsampler idle fraction / bottleneck pool (S sampler, R reward, L learner, O overhead)")
    tag = {"sampler": "S", "reward": "R", "learner": "L", "overhead": "O"}
    print(f"{'N':>3} | " + " ".join(f"{'R=' + str(r):>9}" for r in rewards))
    for n in samplers:
        print(f"{n:>3} | " + " ".join(f"{cells[(n, r)].sampler_idle:>7.0%} {tag[cells[(n, r)].bottleneck]}"
                                      for r in rewards))
    base_r = sized_right(cells, samplers[0], rewards)
    base = cells[(samplers[0], base_r)].trees_per_s / samplers[0]
    print(f"\nscaling with the reward pool sized right (R* = smallest R within 3 % of the best; "
          f"efficiency = thr(N, R*) / (N x thr(1, R*)); target >= 90 % to 16 samplers)")
    print(f"{'N':>3} {'R*':>3} {'trees/s':>8} {'images/s':>9} {'s/iter':>7} {'idle':>5} {'efficiency':>10}  diagnosis")
    summary = []
    for n in samplers:
        r = sized_right(cells, n, rewards)
        c = cells[(n, r)]
        eff = c.trees_per_s / (n * base)
        print(f"{n:>3} {r:>3} {c.trees_per_s:>8.3f} {c.images_per_s:>9.2f} {c.wall_s:>7.2f} {c.sampler_idle:>5.0%} "
              f"{eff:>10.0%}  bottleneck={c.bottleneck} {c.advice}")
        summary.append({"samplers": n, "rewards": r, "efficiency": eff, **asdict(c)})
    return summary


def print_layout(before: Cell, calls_only: Cell, after: Cell) -> dict:
    print(f"\npaper-like layout: {before.samplers} samplers, {before.rewards} reward actors, "
          f"{before.learner_workers} learner GPUs")
    print(f"{'setting':<34} {'trees/s':>8} {'s/iter':>7} {'sampler idle':>12} {'max lag':>7}  bottleneck")
    for c in (before, calls_only, after):
        print(f"{str(Setting(c.staleness, c.calls)):<34} {c.trees_per_s:>8.3f} {c.wall_s:>7.2f} "
              f"{c.sampler_idle:>12.1%} {c.max_lag:>7.0f}  {c.bottleneck}")
    ratio = after.trees_per_s / before.trees_per_s
    print(f"after/before throughput {ratio:.2f}x (target >= 1.3x); sampler idle after {after.sampler_idle:.1%} "
          "(target <= 5 %)")
    return {"before": asdict(before), "calls_only": asdict(calls_only), "after": asdict(after), "ratio": ratio}


def print_scaling(cells: dict, samplers: list[int], settings: list[Setting]) -> list[dict]:
    print("\nscaling, reward pool ceil(N/4), learner GPUs N x learner_ratio; efficiency = thr(N) / (N x thr(1)) "
          "in the same setting (target >= 95 % at N = 32 after)")
    print(f"{'setting':<34} {'N':>3} {'R':>3} {'L':>3} {'trees/s':>8} {'s/iter':>7} {'idle':>6} {'efficiency':>10} "
          f"{'driver B/it':>11}  bottleneck")
    rows = []
    for st in settings:
        base = cells[(st, samplers[0])].trees_per_s / samplers[0]
        for n in samplers:
            c = cells[(st, n)]
            eff = c.trees_per_s / (n * base)
            print(f"{str(st):<34} {n:>3} {c.rewards:>3} {c.learner_workers:>3} {c.trees_per_s:>8.3f} {c.wall_s:>7.2f} "
                  f"{c.sampler_idle:>6.1%} {eff:>10.1%} {c.driver_bytes:>11.0f}  {c.bottleneck} {c.advice}")
            rows.append({"efficiency": eff, **asdict(c)})
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="layout,scaling", help="comma list of: layout (4/2/2 before vs after), "
                    "scaling (N samplers, R = ceil(N/4), before vs after), sweep (N x R table, --staleness/--calls)")
    ap.add_argument("--samplers", default="1,2,4,8,16,32", help="comma list of sampler pool sizes")
    ap.add_argument("--rewards", default="1,2,4,8,16", help="sweep: comma list of reward pool sizes")
    ap.add_argument("--layout", default="4,2,2", help="layout: samplers,rewards,learner GPUs")
    ap.add_argument("--iterations", type=int, default=3, help="measured iterations per cell")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured iterations per cell")
    ap.add_argument("--scale", type=float, default=0.2, help="time compression: every sleep x scale")
    ap.add_argument("--prompts-per-sampler", type=int, default=4, help="trees per sampler per iteration")
    ap.add_argument("--calls", type=int, default=4, help="pools.sampler_calls of the 'after' setting")
    ap.add_argument("--staleness", type=int, default=1, help="max_staleness of the 'after' setting")
    ap.add_argument("--window-start", type=int, default=3, help="SDE window start p: NFE = p + 13 + 27 (7 - p)")
    ap.add_argument("--learner-workers", type=int, default=0, help="simulated learner GPUs; 0 = N x learner_ratio")
    ap.add_argument("--learner-ratio", type=float, default=0.5, help="learner GPUs per sampler (4/2/2: 0.5)")
    ap.add_argument("--nfe-s", type=float, default=SimCosts.nfe_s, help="seconds per transformer call (CFG pair)")
    ap.add_argument("--decode-s", type=float, default=SimCosts.decode_s, help="seconds per image, VAE decode")
    ap.add_argument("--score-s", type=float, default=SimCosts.score_s, help="seconds per image, reward model")
    ap.add_argument("--quick", action="store_true", help="smoke: layout + scaling at N in {1,2}, 1 iteration, scale 0.05")
    ap.add_argument("--json-out", default="", help="write every cell and the summaries here")
    args = ap.parse_args()
    if args.quick:
        args.samplers, args.rewards, args.iterations, args.warmup, args.scale = "1,2", "1,2", 1, 1, 0.05
    return args


def main() -> None:
    args = parse_args()
    modes = args.modes.split(",")
    samplers, rewards = [int(x) for x in args.samplers.split(",")], [int(x) for x in args.rewards.split(",")]
    layout = [int(x) for x in args.layout.split(",")]
    before, after = Setting(0, 1), Setting(args.staleness, args.calls)
    costs = SimCosts(nfe_s=args.nfe_s, decode_s=args.decode_s, score_s=args.score_s, scale=args.scale)
    nfe = count_nfe(10, 3, 3, args.window_start)
    decisions = build_tree(10, 3, 3, args.window_start).num_decisions
    print(f"per tree: {nfe} NFE x {costs.nfe_s} s = {nfe * costs.nfe_s:.2f} s sampling, {LEAVES} images x "
          f"{costs.decode_s + costs.score_s:.3f} s = {LEAVES * (costs.decode_s + costs.score_s):.2f} s rewards, "
          f"{decisions} decisions x {costs.learn_factor:g} x {costs.nfe_s} s = {costs.learn_s(decisions, 1) / costs.scale:.2f} "
          f"s learning (real units); {args.prompts_per_sampler} trees per sampler per iteration; scale {costs.scale}; "
          f"before = {before}, after = {after}")
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 1024 ** 2, runtime_env={"env_vars": env}, log_to_driver=False)
    result: dict = {"args": vars(args)}
    try:
        need_s = max(samplers + [layout[0]])
        need_r = max([max(1, -(-n // 4)) for n in samplers] + [layout[1]] + (rewards if "sweep" in modes else []))
        pools = Pools(costs, need_s, need_r)
        print(f"started {need_s} samplers, {need_r} reward actors, 1 learner, 1 store in {time.perf_counter() - t0:.0f} s")
        if "layout" in modes:
            n, r, w = layout
            args_l = argparse.Namespace(**{**vars(args), "learner_workers": w})
            result["layout"] = print_layout(*(run_cell(pools, n, r, st, args_l, costs)
                                              for st in (before, Setting(0, args.calls), after)))
        if "scaling" in modes:
            cells = {(st, n): run_cell(pools, n, max(1, -(-n // 4)), st, args, costs)
                     for st in (before, after) for n in samplers}
            result["scaling"] = print_scaling(cells, samplers, [before, after])
        if "sweep" in modes:
            cells = {(n, r): run_cell(pools, n, r, after, args, costs) for n in samplers for r in rewards}
            result["sweep"] = print_tables(cells, samplers, rewards)
    finally:
        ray.shutdown()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
