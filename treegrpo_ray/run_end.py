"""How a run ends: finished (the export, the figures, which pool limited it, the summary and the
lines that say where everything is) or stopped by a signal (checkpoint what is complete, say how to
continue)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

from treegrpo_ray import builders, preemption, report, storage
from treegrpo_ray.config import Config
from treegrpo_ray.diagnose import diagnose
from treegrpo_ray.run_folder import RunPaths, redact_uri


def stop_on_signal(cfg: Config, paths: RunPaths, step: int, saved: int | None, checkpoint: Callable[[], None],
                   stop: preemption.Preempted, out) -> None:
    """A stop signal: `checkpoint()` the last completed iteration (unless it is saved already) and
    say what was kept. Its cost is the iteration in flight at most."""
    t0 = time.perf_counter()
    if saved != step:
        checkpoint()
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


def _is_wan(export: str, name: str) -> bool:
    try:
        return json.loads(storage.read_bytes(storage.join(export, name, "config.json"))).get(
            "_class_name") == "WanTransformer3DModel"
    except (OSError, ValueError):
        return False


def summarize(history: list[dict], paths: RunPaths, tracker, export_dir: str, watched: list[str] = ()) -> dict:
    evals = [h["eval/reward"] for h in history if "eval/reward" in h]
    held = [h["eval_held_out/reward"] for h in history if "eval_held_out/reward" in h]
    train = [h["reward/combined"] for h in history if "reward/combined" in h and not math.isnan(h["reward/combined"])]
    return {"not_trained_on": {m: [h[f"eval/{m}"] for h in history if f"eval/{m}" in h] for m in watched},"run_dir": redact_uri(paths.run_dir), "export_dir": redact_uri(export_dir),
            "mlflow_run_id": tracker.run_id, "mlflow_uri": redact_uri(tracker.uri),
            "eval_rewards": evals, "eval_held_out_rewards": held, "train_rewards": train, "iterations": len(train),
            "iter_s": [h["time/iter_s"] for h in history if "time/iter_s" in h]}
