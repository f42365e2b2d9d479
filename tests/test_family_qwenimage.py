"""Qwen-Image (issue 36), on the tiny QwenImagePipeline of tools/tiny_pipelines.py: what differs from
the other families is held against diffusers' own pipeline here (the variable-length Qwen2.5-VL
prompt embeddings, true CFG with the " " negative prompt and its norm rescale, the one-frame 3-D
VAE); re-scoring, NFE, bf16 and the train-and-export test run in tests/test_families.py's
parametrisations."""

import pytest
import torch

from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.models.families.flux import pack, unpack
from treegrpo_ray.models.families.qwenimage import norm_rescaled_cfg
from treegrpo_ray.sampling.evaluate import ode_sample

torch.set_num_threads(1)
# prompt lengths after the template: 16 and 20 tokens, " " 14: every batch below is padded and masked
PROMPTS = ["a red circle", "a blue square and a green triangle"]


@pytest.fixture(scope="module")
def qwen_dir(tiny_family_pipelines):
    return tiny_family_pipelines["qwenimage"]


@pytest.fixture(scope="module")
def plain_pipe(qwen_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(path, **kw):
    return DiffusionPolicy.from_pretrained(path, max_sequence_length=64, resolution=16, **kw)


def test_the_family_is_chosen_and_encodes_padded_prompts_with_a_mask(qwen_dir, plain_pipe):
    policy = load(qwen_dir, true_cfg_scale=4.0)
    assert type(policy.family).__name__ == "QwenImageFamily" and policy.latent_shape == (4, 8, 8)
    assert policy.vae_scale_factor == plain_pipe.vae_scale_factor == 2    # 2**len(temperal_downsample)
    embeds, mask = policy.prompts.encode(PROMPTS + [" "])                  # (3, 64, 16), (3, 64)
    assert embeds.shape == (3, 64, 16) and mask.sum(dim=1).tolist() == [16, 20, 14]
    theirs, their_mask = plain_pipe.encode_prompt(PROMPTS, max_sequence_length=64)  # padded to the longest, 20
    assert their_mask.sum(dim=1).tolist() == [16, 20]
    torch.testing.assert_close(embeds[:2, :20], theirs, rtol=0, atol=1e-6)
    assert embeds[:, 20:].abs().max() == 0 and embeds[0, 16:].abs().max() == 0


def test_norm_rescaled_cfg_by_hand():
    # one 2x2 patch of one channel = one token of 4 values.
    # uncond = 0, cond = (1, 0, 0, 0), g = 3: comb = (3, 0, 0, 0), ||cond|| = 1, ||comb|| = 3
    # -> comb * 1/3 = (1, 0, 0, 0): the rescale undoes the guidance's growth in norm.
    # uncond = (0, 1, 0, 0): comb = (3, -2, 0, 0), ||comb|| = sqrt(13) -> (3, -2, 0, 0) / sqrt(13)
    cond = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2)
    torch.testing.assert_close(norm_rescaled_cfg(torch.zeros_like(cond), cond, 3.0), cond)
    uncond = torch.tensor([0.0, 1, 0, 0]).view(1, 1, 2, 2)
    expected = torch.tensor([3.0, -2, 0, 0]).view(1, 1, 2, 2) / 13 ** 0.5
    torch.testing.assert_close(norm_rescaled_cfg(uncond, cond, 3.0), expected)
    # the norm runs over a whole packed token (4C values), never across tokens
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = pack(norm_rescaled_cfg(x, y, 4.0))
    torch.testing.assert_close(out.norm(dim=-1), pack(y).norm(dim=-1))


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_ode_sampling_equals_the_plain_diffusers_pipeline(qwen_dir, plain_pipe, true_cfg):
    # Our sampler's deterministic path (dynamic-shift schedule, padded prompt embeddings cut to the
    # batch's longest, [uncond; cond] in one call, the norm-rescaled true CFG) against
    # QwenImagePipeline.__call__ from the same initial latents (two calls per step with CFG).
    policy = load(qwen_dir, true_cfg_scale=true_cfg)
    ours = ode_sample(policy, PROMPTS, num_steps=4, seed=0)
    x0 = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))  # ode_sample's noise
    extra = {"negative_prompt": [" "] * 2} if true_cfg > 1 else {}
    theirs = plain_pipe(prompt=PROMPTS, latents=pack(x0), true_cfg_scale=true_cfg, num_inference_steps=4, height=16,
                        width=16, max_sequence_length=64, output_type="latent", **extra).images
    theirs = unpack(theirs, 8, 8)
    assert theirs.abs().max() > 0.1
    err = (ours - theirs).abs().max().item()
    print(f"qwenimage true_cfg {true_cfg}: max |ours - diffusers| = {err:.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if true_cfg > 1:  # CFG changes the result: the comparison can fail
        plain = ode_sample(load(qwen_dir), PROMPTS, num_steps=4, seed=0)
        assert (ours - plain).abs().max() > 1e-3


def test_the_reward_side_decodes_as_the_pipeline_does(qwen_dir, plain_pipe):
    # rewards/decode.LatentDecoder picks AutoencoderKLQwenImage from the VAE's config, adds the
    # frame axis and undoes latents_mean / latents_std; against the pipeline's own decode
    # (output_type="pt") after 2 steps from the same latents.
    from treegrpo_ray.rewards.decode import LatentDecoder

    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(prompt=PROMPTS, true_cfg_scale=1.0, num_inference_steps=2, height=16, width=16, max_sequence_length=64)
    latents = unpack(plain_pipe(latents=pack(x0), output_type="latent", **kw).images, 8, 8)  # (2, 4, 8, 8)
    images = plain_pipe(latents=pack(x0), output_type="pt", **kw).images                     # (2, 3, 16, 16)
    decoder = LatentDecoder.from_pretrained(qwen_dir, batch_size=1)
    assert type(decoder.vae).__name__ == "AutoencoderKLQwenImage"
    ours = decoder.decode(latents)
    err = (ours - images).abs().max().item()
    print(f"qwenimage decode: max |ours - diffusers| = {err:.2e}")
    assert images.std() > 0.01
    torch.testing.assert_close(ours, images, rtol=0, atol=1e-6)
