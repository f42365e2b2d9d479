"""The default run on a 4-node loopback cluster against the same run on a 1-node one, in one session:
seconds per iteration (ratio) and the bytes that cross node boundaries against the design's formula.

    python -m bench.bench_cluster [--iterations 12] [key=value ...]

Both clusters are `treegrpo_ray.loopback` clusters (real raylets, token auth). The 1-node one is a
head carrying every slot; the 4-node one puts the sampler, reward and learner pools on nodes of their
own (the driver, weight store and learner queues on the head). Each run is the CLI with the pools
pinned, `eval_every=0` (evaluation moves images too) and one checkpoint at the end.

Bytes: each raylet's `ray_object_manager_bytes{Type="Received"}` (Prometheus, its metrics port),
summed over the nodes, before and after the run. What the design predicts, with the sizes the run
logged (perf/leaf_bytes, perf/tree_bytes) and W = the published state (the checkpoint's model file):
    per iteration: leaves (sampler -> reward node) + the rest of the trees (sampler -> learner node)
                   + W (learner -> the weight store on the head) + W (head -> the sampler node: its
                   samplers share one node's copy), and the weights' fingerprint F with the publish
                   and with every sampler call
    once: version 0's publish; the last version is never pulled.
Objects under Ray's inline limit (100 KiB) travel inside RPC replies, not through the object manager,
so the formula counts only objects at or above it; the run's own sizes say which those are.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pickle

import mlflow
from safetensors.torch import load_file

from treegrpo_ray.config import load_config
from treegrpo_ray.loopback import LoopbackCluster, NodeSpec, nodes_for, pin_overrides
from treegrpo_ray.models.fingerprint import fingerprint

INLINE = 100 * 1024  # Ray's max_direct_call_object_size


def received_bytes(cluster: LoopbackCluster) -> dict[str, float]:
    """Bytes each node's object manager has received from other nodes so far."""
    out = {}
    for name, proc in cluster.procs.items():
        port = _metrics_port(proc.args)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        out[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("ray_object_manager_bytes{") and 'Type="Received"' in line)
    return out


def _metrics_port(args: list[str]) -> int:
    return int(args[args.index("--metrics-export-port") + 1])


def run_on(cluster: LoopbackCluster, out: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "treegrpo_ray.run", *argv, f"tracking.output_dir={out}", "tracking.run_name=b",
           "eval_every=0", "checkpoint.every=0", f"ray_address={cluster.address}"]
    before = received_bytes(cluster)
    done = subprocess.run(cmd, env={**cluster.env, "MLFLOW_TRACKING_URI": ""}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    after = received_bytes(cluster)
    by_node = {n: after[n] - before.get(n, 0.0) for n in after}
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def series(key):
        return [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
    model_file = next((out / "b" / "checkpoints").glob("iter_*/model.safetensors"))
    fp = len(pickle.dumps(fingerprint(load_file(model_file)), protocol=5))  # travels beside the weights
    return {"iter_s": series("time/iter_s"), "leaf_bytes": series("perf/leaf_bytes"),
            "tree_bytes": series("perf/tree_bytes"), "weights_bytes": model_file.stat().st_size, "fingerprint_bytes": fp, "received": sum(by_node.values()), "by_node": by_node,
            "placement": re.search(r"placement: .*", done.stdout).group(0) if "placement:" in done.stdout else ""}


def predicted(r: dict, iterations: int, calls: int, sampler_nodes: int = 1) -> float:
    big = lambda b: b if b >= INLINE else 0.0  # noqa: E731
    leaves = sum(big(b) for b in r["leaf_bytes"])
    rest = sum(big(t - l) for t, l in zip(r["tree_bytes"], r["leaf_bytes"]))
    w, f = big(r["weights_bytes"]), big(r["fingerprint_bytes"])
    # publishes 0..N reach the head with their fingerprint; the sampler node pulls versions
    # 0..N-1 once, and every sampler call carries the fingerprint
    return leaves + rest + (iterations + 1) * (w + f) + iterations * (sampler_nodes * w + calls * f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--config", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    argv = [*(["--config", args.config] if args.config else []), *args.overrides, *pin_overrides(cfg),
            f"iterations={args.iterations}"]
    groups = nodes_for(cfg)
    results = {}
    with tempfile.TemporaryDirectory(prefix="trg-bench-") as tmp:
        head_cpus = 1 + sum(g.num_cpus for g in groups)
        slots = {k: v for g in groups for k, v in g.resources.items()}
        for name, nodes, kw in (("1 node", [], {"head_cpus": head_cpus}), ("4 nodes", groups, {})):
            cluster = LoopbackCluster(nodes, root=Path(tmp) / name.replace(" ", ""), **kw)
            if not nodes:  # the 1-node cluster: a head with every slot
                cluster.head = NodeSpec("head", head_cpus, slots)
            with cluster:
                results[name] = run_on(cluster, Path(tmp) / f"out-{name.replace(' ', '')}", argv)
    a, b = results["1 node"], results["4 nodes"]
    med = {k: statistics.median(v["iter_s"][2:]) for k, v in results.items()}  # 2 warm-up iterations left out
    pred = predicted(b, args.iterations, calls=cfg.pools.samplers * cfg.pools.sampler_calls)
    print(json.dumps({k: {"median_iter_s": med[k], "received_bytes": v["received"], "received_by_node": v["by_node"],
                          "placement": v["placement"]}
                      for k, v in results.items()}, indent=2))
    print(f"seconds per iteration: 4 nodes / 1 node = {med['4 nodes'] / med['1 node']:.3f} "
          f"({med['4 nodes']:.3f} s vs {med['1 node']:.3f} s, medians of iterations 3-{args.iterations})")
    print(f"bytes across nodes: measured {b['received'] / 1e6:.2f} MB, the design's formula {pred / 1e6:.2f} MB "
          f"(ratio {b['received'] / max(pred, 1):.3f}); per iteration: leaves {statistics.mean(b['leaf_bytes']) / 1e3:.1f} kB, "
          f"rest of the trees {statistics.mean(t - l for t, l in zip(b['tree_bytes'], b['leaf_bytes'])) / 1e3:.1f} kB, "
          f"weights {b['weights_bytes'] / 1e6:.2f} MB + fingerprint {b['fingerprint_bytes'] / 1e3:.0f} kB per version; 1-node cluster: {a['received'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
