"""learner.strategy=fsdp (FSDP2, learning/sharding.py) on CPU: 2 workers over gloo with a CPU device
mesh, as Ray Train sets them up, against 2 DDP workers taking the same decisions.

One run of each (spawned processes), two updates each on the same batches:
* parity: FSDP2's weights after each update equal DDP's to <= 1e-5 relative (max |diff| over a
  tensor / max |weight| of it), and the grad norms to 1e-5 (float32; the measured figures print);
  FSDP also runs micro-batch accumulation (no gradient sync until the last) and gradient
  checkpointing, which change no arithmetic;
* fingerprints of the sharded weights (sampled where they lie, one all-gather) equal those of the
  gathered whole weights;
* state out of shards: after update 1 rank 0 writes a real checkpoint (gathered model + index-keyed
  optimizer state) and an export; ONE unsharded worker resumes from that checkpoint and its update 2
  equals FSDP's update 2 (resume with another worker count); plain diffusers loads the export;
* the update guard on sharded weights: a learning rate below float32's resolution stops the run
  (UpdateChangedNothing) on every rank alike.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from treegrpo_ray import builders
from treegrpo_ray.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (["a red circle", "a blue square", "a green triangle", "a yellow circle"],   # 4 x 3 = 12 decisions
           ["a blue circle", "a red square", "a yellow triangle", "a green circle"])
BASE = ["prompts_per_iteration=4", "learner.lr=1e-3", "learner.minibatches=2", "learner.workers=2"]


def _config(tiny_dir: str, overrides: list[str]):
    return load_config("configs/smoke.yaml", [f"model.pretrained={tiny_dir}", *BASE, *overrides])


def _batches(cfg, policy):
    sampler = builders.build_sampler(cfg, policy)
    # the same on every rank; each as if grown by the weights it is trained on (on-policy)
    return [sampler.sample(p, window_start=0, seed=7 + i, policy_version=i) for i, p in enumerate(BATCHES)]


def _advantages(batch) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, batch.leaf_prompt.numel())


def _worker(rank: int, world: int, tiny_dir: str, out: str, port: int, strategy: str) -> None:
    from treegrpo_ray.checkpoint import save_checkpoint
    from treegrpo_ray.learning import sharding
    from treegrpo_ray.learning.learner import UpdateChangedNothing
    from treegrpo_ray.models.fingerprint import fingerprint

    torch.set_num_threads(1)
    os.chdir(ROOT)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    extra = ["learner.micro_batch=2", "learner.gradient_checkpointing=true"] if strategy == "fsdp" else []
    cfg = _config(tiny_dir, [f"learner.strategy={strategy}", *extra])
    policy = builders.build_policy(cfg)
    batches = _batches(cfg, policy)
    if strategy == "fsdp":
        module = sharding.shard_denoiser(policy.denoiser, device_type="cpu", compute_dtype=policy.dtype)
    else:
        module = torch.nn.parallel.DistributedDataParallel(policy.denoiser)
    learner = builders.build_learner(cfg, policy, module=module, rank=rank, world_size=world)
    result = {"weights": [], "grad_norm": [], "fingerprint": []}
    for i, batch in enumerate(batches):
        metrics = learner.update(batch, _advantages(batch), i)
        whole = policy.state_for_broadcast()           # gathered (a collective under FSDP)
        optimizer = learner.state()                    # gathered too, index-keyed
        result["weights"].append(whole)
        result["grad_norm"].append(metrics["learner/grad_norm"])
        result["fingerprint"].append((metrics["weights/fingerprint"], fingerprint(whole)))
        if i == 0 and strategy == "fsdp":
            export_state = dict(policy.broadcast_tensors())  # every rank takes part; rank 0 writes
            if rank == 0:
                result["checkpoint"] = str(save_checkpoint(os.path.join(out, "ckpt"), 1, model_state=whole,
                                                           optimizer_state=optimizer, run_state={}))
                policy.export(os.path.join(out, "export"), state=export_state)
    for g in learner.optimizer.param_groups:
        g["lr"] = 1e-30
    try:
        learner.update(replace(batches[0], policy_version=2), _advantages(batches[0]), 2)
        result["guard"] = "no error"
    except UpdateChangedNothing as e:
        result["guard"] = str(e)
    if rank == 0:
        torch.save(result, os.path.join(out, f"{strategy}.pt"))
    dist.destroy_process_group()


def _resume_one_worker(tiny_dir: str, checkpoint: str, out: str) -> None:
    from treegrpo_ray.checkpoint import load_checkpoint
    torch.set_num_threads(1)
    os.chdir(ROOT)
    cfg = _config(tiny_dir, ["learner.workers=1"])
    policy = builders.build_policy(cfg)
    batches = _batches(cfg, policy)
    learner = builders.build_learner(cfg, policy)
    model, optimizer, _ = load_checkpoint(checkpoint)
    policy.load_broadcast_state(model)
    learner.load_state(optimizer)
    learner.update(batches[1], _advantages(batches[1]), 1)
    torch.save(policy.state_for_broadcast(), os.path.join(out, "resumed.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def test_fsdp2_on_cpu_equals_ddp_and_its_state_leaves_the_shards(tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    for strategy in ("ddp", "fsdp"):
        mp.start_processes(_worker, args=(2, str(tiny_sd3_dir), str(tmp_path), _free_port(), strategy),
                           nprocs=2, join=True, start_method="spawn")
    ddp, fsdp = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    ctx = mp.get_context("spawn")
    one = ctx.Process(target=_resume_one_worker, args=(str(tiny_sd3_dir), fsdp["checkpoint"], str(tmp_path)))
    one.start()
    one.join(300)
    assert one.exitcode == 0

    base = {k: v.detach().clone() for k, v in builders.build_policy(_config(str(tiny_sd3_dir), [])).live_state().items()}
    moved = max(float((ddp["weights"][0][k] - base[k]).abs().max()) for k in base)
    parity = [_relative(fsdp["weights"][i], ddp["weights"][i]) for i in range(2)]
    resumed = _relative(torch.load(tmp_path / "resumed.pt"), fsdp["weights"][1])
    print(f"update 1 moved weights by up to {moved:.3e}; FSDP2 vs DDP max relative difference after update 1: "
          f"{parity[0]:.3e}, after update 2: {parity[1]:.3e}; grad norms FSDP {fsdp['grad_norm']} DDP {ddp['grad_norm']}; "
          f"one worker resumed from FSDP's checkpoint vs FSDP's update 2: {resumed:.3e}")
    assert moved > 0
    assert max(parity) <= 1e-5
    assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5)
    assert resumed <= 1e-5
    for metric_digest, whole in fsdp["fingerprint"]:  # the sharded fingerprint is the whole one's
        from treegrpo_ray.models.fingerprint import digest
        assert metric_digest == float(int(digest(whole), 16))
    for result in (ddp, fsdp):
        assert "no weight of the policy's denoiser changed" in result["guard"]
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "export", subfolder="transformer")
    assert _relative({k: v for k, v in exported.state_dict().items()}, fsdp["weights"][0]) == 0.0
