"""Entry point: `python -m treegrpo_ray.run [--config configs/X.yaml] [--plan] [key=value ...]`.

With no arguments it trains the embedded miniature default on this machine (a local Ray
instance is started unless $RAY_ADDRESS / ray_address names a cluster, or under `ray job submit`).
The config is loaded and validated, and files are checked, before Ray or any model starts."""
from __future__ import annotations

import argparse
import json
import sys

from treegrpo_ray.config import ConfigError, describe, load_config, to_dict


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m treegrpo_ray.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="TreeGRPO RL post-training on Ray. Overrides are dotted key=value pairs.",
        epilog="config fields (key = default  -- doc):\n  " + "\n  ".join(describe()))
    p.add_argument("--config", default=None, help="YAML file with overrides of the defaults (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--plan", action="store_true",
                   help="print per pool the parameters, memory per GPU and work per iteration, without loading "
                        "weights or starting Ray; exit 2 if a pool does not fit its GPU share")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory the plan checks against (default 80)")
    p.add_argument("--summary-json", default=None, help="write the run summary (rewards, run dir) to this file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tree.k=2 pools.samplers=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.plan:
            from treegrpo_ray import plan
            layout = plan.make_plan(cfg, gpu_gib=args.gpu_gib)
            print(plan.render(layout))
            plan.check(layout)
            return 0
        from treegrpo_ray.driver import run
        from treegrpo_ray.run_end import result_lines
        from treegrpo_ray.preemption import Preempted
        try:
            summary = run(cfg)
        except Preempted as stop:  # the driver wrote a checkpoint and said so
            return stop.exit_code
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    evals = summary["eval_rewards"]
    shown = (f"eval reward {evals[0]:.3f} -> {evals[-1]:.3f}" if len(evals) > 1 else
             f"eval reward {evals[0]:.3f} (evaluated once)" if evals else "not evaluated (eval_every=0)")
    watched = "".join(f" | {m} (not trained on) {v[0]:.3f} -> {v[-1]:.3f}"
                      for m, v in summary.get("not_trained_on", {}).items() if len(v) > 1)
    print(f"done: {shown}{watched} over {summary['iterations']} iterations | outputs in {summary['run_dir']}")
    for line in result_lines(cfg, summary):
        print(line)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
