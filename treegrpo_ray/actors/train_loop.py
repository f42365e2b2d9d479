"""The learner as one long-lived Ray Train loop (starting Ray Train costs ~10 s, so it starts
once per run). Each worker pulls commands from its own queue; every rank gets every command so
DDP ranks always take the same number of steps. Rank 0 publishes weights to the WeightStore
after each update, writes checkpoints and answers on the outbox.

Commands: {"kind": "update", "seq", "batch": [ref], "leaf_adv", "iteration"} | {"kind": "save",
"seq", "root", "iteration", "run_state", "keep"} | {"kind": "export", "seq", "dir"} | {"kind": "stop"}.

Worker failure: Ray Train restarts the group (FailureConfig) and re-runs this function; the
restored ranks reload the checkpoint Ray Train hands back (reported as a small pointer, so the
weights are not copied twice) and rank 0 says "ready" again; the driver then re-sends the one
command it was waiting on (a rank that already took it skips the copy: a seq never runs twice).
Every command carries the driver's weights version and newest checkpoint path. Ray Train
registers reports asynchronously, so the checkpoint it hands back can be one save behind: a rank
whose version differs from the command's loads the driver's checkpoint instead, and if that does
not hold the version either (updates since the last save are lost) it answers "error" and the
run stops with advice to resume. Rank 0 republishes restored weights only if the store does not
already hold a newer version: the store never goes backwards.

A diverged learner (`TrainingDiverged`, the same decision on every rank) answers "error" and ends
the loop too: retrying it from a checkpoint would only diverge again.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from treegrpo_ray import builders, storage
from treegrpo_ray.actors.weight_store import pack_state
from treegrpo_ray.checkpoint import export, load_checkpoint, save_checkpoint
from treegrpo_ray.config import from_dict
from treegrpo_ray.learning.learner import TrainingDiverged


def _restore_path(config: dict) -> str | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return json.loads((Path(d) / "pointer.json").read_text())["path"]
    return config.get("resume_from")


def _build(config: dict):
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    builders.set_worker_threads(cfg.learner.resources.num_cpus)
    device = ray.train.torch.get_device() if cfg.learner.resources.num_gpus > 0 else torch.device("cpu")
    policy = builders.build_policy(cfg, device=str(device))
    module = policy.transformer
    if world > 1:
        strategy = "fsdp" if cfg.learner.strategy == "fsdp" else "ddp"
        module = ray.train.torch.prepare_model(module, parallel_strategy=strategy, move_to_device=False)
    learner = builders.build_learner(cfg, policy, module=module, rank=rank, world_size=world)
    path = _restore_path(config)
    if path:
        _load(path, policy, learner)
    return cfg, rank, policy, learner


class LearnerBehind(RuntimeError):
    """A restarted learner cannot reach the weights version the driver is at."""


def _load(path: str, policy, learner) -> None:
    model, optim, _ = load_checkpoint(path)
    policy.load_broadcast_state(model)
    if optim is not None:
        learner.load_state(optim)


def _catch_up(cmd: dict, policy, learner) -> None:
    """Bring a restarted learner to the version the command expects, from the driver's newest checkpoint."""
    if cmd["version"] == learner.version:
        return
    restored = learner.version
    if cmd["checkpoint"]:
        _load(cmd["checkpoint"], policy, learner)
    if cmd["version"] == learner.version:
        return
    raise LearnerBehind(
        f"a learner worker died and was restored at weights version {restored}, but the run is at version "
        f"{cmd['version']} and its newest checkpoint ({cmd['checkpoint'] or 'none yet'}) does not hold it: the "
        "updates since are lost. Resubmit with checkpoint.resume=latest (it replays from the newest checkpoint "
        "exactly); checkpoint.every=1 makes learner restarts lossless.")


def learner_loop(config: dict) -> None:
    cfg, rank, policy, learner = _build(config)
    inbox, outbox, store = config["inboxes"][rank], config["outbox"], config["store"]
    if rank == 0:
        if learner.version >= ray.get(store.current_version.remote()):
            ray.get(store.publish.remote(learner.version, pack_state(policy.state_for_broadcast())))
        probe = config.get("probe")
        outbox.put({"kind": "ready", "version": learner.version, "pid": os.getpid(), "host": socket.gethostname(),
                    "sees_outputs": probe is None or storage.exists(probe)})
    done = 0  # highest seq run by this worker: a command re-sent after a restart runs once
    while True:
        cmd = inbox.get()
        if cmd["kind"] == "stop":
            return
        if cmd["seq"] <= done:
            continue
        done = cmd["seq"]
        try:
            _catch_up(cmd, policy, learner)
            _run(cmd, rank, policy, learner, store, outbox)
        except (TrainingDiverged, LearnerBehind) as e:
            if rank == 0:
                outbox.put({"kind": "error", "seq": cmd["seq"], "error": str(e)})
            return


def _run(cmd: dict, rank: int, policy, learner, store, outbox) -> None:
    kind = cmd["kind"]
    if kind == "update":
        batch = ray.get(cmd["batch"][0])
        metrics = learner.update(batch, cmd["leaf_adv"], cmd["iteration"])
        if rank == 0:
            ray.get(store.publish.remote(learner.version, pack_state(policy.state_for_broadcast())))
            outbox.put({"kind": "update", "seq": cmd["seq"], "metrics": metrics, "version": learner.version})
    elif kind == "save":
        _save(cmd, rank, policy, learner, outbox)
    elif kind == "export" and rank == 0:
        outbox.put({"kind": "export", "seq": cmd["seq"], "path": export(policy, cmd["dir"])})


def _save(cmd: dict, rank: int, policy, learner, outbox) -> None:
    """Rank 0 writes the checkpoint (atomically); every rank then reports to Ray Train (a barrier)
    a pointer to it, which is what Ray Train hands back after a worker failure."""
    path = None
    if rank == 0:
        path = save_checkpoint(cmd["root"], cmd["iteration"], model_state=policy.state_for_broadcast(),
                               optimizer_state=learner.state(), run_state=cmd["run_state"], keep=cmd["keep"])
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            (Path(d) / "pointer.json").write_text(json.dumps({"path": str(path)}))  # absolute path or URI
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"iteration": cmd["iteration"]}, checkpoint=checkpoint)
    if rank == 0:
        outbox.put({"kind": "save", "seq": cmd["seq"], "path": str(path)})
