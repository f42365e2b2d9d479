"""Weight sync of a full fine-tune, before and after the bucketed path (issue 34, item 3).

One publish of a float32 state of S GB followed by N samplers loading it, timed as one wall
(publish done -> every sampler's weights in place), for S in 0.1, 0.5, 1, 2 and N in 1..3:

  store    the path before: the learner's rank 0 made a whole CPU copy (`state_for_broadcast`),
           packed it and sent it to the WeightStore as an argument (one object-store copy), the
           store `ray.put` it again (a second); each sampler got it whole and copied it in.
  buckets  the path now (`weight_store.publish` / `buckets`): rank 0 puts the live tensors in
           buckets of 256 MiB (one object-store copy, no CPU copy first), the store keeps refs;
           samplers map one bucket at a time and copy it into their parameters.

Baseline, same machine and run: `copy_` of the whole state into preallocated tensors (a memcpy),
in one process. Ratio = sync wall / (2 memcpys) -- the issue's target for 1 GB to 2 samplers is
<= 1.5. Memory: each process samples its own memory (RssAnon: object-store pages are shared memory, excluded)
every 5 ms during the sync; "extra copies" = the largest growth in any process / S.

--nodes 1: one Ray instance (publisher, store and samplers share one object store).
--nodes 3: a loopback cluster (treegrpo_ray.loopback): the store on the head, the publisher on
a "learner" node, the samplers on a "sampler" node (each node its own raylet and object store,
so every byte crosses between object stores over TCP on loopback).

    PYTHONPATH=. python bench/bench_sync_paths.py --nodes 1
    PYTHONPATH=. python bench/bench_sync_paths.py --nodes 3 --sizes 0.1,0.5,1 --samplers 1,2
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

GB = 1e9
TENSOR = 16 * 2 ** 20  # bytes per synthetic tensor (SD3.5-medium's largest are ~13-50 MB)


def make_state(gb: float) -> dict[str, torch.Tensor]:
    n = max(1, int(gb * GB) // TENSOR)
    return {f"block{i}.weight": torch.full((TENSOR // 4,), float(i)) for i in range(n)}


def rss_anon() -> int:
    """This process's resident anonymous memory (its own heap; object-store pages are shared
    memory, RssShmem, and not counted)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakUSS:
    """Largest growth of this process's own (anonymous) memory while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss_anon()
        self.stop = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def grown(self) -> int:
        return self.peak - self.base


class OldStore:
    """The WeightStore before the bucketed path: it re-put what it was sent."""

    def __init__(self):
        self.version, self.ref = -1, None

    def publish(self, version, state, fp=None):
        import ray
        self.version, self.ref = version, ray.put(state)  # the second object-store copy
        return version

    def latest(self, have=-1):
        return None if self.ref is None else (self.version, [self.ref], None)


class Publisher:
    def __init__(self, gb: float):
        torch.set_num_threads(1)
        self.state = make_state(gb)

    def publish(self, store, version: int, path: str) -> int:
        import ray

        from treegrpo_ray.actors.weight_store import pack_state, publish
        with PeakUSS() as m:
            if path == "store":
                whole = {k: v.to("cpu", copy=True).contiguous() for k, v in self.state.items()}
                ray.get(store.publish.remote(version, pack_state(whole), None))
                del whole
            else:
                publish(store, version, self.state.items())
        return m.grown


class Sampler:
    def __init__(self, gb: float):
        torch.set_num_threads(1)
        self.target = {k: torch.empty_like(v) for k, v in make_state(gb).items()}

    def load(self, store) -> int:
        import ray

        from treegrpo_ray.actors.weight_store import buckets
        with PeakUSS() as m:
            _, refs, _ = ray.get(store.latest.remote(-1))
            for part in buckets(refs):  # the old store's one ref holds the whole packed state
                for k, v in part.items():
                    self.target[k].copy_(v)
        return m.grown


def memcpy_s(gb: float, reps: int = 5) -> float:
    """The fastest of `reps` copies of the state into preallocated tensors (after one that faults
    the pages in): this machine's memcpy, the baseline the ratios divide by."""
    src = make_state(gb)
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    for k, t in dst.items():
        t.copy_(src[k])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, t in dst.items():
            t.copy_(src[k])
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(ray, opts: dict, gb: float, samplers: int, path: str, reps: int) -> dict:
    from treegrpo_ray.actors.weight_store import WeightStore
    store_cls = ray.remote(num_cpus=0)(OldStore) if path == "store" else WeightStore
    store = store_cls.options(**opts["store"]).remote()
    pub = ray.remote(Publisher).options(num_cpus=0, **opts["learner"]).remote(gb)
    subs = [ray.remote(Sampler).options(num_cpus=0, **opts["sampler"]).remote(gb) for _ in range(samplers)]
    ray.get(pub.publish.remote(store, 0, path))  # warm-up: object-store pages touched, actors up
    ray.get([s.load.remote(store) for s in subs])
    walls, pubs, grown = [], [], []
    for v in range(1, reps + 1):
        t0 = time.perf_counter()
        g_pub = ray.get(pub.publish.remote(store, v, path))
        t1 = time.perf_counter()
        g_subs = ray.get([s.load.remote(store) for s in subs])
        walls.append(time.perf_counter() - t0)
        pubs.append(t1 - t0)
        grown.append(max([g_pub, *g_subs]))
    for a in [pub, *subs, store]:
        ray.kill(a)
    return {"wall_s": statistics.median(walls), "publish_s": statistics.median(pubs),
            "extra_copies": max(grown) / (gb * GB)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    ap.add_argument("--sizes", default="0.1,0.5,1,2")
    ap.add_argument("--samplers", default="1,2,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--address", default="", help=argparse.SUPPRESS)  # the --nodes 3 driver, started by this script
    ap.add_argument("--preallocate", action="store_true",
                    help="RAY_preallocate_plasma_memory=1: the object store's pages are touched once at start, so a "
                         "put does not page-fault (deploy/ sets it)")
    args = ap.parse_args()
    if args.preallocate:
        os.environ["RAY_preallocate_plasma_memory"] = "1"  # read by the raylets this process starts
    sizes, counts = [float(s) for s in args.sizes.split(",")], [int(n) for n in args.samplers.split(",")]
    torch.set_num_threads(1)  # the baseline memcpy on one thread, as each actor copies
    if args.nodes == 3 and not args.address:  # start the cluster, then measure from a driver that has its env
        import subprocess
        import sys

        from treegrpo_ray.loopback import LoopbackCluster, NodeSpec
        store_bytes = int((3 * max(sizes) + 0.5) * GB)
        cluster = LoopbackCluster([NodeSpec("learner", 1, {"learner_slot": 10}, store_bytes),
                                   NodeSpec("sampler", 1, {"sampler_slot": 10}, store_bytes)], private_home=True)
        if args.preallocate:
            cluster.env["RAY_preallocate_plasma_memory"] = "1"
        with cluster:
            sys.exit(subprocess.run([sys.executable, *sys.argv, "--address", cluster.address], env=cluster.env).returncode)
    import ray
    env = {"env_vars": {"PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}}
    if args.nodes == 1:
        ray.init(num_cpus=2, object_store_memory=int((3 * max(sizes) + 0.5) * GB), include_dashboard=False,
                 runtime_env=env, log_to_driver=False)
        opts = {"store": {}, "learner": {}, "sampler": {}}
    else:
        ray.init(address=args.address, runtime_env=env, log_to_driver=False)
        from treegrpo_ray.actors.pools import on_driver_node
        opts = {"store": on_driver_node(), "learner": {"resources": {"learner_slot": 1}},
                "sampler": {"resources": {"sampler_slot": 1}}}
    try:
        print(f"{'nodes':>5} {'GB':>4} {'N':>2} {'memcpy s':>8} {'store s':>8} {'(publish)':>9} {'buckets s':>9} "
              f"{'(publish)':>9} {'store/2cpy':>10} {'bkt/2cpy':>8} {'store xcopies':>13} {'bkt xcopies':>11}",
              flush=True)
        for gb in sizes:
            base = memcpy_s(gb)
            for n in counts:
                old = measure(ray, opts, gb, n, "store", args.reps)
                new = measure(ray, opts, gb, n, "buckets", args.reps)
                print(f"{args.nodes:>5} {gb:>4g} {n:>2} {base:>8.3f} {old['wall_s']:>8.3f} {old['publish_s']:>9.3f} "
                      f"{new['wall_s']:>9.3f} {new['publish_s']:>9.3f} "
                      f"{old['wall_s'] / (2 * base):>10.2f} {new['wall_s'] / (2 * base):>8.2f} "
                      f"{old['extra_copies']:>13.2f} {new['extra_copies']:>11.2f}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
