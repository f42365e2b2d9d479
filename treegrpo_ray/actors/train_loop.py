"""The learner as one long-lived Ray Train loop (starting Ray Train costs ~10 s, so it starts
once per run). Each worker pulls commands from its own queue; every rank gets every command so
DDP ranks always take the same number of steps. Rank 0 publishes weights to the WeightStore
after each update, writes checkpoints and answers on the outbox.

Commands: {"kind": "update", "seq", "batch": [ref], "leaf_adv", "iteration"} | {"kind": "save",
"seq", "root", "iteration", "run_state", "keep"} | {"kind": "export", "seq", "dir"} | {"kind": "stop"}.

Worker failure: Ray Train restarts the group (FailureConfig) and re-runs this function; the
restored rank 0 reloads the newest checkpoint (reported to Ray Train as a small pointer, so the
weights are not copied twice), republishes that version and says "ready" again; the driver then
re-sends the commands that were not answered.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from treegrpo_ray import builders
from treegrpo_ray.checkpoint import load_checkpoint, save_checkpoint
from treegrpo_ray.config import from_dict


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
        model, optim, _ = load_checkpoint(path)
        policy.load_broadcast_state(model)
        if optim is not None:
            learner.load_state(optim)
    return cfg, rank, policy, learner


def learner_loop(config: dict) -> None:
    cfg, rank, policy, learner = _build(config)
    inbox, outbox, store = config["inboxes"][rank], config["outbox"], config["store"]
    if rank == 0:
        ray.get(store.publish.remote(learner.version, policy.state_for_broadcast()))
        outbox.put({"kind": "ready", "version": learner.version})
    while True:
        cmd = inbox.get()
        kind = cmd["kind"]
        if kind == "stop":
            return
        if kind == "update":
            batch = ray.get(cmd["batch"][0])
            metrics = learner.update(batch, cmd["leaf_adv"], cmd["iteration"])
            if rank == 0:
                ray.get(store.publish.remote(learner.version, policy.state_for_broadcast()))
                outbox.put({"kind": "update", "seq": cmd["seq"], "metrics": metrics, "version": learner.version})
        elif kind == "save":
            _save(cmd, rank, policy, learner, outbox)
        elif kind == "export" and rank == 0:
            outbox.put({"kind": "export", "seq": cmd["seq"], "path": str(policy.export(cmd["dir"]))})


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
            (Path(d) / "pointer.json").write_text(json.dumps({"path": str(Path(path).resolve())}))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"iteration": cmd["iteration"]}, checkpoint=checkpoint)
    if rank == 0:
        outbox.put({"kind": "save", "seq": cmd["seq"], "path": str(path)})
