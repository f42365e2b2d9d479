"""The GPU configs' learner arithmetic, by hand on CPU: `minibatches` optimizer steps with
`micro_batch` gradient accumulation under 2 DDP workers (torch.distributed over gloo, what Ray
Train sets up; DDP's no_sync between micro-batches) give the same update as one worker taking
each minibatch whole. Same decisions in each step: rank r takes every world-th decision of the
iteration's shuffled order, so the ranks' halves of minibatch m are the one worker's minibatch m.
Tolerance: the grad norm to 1e-5 relative, the weights to 1e-3 of the update's largest move (float32 in
another reduction order, through AdamW, which divides by sqrt(v)); the measured figures print."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from treegrpo_ray import builders
from treegrpo_ray.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]  # 4 x 3 = 12 decisions


def _update(rank: int, world: int, tiny_dir: str, out: str, port: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    os.chdir(ROOT)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config("configs/smoke.yaml", [f"model.pretrained={tiny_dir}", "prompts_per_iteration=4",
                                             "learner.lr=1e-3", *overrides])
    policy = builders.build_policy(cfg)
    batch = builders.build_sampler(cfg, policy).sample(PROMPTS, window_start=0, seed=7)  # the same on every rank
    leaf_adv = torch.linspace(-1.0, 1.0, batch.leaf_prompt.numel())
    module = torch.nn.parallel.DistributedDataParallel(policy.denoiser) if world > 1 else None
    learner = builders.build_learner(cfg, policy, module=module, rank=rank, world_size=world)
    metrics = learner.update(batch, leaf_adv, 0)
    if rank == 0:
        torch.save({"state": {k: v.detach().clone() for k, v in policy.live_state().items()},
                    "grad_norm": metrics["learner/grad_norm"]}, out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_workers_with_micro_batches_equal_one_worker_on_whole_minibatches(tiny_sd3_dir, tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    ctx = mp.get_context("spawn")
    ref = ctx.Process(target=_update, args=(0, 1, str(tiny_sd3_dir), one, 0, ["learner.minibatches=2"]))
    ref.start()
    ref.join(300)
    # 12 decisions / 2 ranks / 2 minibatches = 3 rows per rank and step, in micro-batches of 2 and 1
    mp.start_processes(_update, args=(2, str(tiny_sd3_dir), two, _free_port(),
                                      ["learner.minibatches=2", "learner.micro_batch=2", "learner.workers=2"]),
                       nprocs=2, join=True, start_method="spawn")
    assert ref.exitcode == 0
    a, b = torch.load(one), torch.load(two)
    base = load_state_before(tiny_sd3_dir)
    moved = max(float((a["state"][k] - base[k]).abs().max()) for k in base)
    diff = max(float((a["state"][k] - b["state"][k]).abs().max()) for k in base)
    print(f"update's largest move {moved:.3e}; DDP 2 workers x micro-batches vs 1 worker: max |diff| {diff:.3e}, "
          f"grad norm {b['grad_norm']:.6f} vs {a['grad_norm']:.6f}")
    assert moved > 0
    assert diff <= 1e-3 * moved  # AdamW divides by sqrt(v): elements with ~0 gradient amplify reduction-order noise
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def load_state_before(tiny_dir) -> dict[str, torch.Tensor]:
    cfg = load_config("configs/smoke.yaml", [f"model.pretrained={tiny_dir}"])
    return {k: v.detach().clone() for k, v in builders.build_policy(cfg).live_state().items()}
