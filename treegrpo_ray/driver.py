"""The driver: TreeGRPO's outer loop, one short function per stage.

    for each iteration:
        requests  = plan(iteration)              # prompts, SDE window, noise seeds
        collected = system.collect(...)          # samplers grow trees; reward pool scores leaves
        batch     = merge + drop stale trees     # version lag <= max_staleness
        leaf_adv  = combine_rewards(...)         # per-prompt normalised leaf advantages
        metrics   = system.update(...)           # learner: edge advantages + clipped GRPO; publishes weights
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from treegrpo_ray import builders
from treegrpo_ray.algo.tree import choose_window, count_nfe, count_nfe_flat
from treegrpo_ray.checkpoint import latest_checkpoint, load_checkpoint
from treegrpo_ray.config import Config, ConfigError, flatten, to_dict
from treegrpo_ray.rewards.combine import combine_rewards
from treegrpo_ray.system import Collected, SampleRequest, concat_rewards
from treegrpo_ray.tracking import Tracker, tracking_uri
from treegrpo_ray.types import merge_batches

EVAL_SEED = 1234


@dataclass
class RunPaths:
    run_dir: Path
    checkpoints: Path
    resume_from: Path | None
    run_state: dict


# ----------------------------------------------------------------------------- planning

def plan(cfg: Config, prompts: list[str], iteration: int) -> list[SampleRequest]:
    """Prompts, window and seeds of one iteration; a pure function of (seed, iteration)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    picked = [prompts[i] for i in torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_iteration].tolist()]
    while len(picked) < cfg.prompts_per_iteration:  # fewer prompts than asked for: cycle
        picked.append(prompts[len(picked) % len(prompts)])
    t = cfg.tree
    window = 0
    if t.variant != "flat":
        window = choose_window(t.num_steps, t.depth, t.window, generator=gen, iteration=iteration,
                               shift_every=t.shift_every, max_start=None if t.max_window_start < 0 else t.max_window_start)
    per = cfg.prompts_per_iteration // cfg.pools.samplers
    return [SampleRequest(picked[i * per:(i + 1) * per], window, cfg.seed * 1_000_003 + iteration * 1_009 + i)
            for i in range(cfg.pools.samplers)]


def expected_nfe(cfg: Config, window: int) -> int:
    t, groups = cfg.tree, cfg.prompts_per_iteration * cfg.tree.trees_per_prompt
    if t.variant == "tree":
        return groups * count_nfe(t.num_steps, t.k, t.depth, window)
    return groups * count_nfe_flat(t.num_steps, t.leaves_per_tree)


# ----------------------------------------------------------------------------- stages

def gather(cfg: Config, collected: Collected, learner_version: int):
    """Merge an iteration's batches, dropping trees grown by weights older than max_staleness
    (they are dropped, not down-weighted: a stale ratio is meaningless under a clip of 1e-4)."""
    keep = [i for i, b in enumerate(collected.batches) if learner_version - b.policy_version <= cfg.max_staleness]
    dropped = len(collected.batches) - len(keep)
    lags = [learner_version - b.policy_version for b in collected.batches]
    if not keep:
        return None, None, {"staleness/dropped_batches": float(dropped), "staleness/max_lag": float(max(lags))}
    batch = merge_batches([collected.batches[i] for i in keep])
    raw = concat_rewards([collected.rewards[i] for i in keep])
    return batch, raw, {"staleness/dropped_batches": float(dropped), "staleness/max_lag": float(max(lags)),
                        "staleness/mean_lag": sum(lags) / len(lags)}


def advantages(cfg: Config, batch, raw: dict[str, torch.Tensor]):
    leaf_adv, metrics = combine_rewards(raw, builders.reward_weights(cfg), batch.leaf_prompt,
                                        mode=cfg.rewards.aggregate, eps=cfg.learner.adv_eps, clip=cfg.learner.adv_clip,
                                        std=cfg.learner.adv_std)
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


def progress_line(it: int, total: int, m: dict[str, float]) -> str:
    ev = f" eval {m['eval/reward']:.3f} |" if "eval/reward" in m else ""
    if "eval_held_out/reward" in m:
        ev += f" held-out {m['eval_held_out/reward']:.3f} |"
    return (f"iter {it + 1:>4}/{total} | reward {m.get('reward/combined', float('nan')):.3f} |{ev} "
            f"loss {m.get('loss/total', float('nan')):+.1e} | clip {m.get('loss/clip_frac', 0):.2f} | "
            f"nfe {int(m.get('perf/nfe', 0))} | {m.get('perf/iter_s', 0):.2f} s/it | lag {int(m.get('staleness/max_lag', 0))}")


def evaluate(cfg: Config, system, prompts: list[str], held_out: list[str]) -> tuple[dict[str, float], torch.Tensor]:
    """ODE samples at a fixed seed: `eval/*` on (training) `prompts`, what RL optimises, and
    `eval_held_out/*` on prompts it never trains on, which says whether the gain generalises."""
    weights = builders.reward_weights(cfg)
    out, images = {}, None
    for prefix, ps in (("eval", prompts), ("eval_held_out", held_out)):
        if not ps:
            continue
        scores, imgs = system.evaluate(ps * cfg.eval_images_per_prompt, EVAL_SEED)  # row i: its own noise
        images = imgs if images is None else images
        combined = sum(weights[n] * scores[n].float() for n in scores) / sum(weights.values())
        out.update({f"{prefix}/{n}": float(s.float().nanmean()) for n, s in scores.items()})
        out[f"{prefix}/reward"] = float(combined.nanmean())
    return out, images


# ----------------------------------------------------------------------------- run setup

def redact_uri(uri: str) -> str:
    """scheme://user:secret@host/... -> scheme://***@host/... for anything printed or returned."""
    head, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    return f"{head}://***@{host.rsplit('@', 1)[1]}{slash}{path}" if sep and "@" in host else uri


def redacted_config(cfg: Config) -> dict:
    """to_dict(cfg) with every value `flatten` redacts (secret-like keys, URIs with credentials) masked."""
    masked = {k for k, v in flatten(cfg).items() if v == "***"}

    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in node.items()}
        if isinstance(node, list) and node and isinstance(node[0], dict):
            return [walk(v, f"{prefix}{i}.") for i, v in enumerate(node)]
        return "***" if prefix.rstrip(".") in masked else node
    return walk(to_dict(cfg), "")


def logged_through(tracker) -> int:
    """Last step this MLflow run has metrics for. A killed job may have logged iterations past its
    last checkpoint; a resume replays them exactly (same seed) but does not log them twice."""
    history = tracker.mlflow.MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "perf/iter_s")
    return max((m.step for m in history), default=0)


def resolve_paths(cfg: Config) -> RunPaths:
    root = Path(cfg.tracking.output_dir)
    resume = cfg.checkpoint.resume
    if resume and resume != "latest":
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise ConfigError(f"checkpoint.resume: {resume!r} is not a checkpoint directory; use 'latest' or a path "
                              "like outputs/<run>/checkpoints/iter_000010")
        _, _, state = load_checkpoint(ckpt)  # validates completeness before anything starts
        run_dir = ckpt.parent.parent
        return RunPaths(run_dir, ckpt.parent, ckpt, state)
    name = cfg.tracking.run_name
    if resume == "latest":
        candidates = [root / name] if name else sorted(root.glob("*/checkpoints"), key=lambda p: p.stat().st_mtime)
        candidates = [c if c.name != "checkpoints" else c.parent for c in candidates]
        for run_dir in reversed(candidates):
            ckpt = latest_checkpoint(run_dir / "checkpoints")
            if ckpt is not None:
                return RunPaths(run_dir, run_dir / "checkpoints", ckpt, load_checkpoint(ckpt)[2])
    if not name:
        name = f"{cfg.tree.variant}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    run_dir = root / name
    return RunPaths(run_dir, run_dir / "checkpoints", None, {})


def build_system(cfg: Config, resume_from):
    if cfg.mode == "local":
        from treegrpo_ray.local_system import LocalSystem
        return LocalSystem(cfg, resume_from)
    from treegrpo_ray.actors.ray_system import RaySystem
    return RaySystem(cfg, resume_from)


# ----------------------------------------------------------------------------- the loop

def run(cfg: Config, *, out=sys.stdout) -> dict:
    """Train; return a summary (first/last rewards, run dir, MLflow run id)."""
    builders.preflight(cfg)
    paths = resolve_paths(cfg)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    (paths.run_dir / "config.json").write_text(json.dumps(redacted_config(cfg), indent=2))
    tracker = Tracker(tracking_uri(cfg.tracking.mlflow_uri, Path(cfg.tracking.output_dir)), cfg.tracking.experiment,
                      paths.run_dir.name, run_id=paths.run_state.get("mlflow_run_id"))
    tracker.log_params(flatten(cfg))
    start = int(paths.run_state.get("next_iteration", 0))
    logged = logged_through(tracker) if start else 0
    print(f"treegrpo_ray: run dir {paths.run_dir} | MLflow {redact_uri(tracker.uri)} run {tracker.run_id} | "
          f"{'resuming at iteration ' + str(start) if start else 'fresh run'} | mode {cfg.mode}", file=out, flush=True)
    train_prompts, eval_prompts = builders.load_prompts(cfg, "train"), builders.load_prompts(cfg, "eval")
    held_out = builders.load_prompts(cfg, "held_out")
    system = build_system(cfg, paths.resume_from)
    history: list[dict[str, float]] = []
    status = "FAILED"
    try:
        if start == 0 and cfg.eval_every:
            m, images = evaluate(cfg, system, eval_prompts, held_out)
            tracker.log(m, step=0)
            tracker.log_image(images, "samples/eval", step=0)
            history.append({"iteration": 0, **m})
        handle = system.launch(plan(cfg, train_prompts, start)) if start < cfg.iterations else None
        for it in range(start, cfg.iterations):
            handle, m = iteration(cfg, system, handle, train_prompts, it)
            step = it + 1
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iterations):
                em, images = evaluate(cfg, system, eval_prompts, held_out)
                m.update(em)
                if cfg.tracking.sample_grid_every and (step % cfg.tracking.sample_grid_every == 0 or
                                                       step == cfg.iterations) and step > logged:
                    tracker.log_image(images, "samples/eval", step=step)
            if step > logged:  # else: a replayed step the killed job already logged
                tracker.log(m, step=step)
            history.append({"iteration": step, **m})
            if cfg.tracking.progress:
                print(progress_line(it, cfg.iterations, m), file=out, flush=True)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.iterations:
                system.save(paths.checkpoints, step, {"next_iteration": step, "mlflow_run_id": tracker.run_id,
                                                      "seed": cfg.seed, "version": system.version}, cfg.checkpoint.keep)
        export_dir = system.export(paths.run_dir / "export")
        tracker.log_artifacts(export_dir, "final_model")
        status = "FINISHED"
    finally:
        system.close()
        tracker.end(status)
    return summarize(history, paths, tracker)


def iteration(cfg: Config, system, handle, prompts: list[str], it: int):
    """One iteration; returns the handle of the next iteration's sampling and the metrics."""
    t0 = time.perf_counter()
    collected = system.collect(handle)
    nxt = None
    if cfg.max_staleness > 0 and it + 1 < cfg.iterations:  # overlap: sample i+1 while learning on i
        nxt = system.launch(plan(cfg, prompts, it + 1))
    batch, raw, m = gather(cfg, collected, system.version)
    if batch is not None:
        leaf_adv, rm = advantages(cfg, batch, raw)
        m.update(rm)
        m.update(system.update(batch, leaf_adv, it))
        m["perf/nfe"] = float(batch.nfe)
        m["tree/leaves"] = float(batch.num_leaves)
        m["tree/window_start"] = float(collected.batches[0].extras.get("window_start", -1.0))
    if nxt is None and it + 1 < cfg.iterations:
        nxt = system.launch(plan(cfg, prompts, it + 1))
    wall = time.perf_counter() - t0
    m.update({"perf/iter_s": wall, "time/sample_s": collected.sample_s, "time/reward_s": collected.reward_s,
              "perf/actor_restarts": float(collected.restarts), "weights/version": float(system.version)})
    busy = collected.wall_s or wall
    m["perf/sampler_busy"] = min(1.0, collected.sample_s / max(busy, 1e-9) / cfg.pools.samplers)
    m["perf/reward_busy"] = min(1.0, collected.reward_s / max(busy, 1e-9) / cfg.pools.rewards)
    m["perf/learner_busy"] = min(1.0, m.get("time/learner_s", 0.0) / max(wall, 1e-9))
    return nxt, m


def summarize(history: list[dict], paths: RunPaths, tracker) -> dict:
    evals = [h["eval/reward"] for h in history if "eval/reward" in h]
    held = [h["eval_held_out/reward"] for h in history if "eval_held_out/reward" in h]
    train = [h["reward/combined"] for h in history if "reward/combined" in h and not math.isnan(h["reward/combined"])]
    return {"run_dir": str(paths.run_dir), "mlflow_run_id": tracker.run_id, "mlflow_uri": redact_uri(tracker.uri),
            "eval_rewards": evals, "eval_held_out_rewards": held, "train_rewards": train, "iterations": len(train),
            "iter_s": [h["perf/iter_s"] for h in history if "perf/iter_s" in h]}
