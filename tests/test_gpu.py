"""GPU-only checks (`-m gpu`), skipped without CUDA (tests/conftest.py); scripts/gpu_check.sh runs
them on the user's GPU machine. They have NOT run on this project's CPU-only machines."""
import pytest
import torch

from tools.tiny_pipelines import save_tiny, save_tiny_sd3
from treegrpo_ray.config import load_config
from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.sampling.tree_sampler import TreeSampler

pytestmark = pytest.mark.gpu
PROMPTS = ["a red circle", "a blue square and a green triangle"]


@pytest.mark.parametrize("family", ["sd35", "flux", "sd15", "qwenimage"])
def test_bf16_on_cuda_rescoring_error(tmp_path, family):
    path = save_tiny_sd3(tmp_path, sd35=True) if family == "sd35" else save_tiny(family, tmp_path)
    policy = DiffusionPolicy.from_pretrained(path, dtype="bfloat16", device="cuda", max_sequence_length=8,
                                             resolution=16)
    noise = 1.0 if family == "sd15" else 0.7
    batch = TreeSampler(policy, num_steps=6, k=3, depth=2, noise_level=noise).sample(PROMPTS * 4, window_start=1,
                                                                                     seed=0)
    s, s_next = batch.sigmas[batch.step_index], batch.sigmas[batch.step_index + 1]
    prompts = [batch.prompts[i] for i in batch.decision_prompt.tolist()]
    ratios = []
    for rows in torch.arange(batch.num_decisions).split(3):  # the learner's micro-batches, not the tree levels
        with torch.no_grad():
            out = policy.predict(batch.latents[rows], s[rows], [prompts[i] for i in rows.tolist()])
        new = policy.sde_step(batch.latents[rows].cuda(), out, s[rows], s_next[rows], noise,
                              prev_sample=batch.children[rows])
        ratios.append((new.log_prob.cpu() - batch.old_log_probs[rows]).exp())
    err = (torch.cat(ratios) - 1).abs().max().item()
    print(f"GPU {family} bf16 start-of-update |ratio - 1| max = {err:.3e}")
    assert err <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="learner.strategy=fsdp over NCCL: one rank per GPU, 2 GPUs (CPU/gloo: tests/test_fsdp.py)")
def test_fsdp_learner_trains_through_ray(tmp_path, ray_local):
    from treegrpo_ray import driver

    # every pool on a share of the 2 GPUs (model.device=cuda needs each pool to ask for one)
    cfg = load_config("configs/smoke.yaml", [
        f"tracking.output_dir={tmp_path}", "tracking.run_name=fsdp", "tracking.progress=false", "model.device=cuda",
        "learner.workers=2", "learner.strategy=fsdp", "learner.resources.num_gpus=0.5", "pools.sampler.num_gpus=0.5",
        "pools.reward.num_gpus=0.25", "model.dtype=bfloat16"])
    summary = driver.run(cfg)
    assert summary["iterations"] == 2 and all(r == r for r in summary["train_rewards"])
