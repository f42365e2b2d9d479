"""Does a setting learn better than another, per image, on the training AND the held-out prompts?

    PYTHONPATH=. python bench/bench_learning.py --arm base= --arm kl=learner.kl_beta=0.04 \
        [--iterations 16] [--seeds 0 1 2] [--jobs 2] [--out bench/learning.jsonl] [--set key=value ...]
    PYTHONPATH=. python bench/bench_learning.py --report bench/learning.jsonl

The learning test's method (tests/test_learning.py): the embedded default in-process (mode=local)
plus `--set` overrides and each arm's own (comma-separated key=value), ITERATIONS iterations per
seed, evaluated by the driver (ODE at the fixed eval seed: the 16 training prompts x 4 images, and
the 24 held-out prompts the run never trains on). Every (arm, seed) run appends one JSON line to
--out, and runs already there are skipped, so a long comparison resumes where it stopped. The
report pairs arms by seed against the first arm: mean gain, sd over seeds, and the paired
difference with its standard error.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


def one_run(arm: str, overrides: list[str], seed: int, iterations: int) -> dict:
    import torch

    from treegrpo_ray.config import load_config
    from treegrpo_ray.driver import run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["mode=local", f"seed={seed}", f"iterations={iterations}", f"eval_every={iterations}",
                                 "eval_images_per_prompt=4", "checkpoint.every=0", "tracking.progress=false",
                                 "tracking.sample_grid_every=0", f"tracking.output_dir={tmp}", "tracking.run_name=r",
                                 *overrides])
        start = time.perf_counter()
        s = run(cfg, out=io.StringIO())
    return {"arm": arm, "overrides": overrides, "seed": seed, "iterations": iterations,
            "eval": [s["eval_rewards"][0], s["eval_rewards"][-1]],
            "held_out": [s["eval_held_out_rewards"][0], s["eval_held_out_rewards"][-1]],
            "seconds": round(time.perf_counter() - start, 1)}


def parse_arm(text: str, common: list[str]) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--arm {text!r}: use NAME=key=value,key=value (or NAME= for the default)")
    return name, common + [kv for kv in rest.split(",") if kv]


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def _se(xs: list[float]) -> float:
    return _sd(xs) / len(xs) ** 0.5


def report(rows: list[dict]) -> None:
    for n in sorted({r["iterations"] for r in rows}):
        print(f"{n} iterations:")
        report_one([r for r in rows if r["iterations"] == n])


def report_one(rows: list[dict]) -> None:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by = {(r["arm"], r["seed"]): r for r in rows}
    gain = {key: (r["eval"][1] - r["eval"][0], r["held_out"][1] - r["held_out"][0]) for key, r in by.items()}
    base = arms[0]
    print(f"{'arm':<14} {'seeds':>5} {'train gain (sd)':>17} {'held-out gain (sd)':>19} {'min held':>9} "
          f"{'paired train vs ' + base:>24} {'paired held-out':>17}")
    for arm in arms:
        seeds = sorted(s for a, s in gain if a == arm)
        tr, ho = [gain[arm, s][0] for s in seeds], [gain[arm, s][1] for s in seeds]
        paired = [s for s in seeds if (base, s) in gain]
        dt = [gain[arm, s][0] - gain[base, s][0] for s in paired]
        dh = [gain[arm, s][1] - gain[base, s][1] for s in paired]
        print(f"{arm:<14} {len(seeds):>5} {statistics.mean(tr):>+9.3f} ({_sd(tr):.3f}) {statistics.mean(ho):>+11.3f} "
              f"({_sd(ho):.3f}) {min(ho):>+9.3f} {statistics.mean(dt):>+14.3f} +- {_se(dt):.3f} "
              f"{statistics.mean(dh):>+9.3f} +- {_se(dh):.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", default=[], help="NAME=key=value,key=value (NAME= : the default)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides common to every arm")
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each)")
    ap.add_argument("--out", default="bench/learning.jsonl")
    ap.add_argument("--report", help="only print the report of this JSONL file")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report([json.loads(line) for line in f if line.strip()])
        return
    if not args.arm:
        raise SystemExit("give at least one --arm")
    arms = [parse_arm(a, list(args.set)) for a in args.arm]
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["arm"], r["seed"], r["iterations"]) for r in map(json.loads, filter(str.strip, f))}
    todo = [(name, ov, seed) for seed in args.seeds for name, ov in arms if (name, seed, args.iterations) not in done]
    print(f"{len(todo)} runs to do ({len(done)} already in {args.out})", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one_run, name, ov, seed, args.iterations) for name, ov, seed in todo]
        for fut in futures:
            row = fut.result()
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['arm']} seed {row['seed']}: eval {row['eval'][0]:.3f} -> {row['eval'][1]:.3f}, held-out "
                  f"{row['held_out'][0]:.3f} -> {row['held_out'][1]:.3f}, {row['seconds']:.0f} s", flush=True)
    with open(args.out) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if r["iterations"] == args.iterations
                and r["arm"] in {name for name, _ in arms}]
    report(rows)


if __name__ == "__main__":
    main()
