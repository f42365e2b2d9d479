"""The learner as one long-lived Ray Train loop (starting Ray Train costs ~10 s, so it starts
once per run). Each worker pulls commands from its own inbox of the `mailbox`; every rank gets
every command so DDP ranks always take the same number of steps. Rank 0 publishes weights to the WeightStore
after each update, writes checkpoints and answers on the outbox. The commands and replies are
the dataclasses of `learner_protocol` (Update | Save | Export in an Envelope, or Stop).

Worker failure: Ray Train restarts the group (FailureConfig) and re-runs this function; the
restored ranks reload the checkpoint Ray Train hands back (reported as a small pointer, so the
weights are not copied twice) and rank 0 says "ready" again; the driver then re-sends the one
command it was waiting on (a rank that already took it skips the copy: a seq never runs twice).
Every command carries the driver's weights version and newest checkpoint path. Ray Train
registers reports asynchronously, so the checkpoint it hands back can be one save behind: a rank
whose version differs from the command's loads the driver's checkpoint instead, and if that does
not hold the version either (updates since the last save are lost) it answers Failed and the
run stops with advice to resume. Rank 0 republishes restored weights only if the store does not
already hold a newer version: the store never goes backwards.

A diverged learner (`TrainingDiverged`, the same decision on every rank) answers Failed and ends
the loop too: retrying it from a checkpoint would only diverge again.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import ray
import ray.exceptions
import ray.train
import ray.train.torch
import torch

from treegrpo_ray import builders, storage
from treegrpo_ray.actors.learner_protocol import (Envelope, Export, Exported, Failed, Ready, Save, Saved, Stop,
                                                  Update, Updated)
from treegrpo_ray.actors.weight_store import publish
from treegrpo_ray.checkpoint import export, load_checkpoint, save_checkpoint
from treegrpo_ray.config import from_dict
from treegrpo_ray.learning import sharding
from treegrpo_ray.learning.learner import TrainingDiverged
from treegrpo_ray.types import merge_batches


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
    module = policy.denoiser
    if cfg.learner.strategy == "fsdp":  # FSDP2 over Ray Train's process group (NCCL on GPUs, gloo on CPU)
        module = sharding.shard_denoiser(module, device_type=device.type, compute_dtype=policy.dtype)
    elif world > 1:
        module = ray.train.torch.prepare_model(module, parallel_strategy="ddp", move_to_device=False)
    learner = builders.build_learner(cfg, policy, module=module, rank=rank, world_size=world)
    path = _restore_path(config)
    if path:
        _load(path, policy, learner)
    return cfg, rank, policy, learner


class LearnerBehind(RuntimeError):
    """A restarted learner cannot reach the weights version the driver is at."""


def _load(path: str, policy, learner) -> None:
    model, optim, _ = load_checkpoint(path)
    if learner.sharded:  # each rank keeps its rows of the whole state (the masters, if saved, replace them)
        sharding.load_full_state(policy.denoiser, model)
    else:
        policy.load_broadcast_state(model)
    if optim is not None:
        learner.load_state(optim)


def _apply(update: Update, learner) -> dict:
    return learner.update(merge_batches(ray.get(update.batch)), update.leaf_adv, update.iteration)


def _catch_up(cmd: Envelope, policy, learner) -> None:
    """Bring a restarted learner to the version the command expects: the driver's newest
    checkpoint, then the updates since it (`cmd.replay`, the same trees and advantages in the same
    order, so the same weights bit for bit)."""
    if cmd.version == learner.version:
        return
    restored = learner.version
    if cmd.checkpoint:
        _load(cmd.checkpoint, policy, learner)
    for before, update in cmd.replay:
        if before == learner.version and learner.version < cmd.version:
            try:
                _apply(update, learner)
            except ray.exceptions.ObjectLostError:
                break  # those trees went with a lost sampler node too
    if cmd.version == learner.version:
        return
    raise LearnerBehind(
        f"a learner worker died and was restored at weights version {restored}, but the run is at version "
        f"{cmd.version} and neither its newest checkpoint ({cmd.checkpoint or 'none yet'}) nor the updates since "
        f"it ({len(cmd.replay)} replayable) reach it: the updates since are lost. Resubmit with "
        "checkpoint.resume=latest (it replays from the newest checkpoint exactly).")


def learner_loop(config: dict) -> None:
    cfg, rank, policy, learner = _build(config)
    mail, store = config["mail"], config["store"]
    # the store never goes backwards: a group restored behind it publishes again once it has caught up
    # to the store's version (the restored weights then equal the store's, republished bit for bit)
    behind = learner.version < ray.get(store.current_version.remote())
    if not behind:
        _publish(store, learner.version, policy, rank)
    if rank == 0:
        probe = config.get("probe")
        mail.answer(Ready(version=learner.version, pid=os.getpid(), host=socket.gethostname(),
                         sees_outputs=probe is None or storage.exists(probe),
                         node=ray.get_runtime_context().get_node_id()))
    done = 0  # highest seq run by this worker: a command re-sent after a restart runs once
    while True:
        cmd = mail.next(rank)
        if isinstance(cmd, Stop):
            return
        if cmd.seq <= done:
            continue
        done = cmd.seq
        try:
            _catch_up(cmd, policy, learner)
            if behind and learner.version >= ray.get(store.current_version.remote()):  # else an Update publishes
                _publish(store, learner.version, policy, rank)
                behind = False
            reply = _run(cmd, rank, policy, learner, store)
            behind = behind and not isinstance(cmd.command, Update)  # an update published
        except (TrainingDiverged, LearnerBehind) as e:
            if rank == 0:
                mail.answer(Failed(cmd.seq, str(e)))
            return
        if rank == 0:
            mail.answer(reply)


def _run(cmd: Envelope, rank: int, policy, learner, store):
    """Run one command on this rank; rank 0's reply (None on the others)."""
    c = cmd.command
    if isinstance(c, Update):
        metrics = _apply(c, learner)
        _publish(store, learner.version, policy, rank)
        if rank == 0:
            return Updated(cmd.seq, learner.version, metrics)
    elif isinstance(c, Save):
        path = _save(c, rank, policy, learner)
        return Saved(cmd.seq, str(path)) if rank == 0 else None
    elif isinstance(c, Export):
        state = _gather(policy, rank) if learner.sharded else None
        return Exported(cmd.seq, export(policy, c.dir, state)) if rank == 0 else None
    else:
        raise TypeError(f"unknown learner command {type(c).__name__}")
    return None


def _publish(store, version: int, policy, rank: int) -> None:
    """Rank 0 streams the weights to the store in buckets; under FSDP every rank takes part in
    gathering each tensor from the shards."""
    tensors = policy.broadcast_tensors()
    if rank == 0:
        publish(store, version, tensors)
    else:
        for _ in tensors:
            pass


def _gather(policy, rank: int) -> dict | None:
    """The whole broadcast state as CPU tensors on rank 0 (None elsewhere; a collective under FSDP)."""
    state = {}
    for name, t in policy.broadcast_tensors():
        if rank == 0:
            state[name] = t.to("cpu", copy=True).contiguous()
    return state if rank == 0 else None


def _save(c: Save, rank: int, policy, learner):
    """Rank 0 writes the checkpoint (atomically); every rank then reports to Ray Train (a barrier)
    a pointer to it, which is what Ray Train hands back after a worker failure."""
    path = None
    model_state, optimizer_state = _gather(policy, rank), learner.state()  # collectives under FSDP
    if rank == 0:
        path = save_checkpoint(c.root, c.iteration, model_state=model_state,
                               optimizer_state=optimizer_state, run_state=c.run_state, keep=c.keep)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            (Path(d) / "pointer.json").write_text(json.dumps({"path": str(path)}))  # absolute path or URI
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"iteration": c.iteration}, checkpoint=checkpoint)
    return path
