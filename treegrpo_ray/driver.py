"""The driver: TreeGRPO's outer loop, one short function per stage.

    for each iteration:
        requests  = plan(iteration)              # prompts, SDE window, noise seeds
        collected = system.collect(...)          # samplers grow trees; reward pool scores leaves
        kept      = drop stale trees             # version lag <= max_staleness (infos only: no latents here)
        leaf_adv  = combine_rewards(...)         # per-prompt normalised leaf advantages
        metrics   = system.update(...)           # learner fetches the trees, edge advantages + clipped GRPO
        log / evaluate / checkpoint

Every random choice is a function of (seed, iteration), so a resumed run replays exactly the
iterations the uninterrupted run would have. The system is either `LocalSystem` (one process)
or `RaySystem` (actors + Ray Train); the driver cannot tell them apart.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from treegrpo_ray import builders, preemption, report, storage
from treegrpo_ray.algo.advantages import RunningPromptStats
from treegrpo_ray.algo.seeds import iteration_seed, sampler_seed
from treegrpo_ray.algo.tree import choose_window, count_nfe, count_nfe_flat
from treegrpo_ray.checkpoint import STATE_FILE, latest_checkpoint, read_run_state
from treegrpo_ray.config import Config, ConfigError, flatten, groups_per_iteration, to_dict
from treegrpo_ray.diagnose import diagnose
from treegrpo_ray.drift import DriftWatch
from treegrpo_ray.algo.combine import combine_rewards
from treegrpo_ray.system import Collected, SampleRequest, System, concat_rewards
from treegrpo_ray.tracking import Tracker, artifact_location, tracking_uri
from treegrpo_ray.types import BatchInfo, merge_infos

EVAL_SEED = 1234


@dataclass
class RunPaths:
    """Locations: absolute paths or URIs (treegrpo_ray.storage)."""
    run_dir: str
    checkpoints: str
    resume_from: str | None
    run_state: dict


# ----------------------------------------------------------------------------- planning

def plan(cfg: Config, prompts: list[str], iteration: int) -> list[SampleRequest]:
    """Prompts, window and seeds of one iteration; a pure function of (seed, iteration)."""
    gen = torch.Generator().manual_seed(iteration_seed(cfg.seed, iteration))
    picked = [prompts[i] for i in torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_iteration].tolist()]
    while len(picked) < cfg.prompts_per_iteration:  # fewer prompts than asked for: cycle
        picked.append(prompts[len(picked) % len(prompts)])
    t = cfg.tree
    window = 0
    if t.variant != "flat":
        window = choose_window(t.num_steps, t.depth, t.window, generator=gen, iteration=iteration,
                               shift_every=t.shift_every, stride=t.window_stride,
                               max_start=None if t.max_window_start < 0 else t.max_window_start)
    calls = cfg.pools.samplers * cfg.pools.sampler_calls  # request i goes to sampler i // sampler_calls
    per = cfg.prompts_per_iteration // calls
    return [SampleRequest(picked[i * per:(i + 1) * per], window, sampler_seed(cfg.seed, iteration, i))
            for i in range(calls)]


def expected_nfe(cfg: Config, window: int) -> int:
    t, groups = cfg.tree, groups_per_iteration(cfg)
    if t.variant == "tree":
        return groups * count_nfe(t.num_steps, t.k, t.depth, window)
    return groups * count_nfe_flat(t.num_steps, t.leaves_per_tree)


# ----------------------------------------------------------------------------- stages

@dataclass
class Kept:
    """The batches an update trains on (system handles, in merge order) and the driver's view of
    their merge (`merge_infos`: leaf order and prompt indices as the learner will merge them)."""
    batches: list
    info: BatchInfo


def gather(cfg: Config, collected: Collected, learner_version: int):
    """Keep an iteration's batches grown by weights at most max_staleness versions old (older
    ones are dropped; those kept and stale are corrected by the learner: learner.stale_correction)."""
    lags = [learner_version - b.policy_version for b in collected.infos]
    keep = [i for i, lag in enumerate(lags) if lag <= cfg.max_staleness]
    m = {"staleness/dropped_batches": float(len(lags) - len(keep)), "staleness/max_lag": float(max(lags, default=0)),
         "reward/dropped_trees": float(collected.dropped_trees)}
    if not keep:
        return None, None, m
    kept = Kept([collected.batches[i] for i in keep], merge_infos([collected.infos[i] for i in keep]))
    raw = concat_rewards([collected.rewards[i] for i in keep])
    return kept, raw, m | {"staleness/mean_lag": sum(lags) / len(lags)}


def advantages(cfg: Config, batch, raw: dict[str, torch.Tensor], stats: RunningPromptStats | None = None):
    """batch: anything with the merged leaf_prompt (a BatchInfo or a TreeBatch); stats: DDPO's
    running per-prompt statistics (learner.adv_stats=running), updated here, else the group's."""
    normalize = None
    if stats is not None:
        def normalize(r, ids):
            return stats.normalize(r, [batch.prompts[i] for i in ids.tolist()])
    leaf_adv, metrics = combine_rewards(raw, builders.reward_weights(cfg), batch.leaf_prompt,
                                        mode=cfg.rewards.aggregate, eps=cfg.learner.adv_eps, clip=cfg.learner.adv_clip,
                                        std=cfg.learner.adv_std, normalize=normalize)
    dropped = metrics["reward/dropped"]  # leaves with a NaN/inf reward: advantage 0, counted here
    if dropped > cfg.rewards.max_nonfinite_fraction * leaf_adv.numel():
        raise RuntimeError(f"{int(dropped)} of {leaf_adv.numel()} leaves have non-finite rewards, more than "
                           f"rewards.max_nonfinite_fraction={cfg.rewards.max_nonfinite_fraction}; stopping before "
                           "any NaN reaches the weights. Check the reward models.")
    for name, r in raw.items():
        finite = r[torch.isfinite(r)]
        metrics[f"reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
    weights = builders.reward_weights(cfg)
    combined = sum(weights[n] * raw[n].float() for n in raw) / sum(weights.values())  # (L,)
    finite = combined[torch.isfinite(combined)]
    metrics["reward/combined"] = float(finite.mean()) if finite.numel() else float("nan")
    metrics["reward/dropped_leaves"] = dropped
    return leaf_adv, metrics


def eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(it: int, total: int, m: dict[str, float], left_s: float | None = None) -> str:
    ev = f" eval {m['eval/reward']:.3f} |" if "eval/reward" in m else ""
    if "eval_held_out/reward" in m:
        ev += f" held-out {m['eval_held_out/reward']:.3f} |"
    return (f"iter {it + 1:>4}/{total} | reward {m.get('reward/combined', float('nan')):.3f} |{ev} "
            f"loss {m.get('loss/total', float('nan')):+.1e} | clip {m.get('loss/clip_frac', 0):.2f} | "
            f"nfe {int(m.get('perf/nfe', 0))} | {m.get('time/iter_s', 0):.2f} s/it | lag {int(m.get('staleness/max_lag', 0))}"
            # how far the lag moved the step means, in noise stds: keep it near 0.05 or below (BENCHMARKS.md §10)
            + (f" (shift {m['staleness/shift_over_std']:.3f} std)" if "staleness/shift_over_std" in m else "")
            + (f" | dropped {int(m['reward/dropped_trees'])} trees" if m.get("reward/dropped_trees") else "")
            + (f" | eta {eta(left_s)}" if left_s is not None else ""))


def evaluate(cfg: Config, system, prompts: list[str], held_out: list[str]):
    """ODE samples at a fixed seed: `eval/*` on (training) `prompts`, what RL optimises, and
    `eval_held_out/*` on prompts it never trains on, which says whether the gain generalises; both
    also score the metrics the run does not train on (eval_metrics). -> (means, the grid's images,
    per-image "reward" and watched metrics on the training prompts, for drift.DriftWatch)."""
    weights = builders.reward_weights(cfg)
    out, images, per_image = {}, None, {}
    for prefix, ps in (("eval", prompts), ("eval_held_out", held_out)):
        if not ps:
            continue
        scores, imgs = system.evaluate(ps * cfg.eval_images_per_prompt, EVAL_SEED)  # row i: its own noise
        images = imgs if images is None else images
        combined = sum(weights[n] * scores[n].float() for n in weights) / sum(weights.values())
        out.update({f"{prefix}/{n}": float(s.float().nanmean()) for n, s in scores.items()})
        out[f"{prefix}/reward"] = float(combined.nanmean())
        if prefix == "eval":
            per_image = {"reward": combined, **{n: s for n, s in scores.items() if n not in weights}}
    return out, images, per_image


def _is_wan(export: str, name: str) -> bool:
    try:
        return json.loads(storage.read_bytes(storage.join(export, name, "config.json"))).get(
            "_class_name") == "WanTransformer3DModel"
    except (OSError, ValueError):
        return False


def keep_clips(tracker, run_dir: str, step: int, images) -> None:
    """A video run's eval clips (B, T, 3, H, W): the first few as GIFs in the run folder's samples/
    and in the MLflow run (samples/clips). Images runs have none."""
    if images is None or images.dim() != 5:
        return
    for location in report.save_clips(run_dir, step, images):
        tracker.log_bytes(storage.read_bytes(location), location.rsplit("/", 1)[-1], "samples/clips")


# ----------------------------------------------------------------------------- run setup

redact_uri = storage.redact


def redacted_config(cfg: Config) -> dict:
    """to_dict(cfg) with every value `flatten` redacts (secret-like keys, credentials in URIs) masked as it does."""
    shown, plain = flatten(cfg), flatten(cfg, redact=False)

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in node.items()}
        if isinstance(node, list) and node and isinstance(node[0], dict):
            return [walk(v, f"{prefix}{i}.") for i, v in enumerate(node)]
        key = prefix.rstrip(".")
        return shown[key] if shown.get(key) != plain.get(key) else node
    return walk(to_dict(cfg), "")


def logged_through(tracker) -> int:
    """Last step this MLflow run has metrics for. A killed job may have logged iterations past its
    last checkpoint; a resume replays them exactly (same seed) but does not log them twice."""
    history = tracker.mlflow.MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "time/iter_s")
    return max((m.step for m in history), default=0)


def resolve_paths(cfg: Config) -> RunPaths:
    """The run directory (under the already-resolved output_dir) and the checkpoint to resume
    from. resume='latest' must find one; 'auto' resumes if there is one and starts fresh if not."""
    root, resume, name = cfg.tracking.output_dir, cfg.checkpoint.resume, cfg.tracking.run_name
    if resume and resume not in ("latest", "auto"):
        ckpt = storage.resolve_output_dir(resume) if not storage.is_uri(resume) else resume
        try:
            state = read_run_state(ckpt)  # validates completeness before anything starts
        except FileNotFoundError:
            raise ConfigError(f"checkpoint.resume: {redact_uri(ckpt)} is not a checkpoint directory, or an incomplete "
                              "one (it needs model.safetensors and run_state.json); use 'latest', 'auto' or a path "
                              "like outputs/<run>/checkpoints/iter_000010") from None
        checkpoints = storage.parent(ckpt)
        return RunPaths(storage.parent(checkpoints), checkpoints, ckpt, state)
    if resume:
        run_dirs = [storage.join(root, name)] if name else storage.list_dirs(root)
        found = [c for c in (latest_checkpoint(storage.join(d, "checkpoints")) for d in run_dirs) if c is not None]
        if found:  # the newest run's newest checkpoint
            ckpt = max(found, key=lambda c: storage.mtime(storage.join(str(c), STATE_FILE)))
            checkpoints = storage.parent(str(ckpt))
            return RunPaths(storage.parent(checkpoints), checkpoints, str(ckpt), read_run_state(ckpt))
        if resume == "latest":
            where = storage.join(root, name, "checkpoints") if name else storage.join(root, "*", "checkpoints")
            raise ConfigError(f"checkpoint.resume=latest: no complete checkpoint under {redact_uri(where)}, so there "
                              "is nothing to resume (a fresh run would silently start over). Check tracking.output_dir "
                              "and tracking.run_name, or use checkpoint.resume=auto to resume when a checkpoint "
                              "exists and start fresh otherwise")
    if not name:
        name = unique_run_name(root, f"{cfg.tree.variant}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    run_dir = storage.join(root, name)
    return RunPaths(run_dir, storage.join(run_dir, "checkpoints"), None, {})


def unique_run_name(root: str, base: str) -> str:
    """A default run name no other run has: `base`, else `base-2`, `base-3`, ... Runs launched
    together (a sweep started by a shell loop) get the same start second; under a local output_dir
    the run folder is created here with an exclusive mkdir, so two runs cannot both take it. An
    object store has no exclusive create: there the first name whose folder does not exist yet."""
    for i in range(1, 10_000):
        name = base if i == 1 else f"{base}-{i}"
        path = storage.join(root, name)
        if storage.is_local(path):
            try:
                Path(path).mkdir(parents=True, exist_ok=False)
                return name
            except FileExistsError:
                continue
        elif not storage.exists(path):
            return name
    raise ConfigError(f"tracking.output_dir {redact_uri(root)} already holds runs {base} to {base}-9999: "
                      "set tracking.run_name")


def resolve_output(cfg: Config) -> Config:
    """cfg with tracking.output_dir made absolute (or a URI), what every actor receives."""
    root = storage.resolve_output_dir(cfg.tracking.output_dir)
    return replace(cfg, tracking=replace(cfg.tracking, output_dir=root))


def announce(cfg: Config, given_output_dir: str, paths: RunPaths, tracker, start: int, out) -> None:
    """The run's first line(s): where its outputs go, which MLflow run, fresh or resumed."""
    resumed = f"resuming at iteration {start} from {redact_uri(paths.resume_from)}" if start else "fresh run"
    print(f"treegrpo_ray: run dir {redact_uri(paths.run_dir)} | MLflow {redact_uri(tracker.uri)} run {tracker.run_id} | "
          f"{resumed} | mode {cfg.mode}", file=out, flush=True)
    given = given_output_dir
    if storage.under_ray_job() and not storage.is_uri(given) and not Path(given).expanduser().is_absolute():
        print(f"treegrpo_ray: under ray job submit; outputs go to {cfg.tracking.output_dir} on the head node "
              f"(a relative tracking.output_dir, here {given!r}, resolves against {storage.RAY_JOB_BASE}, not the "
              "job's temporary working dir; on a multi-node cluster give a shared path or an s3:// URI)",
              file=out, flush=True)


def build_system(cfg: Config, resume_from) -> System:
    if cfg.mode == "local":
        from treegrpo_ray.local_system import LocalSystem
        return LocalSystem(cfg, resume_from)
    from treegrpo_ray.actors.ray_system import RaySystem
    return RaySystem(cfg, resume_from)


# ----------------------------------------------------------------------------- the loop

def run(cfg: Config, *, out=sys.stdout) -> dict:
    """Train; return a summary (first/last rewards, run dir, MLflow run id)."""
    builders.preflight(cfg)
    given, cfg = cfg.tracking.output_dir, resolve_output(cfg)
    paths = resolve_paths(cfg)
    uri = tracking_uri(cfg.tracking.mlflow_uri, cfg.tracking.output_dir)
    storage.write_text(storage.join(paths.run_dir, "config.json"), json.dumps(redacted_config(cfg), indent=2))
    tracker = Tracker(uri, cfg.tracking.experiment, storage.name(paths.run_dir),
                      run_id=paths.run_state.get("mlflow_run_id"), artifact_location=artifact_location(uri),
                      verbose=cfg.tracking.verbose)
    tracker.log_params(flatten(cfg))
    start = int(paths.run_state.get("next_iteration", 0))
    logged = logged_through(tracker) if start else 0
    announce(cfg, given, paths, tracker, start, out)
    train_prompts, eval_prompts = builders.load_prompts(cfg, "train"), builders.load_prompts(cfg, "eval")
    held_out = builders.load_prompts(cfg, "held_out")
    history: list[dict[str, float]] = []
    stats = (RunningPromptStats(cfg.learner.adv_buffer, cfg.learner.adv_min_count, cfg.learner.adv_eps,
                                state=paths.run_state.get("adv_stats")) if cfg.learner.adv_stats == "running" else None)
    status, system, saved, step = "FAILED", None, (start if paths.resume_from else None), start
    try:
        system = build_system(cfg, paths.resume_from)
        preemption.install()  # after Ray's own SIGTERM handler (build_system starts Ray): ours replaces it
        watch = DriftWatch(builders.eval_metrics(cfg))
        if start == 0 and cfg.eval_every and not paths.resume_from:  # (a resume at 0: stopped before iteration 1)
            m, images, per_image = evaluate(cfg, system, eval_prompts, held_out)
            watch.observe(per_image)
            tracker.log(m, step=0)
            tracker.log_image(images, "samples/eval", step=0)
            report.save_grid(paths.run_dir, 0, images)  # the "before" half of samples.png
            keep_clips(tracker, paths.run_dir, 0, images)
            history.append({"iteration": 0, **m})
        handle = system.launch(plan(cfg, train_prompts, start)) if start < cfg.iterations else None
        loop_t0 = time.perf_counter()
        for it in range(start, cfg.iterations):
            preemption.check()
            handle, m = iteration(cfg, system, handle, train_prompts, it, stats)  # Preempted: sampling abandoned
            step = it + 1
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iterations):
                em, images, per_image = evaluate(cfg, system, eval_prompts, held_out)
                drift, warning = watch.observe(per_image)
                m.update(em | drift)
                if warning:
                    print(warning, file=out, flush=True)
                if cfg.tracking.sample_grid_every and (step % cfg.tracking.sample_grid_every == 0 or
                                                       step == cfg.iterations) and step > logged:
                    tracker.log_image(images, "samples/eval", step=step)
                if step == cfg.iterations:
                    report.save_grid(paths.run_dir, step, images)  # the "after" half
                    keep_clips(tracker, paths.run_dir, step, images)
            if step > logged:  # else: a replayed step the killed job already logged
                tracker.log(m, step=step)
            history.append({"iteration": step, **m})
            if cfg.tracking.progress:  # time left: this run's mean seconds per iteration so far
                left = (time.perf_counter() - loop_t0) / (it + 1 - start) * (cfg.iterations - it - 1)
                print(progress_line(it, cfg.iterations, m, left), file=out, flush=True)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.iterations:
                save(cfg, system, paths, tracker, step, stats)
                saved = step
        preemption.check()
        export_dir, extra = finish(cfg, system, paths, tracker, history, out)
        status = "FINISHED"
    except preemption.Preempted as stop:
        status = "KILLED"
        if system is not None:
            stop_on_signal(cfg, system, paths, tracker, step, saved, stats, stop, out)
        raise
    finally:
        if system is not None:
            system.close()
        preemption.uninstall()
        tracker.end(status)
    return summarize(history, paths, tracker, export_dir, builders.eval_metrics(cfg)) | extra


def save(cfg: Config, system, paths: RunPaths, tracker, step: int, stats: RunningPromptStats | None) -> None:
    """Checkpoint after `step` completed iterations: weights, optimizer and what a resume needs."""
    system.save(paths.checkpoints, step, {"next_iteration": step, "mlflow_run_id": tracker.run_id, "seed": cfg.seed,
                                          "version": system.version}
                | ({"adv_stats": stats.state()} if stats else {}), cfg.checkpoint.keep)


def stop_on_signal(cfg: Config, system, paths: RunPaths, tracker, step: int, saved: int | None,
                   stats: RunningPromptStats | None, stop: preemption.Preempted, out) -> None:
    """A stop signal: checkpoint the last completed iteration (unless it is saved already) and say
    what was kept. Its cost is the iteration in flight at most."""
    t0 = time.perf_counter()
    if saved != step:
        save(cfg, system, paths, tracker, step, stats)
    took = time.perf_counter() - t0
    print(f"treegrpo_ray: {stop}; stopped after iteration {step} of {cfg.iterations}, "
          f"{'checkpoint written in ' + format(took, '.1f') + ' s' if saved != step else 'its checkpoint was already written'} "
          f"({preemption.seconds_since():.1f} s after the signal; checkpoint.preempt_grace_s="
          f"{cfg.checkpoint.preempt_grace_s:g}). Resubmit with checkpoint.resume=auto to continue this run "
          f"(tracking.run_name={storage.name(paths.run_dir)}); exit status {stop.exit_code}", file=out, flush=True)
    if preemption.seconds_since() > cfg.checkpoint.preempt_grace_s:
        print(f"treegrpo_ray: WARNING: stopping took {preemption.seconds_since():.0f} s, more than "
              f"checkpoint.preempt_grace_s={cfg.checkpoint.preempt_grace_s:g}: give the pods a longer "
              "terminationGracePeriodSeconds (deploy/README.md)", file=out, flush=True)


def finish(cfg: Config, system, paths: RunPaths, tracker, history: list[dict], out) -> tuple[str, dict]:
    """The export (run dir and MLflow), the figures, and which pool limited the run; returns the
    export's location and the summary's figures/pools entries."""
    export_dir = system.export(storage.join(paths.run_dir, "export"))
    with storage.local_copy(export_dir) as local:
        tracker.log_artifacts(local, "final_model")
    pngs = figures(cfg, paths, tracker)
    pools = pool_diagnosis(cfg, history)
    if pools:
        print(f"treegrpo_ray: pools over this job's iterations: {pools}  (pool->N: the size that would keep "
              "that stage under 10% of the samplers')", file=out, flush=True)
    return export_dir, {"figures": [redact_uri(p) for p in pngs], "pools": pools}


def pool_diagnosis(cfg: Config, history: list[dict]) -> str:
    """Which pool limited this job's iterations, and what pool sizes would not (Ray runs only:
    in-process, the stages take turns on one machine)."""
    rows = [h for h in history if "time/iter_s" in h]
    if cfg.mode != "ray" or not rows:
        return ""
    p = cfg.pools
    busy = {"sampler": sum(h["time/sample_s"] for h in rows), "reward": sum(h["time/reward_s"] for h in rows),
            "learner": sum(h.get("time/learner_s", 0.0) for h in rows) * cfg.learner.workers}
    actors = {"sampler": p.samplers, "reward": p.rewards, "learner": cfg.learner.workers}
    return diagnose(busy, actors, wall_s=sum(h["time/iter_s"] for h in rows)).summary()


def figures(cfg: Config, paths: RunPaths, tracker) -> list[str]:
    """reward_curve.png and samples.png into the run dir, and into the MLflow run."""
    curves = report.CURVES + tuple((f"eval/{m}", f"eval: {m} (not trained on)") for m in builders.eval_metrics(cfg))
    history = tracker.history([k for k, _ in curves] + [report.TIME_KEY])
    title = f"{cfg.tree.variant}, {storage.name(paths.run_dir)}"
    written = report.write(paths.run_dir, history, cfg.iterations, title, curves)
    for location in written:
        tracker.log_bytes(storage.read_bytes(location), storage.name(location), "report")
    return written


def iteration(cfg: Config, system, handle, prompts: list[str], it: int, stats: RunningPromptStats | None = None):
    """One iteration; returns the handle of the next iteration's sampling and the metrics."""
    t0 = time.perf_counter()
    nxt = None
    if cfg.max_staleness > 0 and it + 1 < cfg.iterations:
        # overlap: queue i+1's calls behind i's on the samplers, so they grow i+1 while i's last
        # leaves are scored and the learner trains on i. The weights are the same as launching
        # after collect (the learner finished update i-1 before this iteration): lag 1.
        nxt = system.launch(plan(cfg, prompts, it + 1))
    collected = system.collect(handle)
    kept, raw, m = gather(cfg, collected, system.version)
    if kept is not None:
        leaf_adv, rm = advantages(cfg, kept.info, raw, stats)
        m.update(rm)
        m.update(system.update(kept.batches, leaf_adv, it))
        m["perf/nfe"] = float(kept.info.nfe)
        m["tree/leaves"] = float(kept.info.num_leaves)
        m["tree/window_start"] = float(kept.info.extras.get("window_start", -1.0))
        m["perf/tree_bytes"] = float(kept.info.nbytes)  # what stays off the driver: leaves -> rewards, rest -> learner
        m["perf/leaf_bytes"] = float(kept.info.leaf_bytes)
        if collected.driver_bytes:  # Ray: what passed through the driver (infos, rewards, advantages)
            m["perf/driver_bytes"] = float(collected.driver_bytes + leaf_adv.nbytes)
    if nxt is None and it + 1 < cfg.iterations:
        nxt = system.launch(plan(cfg, prompts, it + 1))
    wall = time.perf_counter() - t0
    m.update({"time/iter_s": wall, "time/sample_s": collected.sample_s, "time/reward_s": collected.reward_s,
              "perf/actor_restarts": float(collected.restarts), "weights/version": float(system.version),
              "faults/retried_calls": float(collected.retried_calls)})
    m.update({f"time/reward/{part}_s": s for part, s in collected.reward_parts.items()})  # decode, each scorer
    checked = [b.extras["weights_verified"] for b in collected.infos if "weights_verified" in b.extras]
    if checked:  # Ray: samplers checked the weights they loaded against the publish fingerprint
        m["weights/verified_samplers"] = float(sum(checked))
    busy = collected.wall_s or wall
    m["perf/sampler_busy"] = min(1.0, collected.sample_s / max(busy, 1e-9) / cfg.pools.samplers)
    m["perf/reward_busy"] = min(1.0, collected.reward_s / max(busy, 1e-9) / cfg.pools.rewards)
    m["perf/learner_busy"] = min(1.0, m.get("time/learner_s", 0.0) / max(wall, 1e-9))
    return nxt, m


def result_lines(cfg: Config, summary: dict) -> list[str]:
    """What the user needs at the end: where the model is, how plain diffusers loads it, MLflow."""
    export, base = summary["export_dir"], builders.pipeline_path(cfg)
    if not storage.is_uri(base) and Path(base).exists():
        base = str(Path(base).resolve())
    lines = []
    src = export
    if storage.is_uri(export):
        src = "./export"
        lines.append(f"trained model: {export}  (copy it locally first, e.g. `aws s3 cp --recursive "
                     f"{export.split('?')[0]} ./export`)")
    else:
        lines.append(f"trained model: {export}")
    if cfg.model.lora_rank > 0:
        lines.append(f'load it: from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained("{base}"); '
                     f'pipe.load_lora_weights("{src}")')
    else:
        name = "unet" if "unet" in {storage.name(d) for d in storage.list_dirs(export)} else "transformer"  # SD1.5
        if _is_wan(export, name):  # diffusers ignores transformer= for WanPipeline (families/wan.py): assign it
            lines.append(f'load it: from diffusers import AutoModel, DiffusionPipeline; pipe = DiffusionPipeline.'
                         f'from_pretrained("{base}"); pipe.transformer = AutoModel.from_pretrained("{src}", '
                         f'subfolder="transformer")')
        else:
            lines.append(f'load it: from diffusers import AutoModel, DiffusionPipeline; pipe = DiffusionPipeline.'
                         f'from_pretrained("{base}", {name}=AutoModel.from_pretrained("{src}", subfolder="{name}"))')
    if summary.get("figures"):
        lines.append(f"figures: {', '.join(summary['figures'])}")
    lines.append(f"checkpoints: {summary['run_dir'].split('?')[0].rstrip('/')}/checkpoints"
                 f" (resume: checkpoint.resume=latest tracking.run_name={storage.name(summary['run_dir'])})")
    lines.append(f"MLflow: mlflow ui --backend-store-uri {summary['mlflow_uri']}  (run {summary['mlflow_run_id']})")
    return lines


def summarize(history: list[dict], paths: RunPaths, tracker, export_dir: str, watched: list[str] = ()) -> dict:
    evals = [h["eval/reward"] for h in history if "eval/reward" in h]
    held = [h["eval_held_out/reward"] for h in history if "eval_held_out/reward" in h]
    train = [h["reward/combined"] for h in history if "reward/combined" in h and not math.isnan(h["reward/combined"])]
    return {"not_trained_on": {m: [h[f"eval/{m}"] for h in history if f"eval/{m}" in h] for m in watched},"run_dir": redact_uri(paths.run_dir), "export_dir": redact_uri(export_dir),
            "mlflow_run_id": tracker.run_id, "mlflow_uri": redact_uri(tracker.uri),
            "eval_rewards": evals, "eval_held_out_rewards": held, "train_rewards": train, "iterations": len(train),
            "iter_s": [h["time/iter_s"] for h in history if "time/iter_s" in h]}
