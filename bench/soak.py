"""Soak: many iterations on Ray with 2 samplers; is memory flat?

Runs the driver's own `iteration()` (sample -> score -> advantages -> update -> publish, MLflow
logging and a checkpoint every 10 iterations, as `driver.run` does) and samples, after a warm-up
and at the end:
  * object store: bytes used and objects held in plasma (the raylet's store stats, the numbers
    `ray memory --stats-only` prints);
  * ObjectRefs the driver holds (its core worker's reference table: a leaked ref shows here even
    when the object is small enough to live in the driver's in-process store, not in plasma);
  * RSS and USS of the driver and of every Ray process it started or uses (samplers, reward
    actor, Ray Train worker, weight store, queues, raylet, GCS), matched by pid.

Flat means, between the sample after warm-up and the last one:
  object store floor +<= 4 MiB (the minimum over the first vs the second half of the samples,
  since a sample catches whatever is in flight), driver ObjectRefs +<= 4, each process's
  USS +<= max(64 MiB, 10 %).

    python bench/soak.py --iterations 200                # tiny random SD3 pipeline
    python bench/soak.py --iterations 200 --miniature    # the shipped miniature (if built)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 ** 2
STORE_BOUND, REFS_BOUND, USS_BOUND_MIB, USS_BOUND_FRAC = 4 * MIB, 4, 64, 0.10


def soak_config(out_dir: str, pipeline: str | None, iterations: int):
    from treegrpo_ray.config import load_config
    if pipeline is None:  # the shipped miniature world: its own prompts and reward
        model = ["model.pretrained=miniature", "prompts=miniature", "rewards.terms.0.name=miniature"]
    else:
        model = [f"model.pretrained={pipeline}", "prompts=configs/prompts/example_prompts.txt",
                 "rewards.terms.0.name=jpeg_compressibility"]
    # 4 prompts over 2 samplers x 2**2 leaves = 16 leaves per iteration, 4 x 3 = 12 decisions
    return load_config(ROOT / "configs/smoke.yaml", [
        *model, f"iterations={iterations}", "prompts_per_iteration=4", "pools.samplers=2", "pools.rewards=1",
        "checkpoint.every=10", "checkpoint.keep=2", f"tracking.output_dir={out_dir}", "tracking.run_name=soak",
        "tracking.progress=false"])


ACTORS = ("SamplerActor", "RewardActor", "RayTrainWorker", "WeightStore", "_QueueActor")


def ray_processes() -> dict[int, str]:
    """pid -> role of every process of the Ray instance this driver uses: the instance was started
    by this process (connect() or the test fixture), so they are all its descendants."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith("ray::"):
            out[p.pid] = cmd[0][5:].split(".")[0]          # ray::SamplerActor.sample -> SamplerActor
        elif cmd:
            script = next((c for c in cmd[1:] if c.endswith(".py")), cmd[0])
            out[p.pid] = Path(script).name
    return out


def store_stats() -> tuple[int, int]:
    """(plasma bytes used, plasma objects) on this node."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used), int(reply.store_stats.num_local_objects)


def sample(it: int, roles: dict[int, str]) -> dict:
    import ray
    used, objects = store_stats()
    refs = len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())
    procs = {}
    for pid, role in {os.getpid(): "driver", **roles}.items():
        try:
            mem = psutil.Process(pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        procs[str(pid)] = {"role": role, "rss": mem.rss, "uss": mem.uss}
    return {"iteration": it, "store_bytes": used, "store_objects": objects, "driver_refs": refs, "procs": procs}


def verdict(before: dict, after: dict) -> tuple[bool, list[str]]:
    """Flat? and one line per measured quantity."""
    lines, ok = [], True
    d_store = after["store_bytes"] - before["store_bytes"]
    d_refs = after["driver_refs"] - before["driver_refs"]
    ok &= d_store <= STORE_BOUND and d_refs <= REFS_BOUND
    lines.append(f"object store  {before['store_bytes'] / MIB:8.2f} -> {after['store_bytes'] / MIB:8.2f} MiB "
                 f"({before['store_objects']} -> {after['store_objects']} objects)   "
                 f"bound +{STORE_BOUND / MIB:.0f} MiB")
    lines.append(f"driver refs   {before['driver_refs']:8d} -> {after['driver_refs']:8d}   bound +{REFS_BOUND}")
    for pid, b in sorted(before["procs"].items(), key=lambda kv: kv[1]["role"]):
        a = after["procs"].get(pid)
        if a is None:  # idle workers come and go; an actor must not
            lines.append(f"{b['role']:<22} pid {pid}: gone")
            ok &= b["role"] not in ACTORS
            continue
        bound = max(USS_BOUND_MIB * MIB, USS_BOUND_FRAC * b["uss"])
        flat = a["uss"] - b["uss"] <= bound
        ok &= flat
        lines.append(f"{b['role']:<22} RSS {b['rss'] / MIB:7.1f} -> {a['rss'] / MIB:7.1f} MiB | "
                     f"USS {b['uss'] / MIB:7.1f} "
                     f"-> {a['uss'] / MIB:7.1f} MiB (bound +{bound / MIB:.0f}){'' if flat else '  <-- GROWS'}")
    return ok, lines


def baseline_and_end(samples: list[dict], warmup: int) -> tuple[dict, dict]:
    """The first post-warm-up sample and the last one, with the object store's bytes replaced by
    its floor (minimum) over the first and second half of the samples: a sample catches 0 to 3
    in-flight weight versions or batches (miniature weights: 7.6 MiB each), a leak raises the floor."""
    kept = [s for s in samples if s["iteration"] >= warmup]
    half = max(1, len(kept) // 2)
    first, second = kept[:half], kept[half:] or kept[-1:]
    return ({**kept[0], "store_bytes": min(s["store_bytes"] for s in first)},
            {**kept[-1], "store_bytes": min(s["store_bytes"] for s in second)})


def soak(cfg, *, warmup: int = 10, every: int = 10, out=sys.stdout) -> dict:
    """Run cfg.iterations iterations on Ray; returns {"samples": [...], "flat": bool, "report": [...]}."""
    from treegrpo_ray import builders, driver
    from treegrpo_ray.actors.ray_system import RaySystem
    from treegrpo_ray.tracking import Tracker, tracking_uri
    builders.preflight(cfg)
    uri = tracking_uri(cfg.tracking.mlflow_uri, Path(cfg.tracking.output_dir))
    tracker = Tracker(uri, cfg.tracking.experiment, "soak")
    prompts = builders.load_prompts(cfg)
    system = RaySystem(cfg)
    samples, t0, status = [], time.perf_counter(), "FAILED"
    try:
        roles = ray_processes()
        handle = system.launch(driver.requests_for(cfg, prompts, 0))
        for it in range(cfg.iterations):
            handle, m = driver.iteration(cfg, system, handle, prompts, it)
            tracker.log(m, step=it + 1)
            if (it + 1) % cfg.checkpoint.every == 0:
                system.save(Path(cfg.tracking.output_dir) / "soak" / "checkpoints", it + 1,
                            {"next_iteration": it + 1, "version": system.version}, cfg.checkpoint.keep)
            if it + 1 == warmup or (it + 1) % every == 0 or it + 1 == cfg.iterations:
                samples.append(sample(it + 1, roles))
                s = samples[-1]
                print(f"iter {it + 1:4d} | {time.perf_counter() - t0:6.0f} s | store {s['store_bytes'] / MIB:6.2f} MiB "
                      f"{s['store_objects']:3d} objs | refs {s['driver_refs']:3d} | driver RSS "
                      f"{s['procs'][str(os.getpid())]['rss'] / MIB:6.0f} MiB", file=out, flush=True)
        flat, report = verdict(*baseline_and_end(samples, warmup))
        status = "FINISHED"
    finally:
        system.close()
        tracker.end(status)
    for line in report:
        print(line, file=out)
    print(f"{'FLAT' if flat else 'NOT FLAT'}: iterations {warmup} -> {samples[-1]['iteration']}, "
          f"{time.perf_counter() - t0:.0f} s", file=out)
    return {"samples": samples, "flat": flat, "report": report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="iterations before the baseline sample")
    p.add_argument("--every", type=int, default=10, help="sample every N iterations")
    p.add_argument("--pipeline", default=None, help="a diffusers SD3 pipeline dir (default: build a tiny random one)")
    p.add_argument("--miniature", action="store_true", help="use the shipped miniature pipeline, prompts and reward")
    p.add_argument("--json", default=None, help="write all samples and the verdict here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out_dir = tempfile.mkdtemp(prefix="treegrpo-soak-")
    pipeline = args.pipeline
    if not args.miniature and pipeline is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tools.tiny_pipelines import save_tiny_sd3
        pipeline = str(save_tiny_sd3(Path(out_dir) / "tiny_sd3", seed=0))
    result = soak(soak_config(out_dir, None if args.miniature else pipeline, args.iterations),
                  warmup=args.warmup, every=args.every)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
