"""`python -m treegrpo_ray.evaluate <run dir | export dir> [key=value ...]`: a trained model against its base.

Generates with the run's base pipeline and with its trained weights (the newest checkpoint,
`checkpoint=<dir>`, or the run's export folder `<run>/export` as plain diffusers loads it) on the
same prompts and the same noise (the ODE sampler at a fixed seed, one trajectory per image), scores
every image with every metric asked for, and prints a table per prompt set: base, trained, change,
and the paper's normalised score (r - r_base) / (r_max - r_base) where r_max is known (TreeGRPO's
project page: HPS-v2.1 1, ImageReward 2, Aesthetic 10, CLIPScore 1; ours: CLIPScore is scaled by w =
2.5, so its r_max is 2.5; the miniature's scores are probabilities and fractions, r_max 1). Writes
evaluation.json, evaluation.csv and evaluation.png (base row over trained row) into <run
dir>/evaluation/ and logs them, with the scores as `evaluate/<set>/<metric>/{base,trained}`, to the
run's MLflow run.

Keys (defaults in brackets):
  metrics=[a,b]        reward kinds to score with [the run's training terms and its eval_metrics
                       (the GPU configs': aesthetic, clipscore), plus miniature_colour for
                       miniature prompts: the metric a miniature run does not train on]
  prompts=<file>       score these prompts instead [the run's eval prompts and, for the miniature,
                       its held-out prompts]
  images_per_prompt=N  [the run's eval_images_per_prompt]
  seed=N               noise seed [the driver's evaluation seed]
  checkpoint=<dir>     trained weights [the newest complete checkpoint of the run]
  device=cpu|cuda      [the run's model.device]

Runs in this process (no Ray actors); on a cluster submit it as a GPU job: `ray job submit
--entrypoint-num-gpus 1 -- python -m treegrpo_ray.evaluate outputs/<run> device=cuda`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from treegrpo_ray.config import ConfigError, from_dict
from treegrpo_ray.driver import EVAL_SEED
from treegrpo_ray.rewards.kinds import REWARD_KINDS, TERM_FILE_FIELDS

LORA_FILE = "pytorch_lora_weights.safetensors"
R_MAX = {"hpsv2": 1.0, "clipscore": 2.5, "aesthetic": 10.0, "imagereward": 2.0, "miniature": 1.0,
         "miniature_colour": 1.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m treegrpo_ray.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1] + f"\nmetric kinds: {', '.join(REWARD_KINDS)}")
    p.add_argument("run_dir", help="a run folder (outputs/<run>: config.json, checkpoints/), or its export folder "
                                   "(outputs/<run>/export: the exported weights, the run's settings)")
    p.add_argument("overrides", nargs="*", help="key=value, see below")
    return p.parse_args(argv)


def is_export(path: Path) -> bool:
    """What DiffusionPolicy.export writes: LoRA weights in diffusers' format, or the whole denoiser."""
    return (path / LORA_FILE).is_file() or any((path / n / "config.json").is_file() for n in ("transformer", "unet"))


def options(run_dir: Path, overrides: list[str]) -> dict:
    """Parse and check every key before any model loads."""
    export = None
    if not (run_dir / "config.json").is_file() and is_export(run_dir) and (run_dir.parent / "config.json").is_file():
        export, run_dir = run_dir, run_dir.parent  # <run>/export: the run's settings, the exported weights
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json) nor a run's export folder; give "
                          "outputs/<run> as the training run printed it, or outputs/<run>/export")
    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    got = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in ("metrics", "prompts", "images_per_prompt", "seed", "checkpoint", "device"):
            raise ConfigError(f"{item!r}: expected key=value with key one of metrics, prompts, images_per_prompt, "
                              "seed, checkpoint, device")
        got[key] = value
    from treegrpo_ray import builders
    from treegrpo_ray.checkpoint import latest_checkpoint, read_run_state
    if export is not None:
        if "checkpoint" in got:
            raise ConfigError("checkpoint=...: an export folder holds the trained weights already; give the run "
                              "folder to choose a checkpoint")
        newest = latest_checkpoint(run_dir / "checkpoints")
        state, trained = (read_run_state(newest) if newest else {}), str(export)  # state: the MLflow run to log to
    else:
        trained = got.get("checkpoint") or latest_checkpoint(run_dir / "checkpoints")
        if trained is None:
            raise ConfigError(f"no complete checkpoint under {run_dir / 'checkpoints'}: nothing trained to evaluate")
        try:
            state = read_run_state(trained)
        except FileNotFoundError:
            raise ConfigError(f"checkpoint={trained}: not a complete checkpoint (model.safetensors + run_state.json)") \
                from None
    if "prompts" in got:
        sets = {"prompts": builders.load_prompts(replace(cfg, prompts=got["prompts"]), "train")}
    else:
        sets = {"eval": builders.load_prompts(cfg, "eval"), "held_out": builders.load_prompts(cfg, "held_out")}
        sets = {k: v for k, v in sets.items() if v}
    miniature = all(_is_miniature(p) for ps in sets.values() for p in ps)
    watched = [m for m in builders.eval_metrics(cfg) if m != "miniature_colour"]  # the config's eval_metrics
    default = [t.name for t in cfg.rewards.terms] + watched + (["miniature_colour"] if miniature else [])
    metrics = [m.strip() for m in got["metrics"].strip("[]").split(",") if m.strip()] if "metrics" in got else default
    unknown = [m for m in metrics if m not in REWARD_KINDS]
    if unknown or not metrics:
        raise ConfigError(f"metrics: {unknown or 'none'} — choose from {', '.join(REWARD_KINDS)}")
    from treegrpo_ray.rewards.files import locate
    for spec in _specs(cfg, metrics):  # every metric's files exist before any model loads
        try:
            locate(spec["name"], **{k: v for k, v in spec.items() if k in TERM_FILE_FIELDS + ("version",)})
        except FileNotFoundError as e:
            raise ConfigError(f"metrics: {spec['name']}: {e}") from None
    device = got.get("device", cfg.model.device)
    cfg = replace(cfg, model=replace(cfg.model, device=device))
    return {"cfg": cfg, "run_dir": run_dir, "export": export is not None, "checkpoint": str(trained),
            "run_state": state, "sets": sets, "metrics": list(dict.fromkeys(metrics)),
            "images_per_prompt": int(got.get("images_per_prompt", cfg.eval_images_per_prompt)),
            "seed": int(got.get("seed", EVAL_SEED))}  # the noise the run's periodic evaluation used


def _is_miniature(prompt: str) -> bool:
    from treegrpo_ray.miniature.world import parse_prompt
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def _specs(cfg, metrics: list[str]) -> list[dict]:
    """The run's own term (its checkpoint, version...) for a metric it trained on, else the kind's defaults."""
    from treegrpo_ray import builders
    terms = {t.name: t for t in cfg.rewards.terms}
    specs = []
    for m in metrics:
        t = terms.get(m)
        specs.append({"name": m, **(builders.term_spec(t) if t else {})})
    return specs


def load_export(policy, folder: Path) -> None:
    """The weights DiffusionPolicy.export wrote, into the policy: LoRA layers through peft (the
    inverse of export_lora: diffusers' `<denoiser>.` prefix off), or the whole denoiser's state."""
    name = policy.family.denoiser_name
    if policy.lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        layers = {k[len(name) + 1:]: v for k, v in load_file(str(folder / LORA_FILE)).items() if k.startswith(name + ".")}
        result = set_peft_model_state_dict(policy.denoiser, layers)
        if not layers or getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{folder / LORA_FILE} does not fit this run's LoRA: {len(layers)} layers, "
                              f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}")
        return
    if not (folder / name / "config.json").is_file():
        raise ConfigError(f"{folder} holds no {name}/ (a full fine-tune's export) and no {LORA_FILE} (LoRA's)")
    from diffusers import AutoModel
    state = AutoModel.from_pretrained(str(folder), subfolder=name).state_dict()
    policy.load_broadcast_state({k: v.to(policy.dtype) for k, v in state.items()})


def evaluate(opts: dict, log=print) -> dict:
    """Generate base and trained images, score them; returns {"rows": [...], "grid": (base, trained) images}."""
    from treegrpo_ray import builders
    from treegrpo_ray.checkpoint import load_checkpoint
    from treegrpo_ray.rewards import build_reward_model
    from treegrpo_ray.sampling.evaluate import ode_sample

    cfg, n = opts["cfg"], opts["images_per_prompt"]
    t0 = time.perf_counter()
    policy = builders.build_policy(cfg)
    rewards = build_reward_model(_specs(cfg, opts["metrics"]), builders.pipeline_path(cfg), device=str(policy.device))
    latents = {}
    for label in ("base", "trained"):
        if label == "trained" and opts["export"]:
            load_export(policy, Path(opts["checkpoint"]))
        elif label == "trained":
            model, _, _ = load_checkpoint(opts["checkpoint"])
            policy.load_broadcast_state(model)
        for name, prompts in opts["sets"].items():
            rows = prompts * n  # row i: its own noise, the same for base and trained
            log(f"evaluate: generating {len(rows)} {label} images for {name} ({time.perf_counter() - t0:.0f} s)")
            latents[label, name] = ode_sample(policy, rows, num_steps=cfg.tree.num_steps, seed=opts["seed"])
    table = []
    for name, prompts in opts["sets"].items():
        rows = prompts * n
        scores = {label: rewards.score_latents(latents[label, name], rows) for label in ("base", "trained")}
        for metric in opts["metrics"]:
            b, t = (scores[label][metric].float() for label in ("base", "trained"))
            row = {"set": name, "metric": metric, "images": len(rows), "base": float(b.nanmean()),
                   "trained": float(t.nanmean()), "change": float((t - b).nanmean()),
                   "change_stderr": float((t - b).std() / len(rows) ** 0.5) if len(rows) > 1 else float("nan")}
            r_max = R_MAX.get(metric)
            row["normalised"] = (row["trained"] - row["base"]) / (r_max - row["base"]) \
                if r_max is not None and r_max > row["base"] else float("nan")
            table.append(row)
    first = next(iter(opts["sets"]))
    k = min(8, len(opts["sets"][first]))
    grid = tuple(rewards.decoder.decode(latents[label, first][:k]).cpu() for label in ("base", "trained"))
    log(f"evaluate: scored in {time.perf_counter() - t0:.0f} s")
    return {"rows": table, "grid": grid}


def render(rows: list[dict]) -> str:
    lines = [f"{'set':<9} {'metric':<18} {'images':>6} {'base':>9} {'trained':>9} {'change':>9} {'± s.e.':>8} "
             f"{'normalised':>10}"]
    for r in rows:
        lines.append(f"{r['set']:<9} {r['metric']:<18} {r['images']:>6} {r['base']:>9.4f} {r['trained']:>9.4f} "
                     f"{r['change']:>+9.4f} {r['change_stderr']:>8.4f} {r['normalised']:>10.3f}")
    return "\n".join(lines)


def write(out_dir: Path, result: dict, meta: dict) -> list[Path]:
    from treegrpo_ray.report import png
    from treegrpo_ray.tracking import make_grid
    out_dir.mkdir(parents=True, exist_ok=True)
    strict = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in result["rows"]]
    (out_dir / "evaluation.json").write_text(json.dumps({**meta, "rows": strict}, indent=2))  # NaN -> null
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result["rows"][0]))
    writer.writeheader()
    writer.writerows(result["rows"])
    (out_dir / "evaluation.csv").write_text(buf.getvalue())
    base, trained = result["grid"]
    scale = max(1, 128 // base.shape[-1])  # small images (the miniature's 32 px) drawn larger, pixels kept sharp
    base, trained = (torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest") for x in (base, trained))
    (out_dir / "evaluation.png").write_bytes(png(make_grid(torch.cat([base, trained]), ncol=base.shape[0])))
    return [out_dir / f for f in ("evaluation.json", "evaluation.csv", "evaluation.png")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir).expanduser().resolve()
    try:
        opts = options(run_dir, args.overrides)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    run_dir = opts["run_dir"]  # the export's run folder when an export folder was given
    result = evaluate(opts)
    print(f"base: {opts['cfg'].model.pretrained} | trained: {opts['checkpoint']} | seed {opts['seed']}, "
          f"{opts['images_per_prompt']} image(s) per prompt, ODE with {opts['cfg'].tree.num_steps} steps")
    print(render(result["rows"]))
    meta = {"run_dir": str(run_dir), "checkpoint": opts["checkpoint"], "seed": opts["seed"],
            "images_per_prompt": opts["images_per_prompt"], "metrics": opts["metrics"]}
    files = write(run_dir / "evaluation", result, meta)
    logged = _log_to_mlflow(opts, result["rows"], run_dir / "evaluation")
    print(f"written: {', '.join(str(f) for f in files)}" + (f" | logged to MLflow run {logged}" if logged else ""))
    return 0


def _log_to_mlflow(opts: dict, rows: list[dict], folder: Path) -> str | None:
    from treegrpo_ray.tracking import log_to_run, tracking_uri
    run_id = opts["run_state"].get("mlflow_run_id")
    if not run_id:
        return None
    cfg = opts["cfg"]
    metrics = {f"evaluate/{r['set']}/{r['metric']}/{label}": r[label] for r in rows for label in ("base", "trained")}
    log_to_run(tracking_uri(cfg.tracking.mlflow_uri, cfg.tracking.output_dir), run_id, metrics,
               step=int(opts["run_state"].get("next_iteration", 0)), folder=folder, artifact_path="evaluation")
    return run_id


if __name__ == "__main__":
    sys.exit(main())
