"""SD3.5's architecture (issue 13, first family): a tiny pipeline with SD3.5-medium's layers
(MMDiT-X dual attention in every block, RMS q/k norm, a T5 encoder, shift-3 scheduler), saved with
`save_pretrained` and loaded back through the production `from_pretrained` path, through the
sampler, the learner and the export plain diffusers loads. Also: gradient checkpointing gives
the plain gradients."""
import json

import pytest
import torch

from tools.tiny_pipelines import save_tiny_sd3
from treegrpo_ray import driver
from treegrpo_ray.algo.sde import flow_sde_step
from treegrpo_ray.algo.tree import count_nfe
from treegrpo_ray.config import load_config
from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.sampling.tree_sampler import TreeSampler

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square and a green triangle"]


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd35"), seed=0, sd35=True)


def load(path, **kw):
    return DiffusionPolicy.from_pretrained(path, max_sequence_length=8, **kw)


def test_the_saved_pipeline_has_sd35s_layers(sd35_dir):
    cfg = json.loads((sd35_dir / "transformer" / "config.json").read_text())
    assert cfg["dual_attention_layers"] == [0, 1] and cfg["qk_norm"] == "rms_norm"
    assert json.loads((sd35_dir / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    policy = load(sd35_dir)
    assert type(policy.pipeline.text_encoder_3).__name__ == "T5EncoderModel"      # T5 loaded, not padded
    block = policy.denoiser.transformer_blocks[0]
    assert block.attn2 is not None and type(block.attn.norm_q).__name__ == "RMSNorm"
    embeds, _ = policy.prompts.encode(["a red circle", "a blue square"])
    assert embeds.shape[1] == 77 + 8                                              # CLIP tokens + T5 tokens
    t5_rows = embeds[:, 77:]
    assert (t5_rows[0] - t5_rows[1]).abs().max() > 0                             # the T5 half depends on the prompt


def test_tree_sampling_rescoring_and_nfe(sd35_dir):
    policy = load(sd35_dir)
    sampler = TreeSampler(policy, variant="tree", num_steps=6, k=2, depth=2, noise_level=0.7)
    batch = sampler.sample(PROMPTS, window_start=1, seed=0)
    assert batch.nfe == len(PROMPTS) * count_nfe(6, 2, 2, 1)                     # 2 x (1 + 3 + 4 x 3) = 32
    sig, sig_next = batch.sigmas[batch.step_index], batch.sigmas[batch.step_index + 1]
    prompts = [batch.prompts[i] for i in batch.decision_prompt.tolist()]
    with torch.no_grad():
        v = policy.predict(batch.latents, sig, prompts)
    again = flow_sde_step(batch.latents, v, sig, sig_next, 0.7, prev_sample=batch.children).log_prob
    # the learner's batch of decisions differs from the sampler's batches: equal to float32 rounding
    torch.testing.assert_close(again, batch.old_log_probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_plain_gradients(sd35_dir, lora_rank):
    grads = []
    for checkpointing in (False, True):
        policy = load(sd35_dir, lora_rank=lora_rank)
        if checkpointing:
            policy.denoiser.enable_gradient_checkpointing()
        policy.denoiser.train()  # diffusers checkpoints only when grad is enabled (training)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((2, *policy.latent_shape), generator=gen)
        v = policy.predict(x, torch.tensor([0.9, 0.4]), PROMPTS)
        v.square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-8)


def test_a_short_run_trains_and_exports_what_plain_diffusers_loads(sd35_dir, tmp_path):
    cfg = load_config("configs/smoke.yaml", [
        f"model.pretrained={sd35_dir}", "model.max_sequence_length=8", "prompts=configs/prompts/example_prompts.txt",
        "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={tmp_path}", "tracking.run_name=r",
        "tracking.progress=false", "mode=local", "learner.gradient_checkpointing=true", "learner.lr=1e-3"])
    summary = driver.run(cfg)
    assert summary["iterations"] == 2
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    base = StableDiffusion3Pipeline.from_pretrained(sd35_dir)
    trained = StableDiffusion3Pipeline.from_pretrained(sd35_dir, transformer=SD3Transformer2DModel.from_pretrained(
        tmp_path / "r" / "export", subfolder="transformer"))
    assert trained.transformer.config.dual_attention_layers == [0, 1]

    def image(pipe):
        return pipe(prompt="a red circle", num_inference_steps=2, height=16, width=16, output_type="pt",
                    max_sequence_length=8, generator=torch.Generator().manual_seed(0)).images
    before, after = image(base), image(trained)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 0      # the update reached the export
