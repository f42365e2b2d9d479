"""A run's folder and MLflow run, settled before anything starts: where its outputs go (`tracking.output_dir`
made absolute, or a URI), its run name, and the checkpoint it resumes from (`checkpoint.resume`),
plus the config as it is written there and the run's first lines."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from treegrpo_ray import storage
from treegrpo_ray.checkpoint import STATE_FILE, latest_checkpoint, read_run_state
from treegrpo_ray.config import Config, ConfigError, flatten, to_dict
from treegrpo_ray.tracking import Tracker, artifact_location, tracking_uri


@dataclass
class RunPaths:
    """Locations: absolute paths or URIs (treegrpo_ray.storage)."""
    run_dir: str
    checkpoints: str
    resume_from: str | None
    run_state: dict


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


def start_tracking(cfg: Config, paths: RunPaths) -> Tracker:
    """The run's config.json (secrets masked) and its MLflow run (a resumed run's own), with the
    config as its params."""
    uri = tracking_uri(cfg.tracking.mlflow_uri, cfg.tracking.output_dir)
    storage.write_text(storage.join(paths.run_dir, "config.json"), json.dumps(redacted_config(cfg), indent=2))
    tracker = Tracker(uri, cfg.tracking.experiment, storage.name(paths.run_dir),
                      run_id=paths.run_state.get("mlflow_run_id"), artifact_location=artifact_location(uri),
                      verbose=cfg.tracking.verbose)
    tracker.log_params(flatten(cfg))
    return tracker


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
