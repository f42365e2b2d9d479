"""The shipped miniature assets load offline through the real loaders and behave as documented."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from treegrpo_ray.miniature import (ASSETS_DIR, GUIDANCE_SCALE, MAX_SEQUENCE_LENGTH, PIPELINE_DIR,  # noqa: E402
                              REWARD_DIR, world)
from treegrpo_ray.miniature.reward import MiniatureReward  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reward():
    return MiniatureReward.from_dir(REWARD_DIR)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_assets_present_and_small():
    for rel in ("pipeline/model_index.json", "reward/open_clip_config.json",
                "reward/open_clip_model.safetensors", "reward/world.json", "MODEL_CARD.md"):
        assert os.path.isfile(os.path.join(ASSETS_DIR, rel)), rel
    total = sum(os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(ASSETS_DIR) for f in files)
    assert total <= 25 * 2**20


def test_world_json_matches_code():
    with open(os.path.join(REWARD_DIR, "world.json")) as f:
        spec = json.load(f)
    assert spec == json.loads(json.dumps(world.world_spec()))


def test_pipeline_loads_offline_and_generates(pipe):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert pipe.transformer.config.sample_size == 16 and pipe.vae_scale_factor == 2
    assert pipe.tokenizer.model_max_length == 20
    out = pipe(prompt=world.split_prompts()[1][:2], num_inference_steps=2, guidance_scale=GUIDANCE_SCALE,
               max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    images = out.images
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()


def test_text_conditioning_distinct_per_prompt(pipe):
    prompts = world.all_prompts()
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert embeds.shape == (144, 20 + MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    flat = pooled.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(len(prompts)) * 1e3
    assert dist.min() > 1e-3  # no two prompts share a pooled embedding


def test_reward_separates_matching_from_shuffled(reward):
    _, held = world.split_prompts()
    prompts = held * 2
    images = world.render_batch(prompts, torch.Generator().manual_seed(99))
    r = reward(images, prompts)
    assert r.shape == (48,) and r.dtype == torch.float32
    assert r.min() >= 0 and r.max() <= 1
    # a right-shifted prompt list pairs each image with another held-out prompt
    wrong = reward(images, prompts[1:] + prompts[:1])
    assert r.mean() > 0.8
    assert wrong.mean() < 0.1
    assert (r > wrong).float().mean() > 0.9


def test_reward_rejects_prompts_outside_the_world(reward):
    with pytest.raises(KeyError):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])


def test_reward_resizes_larger_images(reward):
    prompt = world.split_prompts()[1][0]
    img = world.render(prompt)[None]                           # (1, 3, 32, 32)
    big = torch.nn.functional.interpolate(img, scale_factor=2, mode="nearest")  # (1, 3, 64, 64)
    assert reward(big, [prompt]).item() == pytest.approx(reward(img, [prompt]).item(), abs=0.05)


def test_probe_starts_from_the_build_evaluation_and_moves_the_model():
    """tools/miniature/probe.py at step 0 scores the held-out prompts exactly as the build's own
    evaluation did (same pipeline call, seed and images: MODEL_CARD.md's base-model row), and two
    fine-tuning steps change what it samples."""
    from tools.miniature.probe import probe

    with open(os.path.join(ASSETS_DIR, "build.json")) as f:
        built = json.load(f)["evaluation"]["held_out"]["base_model"]["reward_mean"]
    rows = probe(ASSETS_DIR, checkpoints=[0, 2], lr=1e-3, sets=("held_out",))  # train16 too: 40% longer
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["held_out"] == pytest.approx(built, abs=1e-5)
    assert abs(rows[1]["held_out"] - rows[0]["held_out"]) > 1e-4
    assert all(0 <= r["held_out"] <= 1 for r in rows)
