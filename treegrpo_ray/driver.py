"""The driver: TreeGRPO's outer loop, one short function per stage.

    for each iteration:
        requests  = requests_for(iteration)      # prompts, SDE window, noise seeds
        collected = system.collect(...)          # samplers grow trees; reward pool scores leaves
        kept      = drop stale trees             # version lag <= max_staleness (infos only: no latents here)
        leaf_adv  = leaf_advantages(...)         # per-prompt normalised leaf advantages
        metrics   = system.update(...)           # learner fetches the trees, edge advantages + clipped GRPO
        log / evaluate / checkpoint

Every random choice is a function of (seed, iteration), so a resumed run replays exactly the
iterations the uninterrupted run would have. The system is either `LocalSystem` (one process)
or `RaySystem` (actors + Ray Train); the driver cannot tell them apart.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from treegrpo_ray import builders, preemption, report, run_end, storage
from treegrpo_ray.algo.advantages import RunningPromptStats, combined_reward, leaf_advantages
from treegrpo_ray.algo.seeds import iteration_seed, sampler_seed
from treegrpo_ray.algo.tree import choose_window, count_nfe, count_nfe_flat
from treegrpo_ray.config import Config, groups_per_iteration
from treegrpo_ray.drift import DriftWatch
from treegrpo_ray.system import Collected, SampleRequest, System, concat_rewards
from treegrpo_ray.run_folder import RunPaths, announce, resolve_output, resolve_paths, start_tracking
from treegrpo_ray.types import BatchInfo, merge_infos

EVAL_SEED = 1234


# ----------------------------------------------------------------------------- planning

def requests_for(cfg: Config, prompts: list[str], iteration: int) -> list[SampleRequest]:
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
    running per-prompt statistics (advantage.stats=running), updated here, else the group's."""
    normalize = None
    if stats is not None:
        def normalize(r, ids):
            return stats.normalize(r, [batch.prompts[i] for i in ids.tolist()])
    weights = builders.reward_weights(cfg)
    leaf_adv, metrics = leaf_advantages(raw, weights, batch.leaf_prompt, mode=cfg.rewards.aggregate,
                                        eps=cfg.advantage.eps, clip=cfg.advantage.clip, std=cfg.advantage.std,
                                        normalize=normalize)
    dropped = metrics["reward/dropped"]  # leaves with a NaN/inf reward: advantage 0, counted here
    if dropped > cfg.rewards.max_nonfinite_fraction * leaf_adv.numel():
        raise RuntimeError(f"{int(dropped)} of {leaf_adv.numel()} leaves have non-finite rewards, more than "
                           f"rewards.max_nonfinite_fraction={cfg.rewards.max_nonfinite_fraction}; stopping before "
                           "any NaN reaches the weights. Check the reward models.")
    for name, r in raw.items():
        finite = r[torch.isfinite(r)]
        metrics[f"reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
    combined = combined_reward(raw, weights)  # (L,)
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
        combined = combined_reward(scores, weights)  # (B,); scores also hold the eval-only metrics
        out.update({f"{prefix}/{n}": float(s.float().nanmean()) for n, s in scores.items()})
        out[f"{prefix}/reward"] = float(combined.nanmean())
        if prefix == "eval":
            per_image = {"reward": combined, **{n: s for n, s in scores.items() if n not in weights}}
    return out, images, per_image


def evaluate_and_watch(cfg: Config, system, watch: DriftWatch, prompts: list[str], held_out: list[str], out):
    """An evaluation, the drift of the watched metrics since the first one (printing the warning
    if one fell while the reward rose), and the grid's images (a video run: clips)."""
    m, images, per_image = evaluate(cfg, system, prompts, held_out)
    drift, warning = watch.observe(per_image)
    if warning:
        print(warning, file=out, flush=True)
    return m | drift, images


def keep_clips(tracker, run_dir: str, step: int, images) -> None:
    """A video run's eval clips (B, T, 3, H, W): the first few as GIFs in the run folder's samples/
    and in the MLflow run (samples/clips). Image runs have none."""
    if images is None or images.dim() != 5:
        return
    for location in report.save_clips(run_dir, step, images):
        tracker.log_bytes(storage.read_bytes(location), location.rsplit("/", 1)[-1], "samples/clips")


# ----------------------------------------------------------------------------- run setup

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
    tracker = start_tracking(cfg, paths)
    start = int(paths.run_state.get("next_iteration", 0))
    logged = tracker.last_step("time/iter_s") if start else 0  # a killed job may have logged past its checkpoint
    announce(cfg, given, paths, tracker, start, out)
    train_prompts, eval_prompts = builders.load_prompts(cfg, "train"), builders.load_prompts(cfg, "eval")
    held_out = builders.load_prompts(cfg, "held_out")
    history: list[dict[str, float]] = []
    stats = (RunningPromptStats(cfg.advantage.buffer, cfg.advantage.min_count, cfg.advantage.eps,
                                state=paths.run_state.get("adv_stats")) if cfg.advantage.stats == "running" else None)
    status, system, saved, step = "FAILED", None, (start if paths.resume_from else None), start
    try:
        system = build_system(cfg, paths.resume_from)
        preemption.install()  # after Ray's own SIGTERM handler (build_system starts Ray): ours replaces it
        watch = DriftWatch(builders.eval_metrics(cfg))

        def evaluation(step: int) -> dict[str, float]:
            m, images = evaluate_and_watch(cfg, system, watch, eval_prompts, held_out, out)
            if step == 0 or (due(cfg.tracking.sample_grid_every, step, cfg.iterations) and step > logged):
                tracker.log_image(images, "samples/eval", step=step)
            if step in (0, cfg.iterations):  # the "before" and "after" halves of samples.png
                report.save_grid(paths.run_dir, step, images)
                keep_clips(tracker, paths.run_dir, step, images)
            return m

        if start == 0 and cfg.eval_every and not paths.resume_from:  # (a resume at 0: stopped before iteration 1)
            m = evaluation(0)
            tracker.log(m, step=0)
            history.append({"iteration": 0, **m})
        handle = system.launch(requests_for(cfg, train_prompts, start)) if start < cfg.iterations else None
        loop_t0 = time.perf_counter()
        for it in range(start, cfg.iterations):
            preemption.check()
            handle, m = iteration(cfg, system, handle, train_prompts, it, stats)  # Preempted: sampling abandoned
            step = it + 1
            if due(cfg.eval_every, step, cfg.iterations):
                m.update(evaluation(step))
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
        export_dir, extra = run_end.finish(cfg, system, paths, tracker, history, out)
        status = "FINISHED"
    except preemption.Preempted as stop:
        status = "KILLED"
        if system is not None:
            run_end.stop_on_signal(cfg, paths, step, saved, lambda: save(cfg, system, paths, tracker, step, stats),
                                   stop, out)
        raise
    finally:
        if system is not None:
            system.close()
        preemption.uninstall()
        tracker.end(status)
    return run_end.summarize(history, paths, tracker, export_dir, builders.eval_metrics(cfg)) | extra


def due(every: int, step: int, last: int) -> bool:
    """A periodic stage after `step` iterations: every `every` (0: never) and at the last one."""
    return bool(every) and (step % every == 0 or step == last)


def iteration(cfg: Config, system, handle, prompts: list[str], it: int, stats: RunningPromptStats | None = None):
    """One iteration; returns the handle of the next iteration's sampling and the metrics."""
    t0 = time.perf_counter()
    nxt = None
    if cfg.max_staleness > 0 and it + 1 < cfg.iterations:
        # overlap: queue i+1's calls behind i's on the samplers, so they grow i+1 while i's last
        # leaves are scored and the learner trains on i. The weights are the same as launching
        # after collect (the learner finished update i-1 before this iteration): lag 1.
        nxt = system.launch(requests_for(cfg, prompts, it + 1))
    collected = system.collect(handle)
    kept, raw, m = gather(cfg, collected, system.version)
    if kept is not None:
        leaf_adv, rm = advantages(cfg, kept.info, raw, stats)
        m.update(rm)
        m.update(system.update(kept.batches, leaf_adv, it))
        m["perf/nfe"] = float(kept.info.nfe)
        m["tree/leaves"] = float(kept.info.num_leaves)
        m["tree/window_start"] = float(kept.info.window_start)
        m["perf/tree_bytes"] = float(kept.info.nbytes)  # what stays off the driver: leaves -> rewards, rest -> learner
        m["perf/leaf_bytes"] = float(kept.info.leaf_bytes)
        if collected.driver_bytes:  # Ray: what passed through the driver (infos, rewards, advantages)
            m["perf/driver_bytes"] = float(collected.driver_bytes + leaf_adv.nbytes)
    if nxt is None and it + 1 < cfg.iterations:
        nxt = system.launch(requests_for(cfg, prompts, it + 1))
    wall = time.perf_counter() - t0
    m.update({"time/iter_s": wall, "time/sample_s": collected.sample_s, "time/reward_s": collected.reward_s,
              "perf/actor_restarts": float(collected.restarts), "weights/version": float(system.version),
              "faults/retried_calls": float(collected.retried_calls)})
    m.update({f"time/reward/{part}_s": s for part, s in collected.reward_parts.items()})  # decode, each scorer
    checked = [i.call.weights_verified for i in collected.infos if i.call is not None]
    if checked:  # Ray: samplers checked the weights they loaded against the publish fingerprint
        m["weights/verified_samplers"] = float(sum(checked))
    busy = collected.wall_s or wall
    m["perf/sampler_busy"] = min(1.0, collected.sample_s / max(busy, 1e-9) / cfg.pools.samplers)
    m["perf/reward_busy"] = min(1.0, collected.reward_s / max(busy, 1e-9) / cfg.pools.rewards)
    m["perf/learner_busy"] = min(1.0, m.get("time/learner_s", 0.0) / max(wall, 1e-9))
    return nxt, m


def save(cfg: Config, system, paths: RunPaths, tracker, step: int, stats: RunningPromptStats | None) -> None:
    """Checkpoint after `step` completed iterations: weights, optimizer and what a resume needs."""
    system.save(paths.checkpoints, step, {"next_iteration": step, "mlflow_run_id": tracker.run_id, "seed": cfg.seed,
                                          "version": system.version}
                | ({"adv_stats": stats.state()} if stats else {}), cfg.checkpoint.keep)
