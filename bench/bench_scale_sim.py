"""Scale by simulation (issue 8, item 5): sampler, reward and learner pools with simulated GPU
costs (bench/sim_actors.py: sleeps calibrated to SD3.5-medium on an H100) and no real compute,
driven by the system's own scheduling code, `actors.dispatch.collect_iteration`.

One iteration, as `RaySystem` runs it: every sampler gets its prompts and grows one k=3, d=3, T=10
tree per prompt (`sample.options(num_returns=1 + chunks)`), `collect_iteration` routes each
finished sampler's leaf chunks by reference to the least-loaded reward actor, then the learner
updates on all decisions (one simulated data-parallel group of `learner_workers` GPUs) and the
driver publishes new weights to a real WeightStore, which samplers pull before their next call.

Reported per (samplers N, reward actors R): throughput in trees and images per real second, the
sampler idle fraction 1 - (sampler busy) / (N x wall), and the bottleneck pool named by
`treegrpo_ray.diagnose.diagnose`. Scaling efficiency: thr(N, R*(N)) / (N x thr(1, R*(1))) where R*(N)
is the smallest pool within 3 % of the best throughput at N ("the reward pool sized right").

Time is compressed by `--scale` (sleeps x 0.2 by default); walls are divided by it to report
real seconds. Ray and driver overheads are not compressed, so they weigh 1/scale times more than
on a real cluster: the efficiencies here are lower bounds.

    PYTHONPATH=. python bench/bench_scale_sim.py            # full sweep, ~6-7 minutes on 2 cores
    PYTHONPATH=. python bench/bench_scale_sim.py --quick    # CI smoke, < 60 s
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
    wall_s: float          # median iteration wall, real seconds
    trees_per_s: float
    images_per_s: float
    sampler_idle: float    # mean over measured iterations
    bottleneck: str
    advice: str


class Pools:
    """The largest pools of the sweep, created once; a cell uses the first N samplers / R rewards."""

    def __init__(self, costs: SimCosts, samplers: int, rewards: int, chunks: int):
        opts = dict(num_cpus=0.01, max_concurrency=1)
        self.store = WeightStore.remote()
        nfe = nfe_by_window()
        self.samplers = [ray.remote(SimSampler).options(**opts).remote(costs, chunks, nfe, store=self.store)
                         for _ in range(samplers)]
        self.rewards = [ray.remote(SimReward).options(**opts).remote(costs, actor_id=i) for i in range(rewards)]
        self.learner = ray.remote(SimLearner).options(**opts).remote(costs)
        self.version, self.chunks = 0, chunks
        ray.get(self.store.publish.remote(0, {"w": np.zeros(4)}))  # numpy: the stand-ins hold no torch
        ray.get([a.ready.remote() for a in self.samplers + self.rewards] + [self.learner.update.remote(0, 1)])

    def iteration(self, n: int, r: int, *, prompts_per_sampler: int, window_start: int, seed: int,
                  learner_workers: int) -> dict[str, float]:
        """Sample -> score (collect_iteration) -> learn -> publish, as the system's iteration does."""
        started = time.perf_counter()
        opts = {"num_returns": 1 + self.chunks}
        calls = [s.sample.options(**opts).remote([f"prompt {i}.{j}" for j in range(prompts_per_sampler)],
                                                 window_start, seed * 1000 + i)
                 for i, s in enumerate(self.samplers[:n])]
        got = collect_iteration(calls, self.rewards[:r], self.chunks, started=started, timeout_s=600)
        decisions = sum(b.num_decisions for b in got.batches)
        learn_s = ray.get(self.learner.update.remote(decisions, learner_workers))
        self.version += 1
        ray.get(self.store.publish.remote(self.version, {"w": np.full(4, float(self.version))}))
        wall = time.perf_counter() - started
        return {"wall_s": wall, "sample_s": got.sample_s, "reward_s": got.reward_s,
                "learn_s": learn_s * learner_workers, "trees": float(len(got.batches) * prompts_per_sampler)}


def run_cell(pools: Pools, n: int, r: int, args, costs: SimCosts) -> Cell:
    w = n if args.learner_workers == 0 else args.learner_workers
    its = []
    for it in range(args.warmup + args.iterations):
        m = pools.iteration(n, r, prompts_per_sampler=args.prompts_per_sampler, window_start=args.window_start,
                            seed=it, learner_workers=w)
        if it >= args.warmup:
            its.append(m)
    wall = statistics.median(m["wall_s"] for m in its)
    trees = its[0]["trees"]
    idle = statistics.mean(1 - m["sample_s"] / (n * m["wall_s"]) for m in its)
    total = {k: sum(m[k] for m in its) for k in ("wall_s", "sample_s", "reward_s", "learn_s")}
    d = diagnose({"sampler": total["sample_s"], "reward": total["reward_s"], "learner": total["learn_s"]},
                 {"sampler": n, "reward": r, "learner": w}, total["wall_s"])
    real_wall = wall / costs.scale
    return Cell(samplers=n, rewards=r, wall_s=real_wall, trees_per_s=trees / real_wall,
                images_per_s=trees * LEAVES / real_wall, sampler_idle=idle, bottleneck=d.bottleneck,
                advice=" ".join(f"{p}->{k}" for p, k in d.suggest.items() if p == "reward"))


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


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samplers", default="1,2,4,8,16,32", help="comma list of sampler pool sizes")
    ap.add_argument("--rewards", default="1,2,4,8,16", help="comma list of reward pool sizes")
    ap.add_argument("--iterations", type=int, default=2, help="measured iterations per cell (median wall)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured iterations per cell")
    ap.add_argument("--scale", type=float, default=0.2, help="time compression: every sleep x scale")
    ap.add_argument("--prompts-per-sampler", type=int, default=1, help="trees per sampler call (1 prompt = 1 tree)")
    ap.add_argument("--reward-chunk", type=int, default=9, help="leaves per reward call (pools.reward_chunk)")
    ap.add_argument("--window-start", type=int, default=3, help="SDE window start p: NFE = p + 13 + 27 (7 - p)")
    ap.add_argument("--learner-workers", type=int, default=0, help="simulated learner GPUs; 0 = as many as samplers")
    ap.add_argument("--nfe-s", type=float, default=SimCosts.nfe_s, help="seconds per transformer call (CFG pair)")
    ap.add_argument("--decode-s", type=float, default=SimCosts.decode_s, help="seconds per image, VAE decode")
    ap.add_argument("--score-s", type=float, default=SimCosts.score_s, help="seconds per image, reward model")
    ap.add_argument("--quick", action="store_true", help="CI smoke: N in {1,2}, R in {1,2}, 1 iteration, scale 0.05")
    ap.add_argument("--json-out", default="", help="write every cell and the summary here")
    args = ap.parse_args()
    if args.quick:
        args.samplers, args.rewards, args.iterations, args.warmup, args.scale = "1,2", "1,2", 1, 1, 0.05
    return args


def main() -> None:
    args = parse_args()
    samplers, rewards = [int(x) for x in args.samplers.split(",")], [int(x) for x in args.rewards.split(",")]
    costs = SimCosts(nfe_s=args.nfe_s, decode_s=args.decode_s, score_s=args.score_s, scale=args.scale)
    leaves = args.prompts_per_sampler * LEAVES
    chunks = max(1, -(-leaves // args.reward_chunk)) if args.reward_chunk else 1
    nfe = count_nfe(10, 3, 3, args.window_start)
    decisions = build_tree(10, 3, 3, args.window_start).num_decisions
    print(f"per tree: {nfe} NFE x {costs.nfe_s} s = {nfe * costs.nfe_s:.2f} s sampling, {LEAVES} images x "
          f"{costs.decode_s + costs.score_s:.3f} s = {LEAVES * (costs.decode_s + costs.score_s):.2f} s rewards, "
          f"{decisions} decisions x {costs.learn_factor:g} x {costs.nfe_s} s = {costs.learn_s(decisions, 1) / costs.scale:.2f} "
          f"s learning (real units); scale {costs.scale}, {chunks} reward chunks per sampler call")
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 1024 ** 2, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        pools = Pools(costs, max(samplers), max(rewards), chunks)
        print(f"started {max(samplers)} samplers, {max(rewards)} reward actors, 1 learner, 1 store in "
              f"{time.perf_counter() - t0:.0f} s")
        cells = {}
        for n in samplers:
            for r in rewards:
                cells[(n, r)] = run_cell(pools, n, r, args, costs)
        summary = print_tables(cells, samplers, rewards)
    finally:
        ray.shutdown()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cells": [asdict(c) for c in cells.values()], "summary": summary,
                                                   "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
