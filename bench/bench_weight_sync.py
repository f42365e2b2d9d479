"""Weight sync through the WeightStore as it was until issue 34 (it re-put every version; today's
bucketed path: bench/bench_sync_paths.py, BENCHMARKS.md §15) (issue 8, item 4): publish a state once, fetch it in 1, 2
and 4 concurrent actors the way SamplerActor does, and compare with an in-process `clone()` of
the same bytes (the memory-bandwidth limit of this machine).

States: `mini-lora` (rank-32 LoRA on the miniature SD3 transformer's to_q/k/v/out, made with the
project's own `models.lora.add_lora`), `mini-full` (the miniature transformer: the shipped one when
treegrpo_ray/assets/miniature exists, else a random one of the same architecture), `sd35m-lora`
(the shapes of a rank-32 LoRA on SD3.5-medium's 24 joint blocks, hidden 1536, 4 targets; dual
attention blocks not counted), `1gb` (256 float32 tensors of 4 MiB).

publish = learner -> `store.publish` -> store re-puts (the real path: the store must own the
object). fetch = `store.latest` + `ray.get(ref)` + copy into the actor's own tensors
(`DiffusionPolicy.load_broadcast_state` does `t.copy_(state[k])`). Ray copies torch tensors when
it deserialises them unless RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 (then `get` maps the object
store and the copy into the model is the only one); the env var must be set before Ray starts,
so each mode runs in its own child process.

    PYTHONPATH=. python bench/bench_weight_sync.py            # both modes, all states, 1/2/4 fetchers
    PYTHONPATH=. python bench/bench_weight_sync.py --quick    # one 38 MB state, 1 and 2 fetchers, zero-copy
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from treegrpo_ray.miniature import PIPELINE_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (the miniature's build tooling) is in the checkout

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = Path(PIPELINE_DIR) / "transformer"
GB = 1e9


def miniature_states() -> dict[str, dict[str, torch.Tensor]]:
    """{"mini-full": transformer state, "mini-lora": rank-32 LoRA tensors}, float32, CPU."""
    from diffusers import SD3Transformer2DModel

    from treegrpo_ray.models.lora import add_lora
    from tools.miniature.components import build_transformer

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_pretrained(SHIPPED) if SHIPPED.exists() else build_transformer()
    full = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    names = add_lora(model, rank=32, alpha=None, targets=("to_q", "to_k", "to_v", "to_out.0"))
    params = dict(model.named_parameters())
    lora = {n: params[n].detach().contiguous().clone() for n in names}
    return {"mini-lora": lora, "mini-full": full}


def synthetic_states(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    if "sd35m-lora" in names:  # 24 blocks x 4 targets x (A (32, 1536) + B (1536, 32))
        out["sd35m-lora"] = {f"b{b}.{t}.lora_{ab}": torch.randn(32, 1536) if ab == "A" else torch.randn(1536, 32)
                             for b in range(24) for t in ("q", "k", "v", "o") for ab in ("A", "B")}
    if "1gb" in names:
        out["1gb"] = {f"t{i}": torch.ones(1024 * 1024) for i in range(256)}  # 256 x 4 MiB = 1 GiB
    return out


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def baseline_s(state: dict[str, torch.Tensor], reps: int) -> tuple[float, float]:
    """Median seconds, in-process and one thread (like one Ray get), of (a) `clone()` of every
    tensor (allocates: page faults included) and (b) `copy_()` into tensors allocated beforehand
    (what loading into a live model costs: the pure memcpy)."""
    target = {k: torch.empty_like(v) for k, v in state.items()}
    clone, copy = [], []
    for _ in range(max(reps, 5)):
        t0 = time.perf_counter()
        fresh = {k: v.clone() for k, v in state.items()}
        t1 = time.perf_counter()
        for k, t in target.items():
            t.copy_(state[k])
        t2 = time.perf_counter()
        clone.append(t1 - t0)
        copy.append(t2 - t1)
        del fresh
    return statistics.median(clone), statistics.median(copy)


class Fetcher:
    """Does what SamplerActor._pull + load_broadcast_state do, timing each part. The first call
    allocates the actor's own tensors (a sampler's model exists before any sync): the driver
    discards it as a warm-up."""

    def __init__(self):
        torch.set_num_threads(1)
        self.target: dict[str, torch.Tensor] | None = None

    def fetch(self, store) -> dict[str, float]:
        import ray

        t0 = time.perf_counter()
        _, (ref,), _ = ray.get(store.latest.remote(-1))
        t1 = time.perf_counter()
        state = ray.get(ref)
        t2 = time.perf_counter()
        if self.target is None:
            self.target = {k: torch.empty_like(v) for k, v in state.items()}
        t3 = time.perf_counter()
        for k, t in self.target.items():
            t.copy_(state[k])
        t4 = time.perf_counter()
        del state
        return {"latest_s": t1 - t0, "get_s": t2 - t1, "load_s": t4 - t3, "total_s": t4 - t0 - (t3 - t2)}

    def release(self) -> None:
        self.target = None


def build_states(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    states = miniature_states() if {"mini-lora", "mini-full"} & set(names) else {}
    states.update(synthetic_states(names))
    return {n: states[n] for n in names}


def measure_state(ray, store, actors: list, name: str, state: dict, fetchers: list[int], reps: int) -> list[dict]:
    """Steady state: one untimed publish first (object-store pages touched, store worker warm)."""
    size = nbytes(state)
    clone, memcpy = baseline_s(state, reps)
    version = ray.get(store.current_version.remote()) + 1
    ray.get(store.publish.remote(version, state))
    publish = []
    for v in range(version + 1, version + 1 + reps):
        t0 = time.perf_counter()
        ray.get(store.publish.remote(v, state))
        publish.append(time.perf_counter() - t0)
    rows = []
    for n in fetchers:
        ray.get([a.fetch.remote(store) for a in actors[:n]])  # warm-up: allocates each actor's tensors
        per_fetch, walls = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            results = ray.get([a.fetch.remote(store) for a in actors[:n]])
            walls.append(time.perf_counter() - t0)
            per_fetch += results
        med = {k: statistics.median(r[k] for r in per_fetch) for k in per_fetch[0]}
        wall = statistics.median(walls)
        rows.append({"state": name, "bytes": size, "fetchers": n, "clone_s": clone, "copy_s": memcpy,
                     "publish_s": statistics.median(publish), **med, "wall_s": wall,
                     "fetch_gbps": size / med["total_s"] / GB, "agg_gbps": n * size / wall / GB,
                     "clone_gbps": size / clone / GB, "fetch_over_clone": med["total_s"] / clone,
                     "wall_over_clone": wall / clone, "publish_over_clone": statistics.median(publish) / clone})
    ray.get([a.release.remote() for a in actors])
    return rows


def run_mode(zero_copy: bool, names: list[str], fetchers: list[int], reps: int, store_gb: float) -> list[dict]:
    """One Ray instance with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS set (or not) everywhere."""
    os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = "1" if zero_copy else "0"
    import ray

    from bench.bench_sync_paths import OldStore  # the store this benchmark measured (it re-put; §15 has today's)

    torch.set_num_threads(1)
    # Ray warns on every zero-copy put that writers could corrupt the object; measured and
    # documented in BENCHMARKS.md (a received tensor written in place changes it for every reader).
    warnings.filterwarnings("ignore", message="Zero-copy tensor serialization")
    env = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"],
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=int(store_gb * 1024 ** 3), runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        actors = [ray.remote(Fetcher).options(num_cpus=0.01).remote() for _ in range(max(fetchers))]
        store = ray.remote(num_cpus=0)(OldStore).remote()  # the previous state's object is released by the next publish
        rows = []
        for name in names:  # one state alive at a time: the 1 GB one needs ~10 GB at its peak
            state = build_states([name])[name]
            for r in measure_state(ray, store, actors, name, state, fetchers, reps):
                rows.append({"zero_copy": zero_copy, **r})
                print_rows([rows[-1]], header=len(rows) == 1)
            del state
        return rows
    finally:
        ray.shutdown()


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'zc':>2} {'state':>10} {'MB':>8} {'N':>2} {'clone ms':>9} {'clone GB/s':>10} {'copy_ ms':>8} {'publish ms':>10} "
              f"{'fetch ms':>9} {'get ms':>8} {'load ms':>8} {'all-N ms':>9} {'fetch GB/s':>10} {'agg GB/s':>9} "
              f"{'fetch/clone':>11} {'allN/clone':>10} {'pub/clone':>9}", flush=True)
    for r in rows:
        print(f"{int(r['zero_copy']):>2} {r['state']:>10} {r['bytes'] / 1e6:>8.2f} {r['fetchers']:>2} "
              f"{r['clone_s'] * 1e3:>9.2f} {r['clone_gbps']:>10.2f} {r['copy_s'] * 1e3:>8.2f} {r['publish_s'] * 1e3:>10.1f} "
              f"{r['total_s'] * 1e3:>9.1f} {r['get_s'] * 1e3:>8.1f} {r['load_s'] * 1e3:>8.1f} {r['wall_s'] * 1e3:>9.1f} "
              f"{r['fetch_gbps']:>10.2f} {r['agg_gbps']:>9.2f} {r['fetch_over_clone']:>11.1f} "
              f"{r['wall_over_clone']:>10.1f} {r['publish_over_clone']:>9.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--states", default="mini-lora,mini-full,sd35m-lora,1gb", help="comma list of states")
    ap.add_argument("--fetchers", default="1,2,4", help="comma list of concurrent fetcher counts")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median reported)")
    ap.add_argument("--zero-copy", choices=("0", "1", "both"), default="both",
                    help="RAY_ENABLE_ZERO_COPY_TORCH_TENSORS; 'both' runs each in a child process")
    ap.add_argument("--object-store-gb", type=float, default=4.0, help="object store size (1 GB state: >= 3)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: the synthetic 38 MB LoRA state, 1 and 2 fetchers, 2 reps, "
                    "zero-copy only")
    ap.add_argument("--json-out", default="", help="write the rows here as JSON")
    args = ap.parse_args()
    if args.quick:
        args.states, args.fetchers, args.reps, args.object_store_gb = "sd35m-lora", "1,2", 2, 0.5
        args.zero_copy = "1"  # one Ray start: the mode the system should use
    names, fetchers = args.states.split(","), [int(n) for n in args.fetchers.split(",")]
    t0 = time.perf_counter()
    if args.zero_copy == "both":
        rows = []
        for mode in ("0", "1"):
            out = Path(args.json_out or "/tmp/weight_sync.json").with_suffix(f".zc{mode}.json")
            cmd = [sys.executable, __file__, "--states", args.states, "--fetchers", args.fetchers, "--reps",
                   str(args.reps), "--zero-copy", mode, "--object-store-gb", str(args.object_store_gb), "--json-out", str(out)]
            subprocess.run(cmd, check=True)
            rows += json.loads(out.read_text())
        print("\n== weight sync, both modes (ms = median; fetch = latest + get + copy into the actor's tensors) ==")
        print_rows(rows)
        print_verdict(rows)
    else:
        rows = run_mode(args.zero_copy == "1", names, fetchers, args.reps, args.object_store_gb)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s")


def print_verdict(rows: list[dict]) -> None:
    """Per state and fetcher count: the zero-copy speed-up of a fetch."""
    by = {(r["state"], r["fetchers"], r["zero_copy"]): r for r in rows}
    for (state, n, zc), r in by.items():
        other = by.get((state, n, True))
        if not zc and other:
            print(f"{state:>10} N={n}: fetch {r['total_s'] * 1e3:.1f} ms copy vs {other['total_s'] * 1e3:.1f} ms zero-copy "
                  f"({r['total_s'] / other['total_s']:.2f}x); all-N {r['wall_s'] * 1e3:.1f} vs {other['wall_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
