"""The default run on Ray, on-policy vs pipelined (issue 14 item 6, "for real"):

    PYTHONPATH=. python bench/bench_pipeline_ray.py [--out DIR] [--settings "max_staleness=0" "max_staleness=1"]

Each setting is one `python -m treegrpo_ray.run` through the real CLI (its own local Ray
instance), one after the other, with nothing else of ours running. Printed per setting from the
run's MLflow store: median seconds per iteration (iterations 2.., the first includes warm-up),
eval reward at iteration 0 and at the end (16 training prompts x eval_images_per_prompt and the 24
held-out prompts: the same images per setting, so the gain is per image), the pools' busy
fractions, and bytes through the driver against the trees' bytes (perf/driver_bytes,
perf/tree_bytes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow


def metrics(uri: str, run_name: str, keys: list[str]) -> dict[str, list[float]]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    run_id = runs[0].info.run_id
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench_pipeline_ray")
    ap.add_argument("--settings", nargs="+", default=["max_staleness=0", "max_staleness=1"])
    args = ap.parse_args()
    out = Path(args.out).resolve()
    keys = ["time/iter_s", "eval/reward", "eval_held_out/reward", "perf/sampler_busy", "perf/reward_busy",
            "perf/learner_busy", "perf/driver_bytes", "perf/tree_bytes", "perf/leaf_bytes", "staleness/max_lag"]
    rows = []
    for i, setting in enumerate(args.settings):
        name = f"setting{i}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "treegrpo_ray.run", f"tracking.output_dir={out}",
                        f"tracking.run_name={name}", *setting.split()], check=True, env=os.environ.copy(),
                       stdout=subprocess.DEVNULL)
        m = metrics(f"sqlite:///{out}/mlflow.db", name, keys)
        rows.append((setting, time.perf_counter() - t0, m))
    for setting, wall, m in rows:
        per_it = statistics.median(m["time/iter_s"][1:])
        print(f"{setting}: {wall:.0f} s in all, median {per_it:.2f} s/iteration over {len(m['time/iter_s'])}; "
              f"eval {m['eval/reward'][0]:.3f} -> {m['eval/reward'][-1]:.3f} "
              f"({m['eval/reward'][-1] - m['eval/reward'][0]:+.3f}), held-out {m['eval_held_out/reward'][0]:.3f} -> "
              f"{m['eval_held_out/reward'][-1]:.3f}; busy sampler {statistics.mean(m['perf/sampler_busy']):.0%} "
              f"reward {statistics.mean(m['perf/reward_busy']):.0%} learner {statistics.mean(m['perf/learner_busy']):.0%}; "
              f"max lag {max(m['staleness/max_lag']):.0f}")
        d, t = statistics.mean(m["perf/driver_bytes"]), statistics.mean(m["perf/tree_bytes"])
        before = 2 * (t - statistics.mean(m["perf/leaf_bytes"]))
        print(f"  driver {d / 1e3:.1f} kB/iteration vs trees {t / 1e6:.3f} MB/iteration: {d / t:.2%}; the old path "
              f"(ray.get of every batch, ray.put of the merge) moved >= {before / 1e6:.3f} MB = {before / t:.0%} of it")


if __name__ == "__main__":
    main()
