"""Does staleness 1 learn as well per image as staleness 0? (issue 14 item 4)

    PYTHONPATH=. python bench/bench_staleness.py [--iterations 16] [--seeds 0 1 2]

The learning test's method (tests/test_learning.py): the embedded default in-process (mode=local),
ITERATIONS iterations per seed, evaluated by the driver (ODE at the fixed eval seed, 16 training
prompts x 4 images, and the held-out split), for max_staleness 0 and 1 (decoupled objective) with
the same seeds. In-process the stages cannot overlap, so this measures learning per image only;
the time saved by overlap needs the Ray system (samplers and learner on their own workers).
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import torch

from treegrpo_ray.config import load_config
from treegrpo_ray.driver import run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for lag in args.staleness:
                cfg = load_config(None, ["mode=local", f"seed={seed}", f"iterations={args.iterations}",
                                         f"eval_every={args.iterations}", "eval_images_per_prompt=4",
                                         f"max_staleness={lag}", "checkpoint.every=0", "tracking.progress=false",
                                         "tracking.sample_grid_every=0", f"tracking.output_dir={tmp}",
                                         f"tracking.run_name=s{seed}-lag{lag}"])
                start = time.perf_counter()
                s = run(cfg, out=io.StringIO())
                gain = s["eval_rewards"][-1] - s["eval_rewards"][0]
                held = s["eval_held_out_rewards"][-1] - s["eval_held_out_rewards"][0]
                results.setdefault(lag, []).append((gain, held))
                print(f"staleness {lag} seed {seed}: eval {s['eval_rewards'][0]:.3f} -> {s['eval_rewards'][-1]:.3f} "
                      f"({gain:+.3f}), held-out {held:+.3f}, {time.perf_counter() - start:.0f} s", flush=True)
    for lag, rows in results.items():
        gains = [g for g, _ in rows]
        sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        print(f"staleness {lag}: eval gain mean {statistics.mean(gains):+.3f} sd {sd:.3f} over {len(gains)} seeds; "
              f"held-out mean {statistics.mean(h for _, h in rows):+.3f}")


if __name__ == "__main__":
    main()
