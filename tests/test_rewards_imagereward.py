"""ImageReward on transformers' BLIP classes equals the `image-reward` package's own code: a tiny
random ImageReward built by the package's classes and saved as the released checkpoint is, and
the package's scores on it, recorded by tools/imagereward_reference.py (tests/data/imagereward/;
the package cannot be installed beside our stack). Plus its bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.rewards_fixtures import random_images
from treegrpo_ray.rewards.files import locate
from treegrpo_ray.rewards.imagereward import ImageRewardScorer, text_config
from treegrpo_ray.rewards.open_clip_loader import preprocess_images

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data" / "imagereward"


def tiny_configs():
    from transformers.models.blip import BlipVisionConfig
    t = json.loads((DATA / "configs.json").read_text())
    vision = BlipVisionConfig(hidden_size=t["vision_width"], intermediate_size=4 * t["vision_width"],
                              num_hidden_layers=t["vision_layers"], num_attention_heads=t["vision_heads"],
                              image_size=t["image_size"], patch_size=t["patch_size"], hidden_act="gelu",
                              layer_norm_eps=1e-6, attention_dropout=0.0)
    return vision, text_config(42, hidden=t["text_hidden"], layers=t["text_layers"], heads=t["text_heads"],
                               intermediate=t["text_intermediate"], encoder_width=t["vision_width"])


@pytest.fixture(scope="module")
def scorer():
    return ImageRewardScorer(DATA / "ImageReward.pt", processor=DATA / "vocab", configs=tiny_configs(), batch_size=2)


@pytest.fixture(scope="module")
def cases():
    return torch.load(DATA / "cases.pt", weights_only=True)


def test_tokens_and_forward_equal_the_package(scorer, cases):
    ids, mask = scorer.tokens(cases["prompts"])
    assert torch.equal(ids, cases["ids"]) and torch.equal(mask, cases["mask"])  # [CLS] .. [SEP] [PAD]; one truncated
    assert int(mask[2].sum()) == 35
    with torch.no_grad():
        got = scorer.model(cases["pixels"], ids, mask)
    torch.testing.assert_close(got, cases["score_gard"], atol=1e-5, rtol=0)   # the package's score_gard, batched
    assert got.std() > 0.1                                                  # prompts and images tell apart


def test_scores_of_images_match_the_packages_pil_path(scorer, cases):
    # The package scores PIL images (PIL's bicubic on uint8); we score tensors (torch's antialiased
    # bicubic). Image 2 is 32 x 32, the model's size, so nothing is resampled: the whole path,
    # from pixels to score, is the package's to float precision.
    images = [im[..., :3].permute(2, 0, 1).float() / 255 for im in cases["images"]]  # RGBA: alpha dropped, as .convert("RGB")
    got = torch.cat([scorer(x[None], [p]) for x, p in zip(images, cases["prompts"])])
    ref = cases["score_pil"]
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=0)
    # Resampled RGB images differ only by the resampler: per pixel, on these uniform-noise images
    # (the hardest case), at most 12/255 and 0.4/255 on average (measured 11.8 and 0.37). Image 4
    # is RGBA, which PIL resamples alpha-premultiplied: not comparable, and our images are RGB
    # tensors from the VAE. The package's own pixels through our model give its score() to float
    # precision.
    for i, x in enumerate(images[:4]):
        ours = preprocess_images(x[None], (32, 32), scorer.mean, scorer.std)[0] * scorer.std.view(3, 1, 1)
        diff = (ours - cases["pixels"][i] * scorer.std.view(3, 1, 1)).abs()
        assert float(diff.max()) <= 12 / 255 and float(diff.mean()) <= 0.4 / 255, (i, float(diff.max()) * 255)
    ids, mask = scorer.tokens(cases["prompts"])
    with torch.no_grad():
        one_by_one = torch.cat([scorer.model(cases["pixels"][i:i + 1], ids[i:i + 1], mask[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(one_by_one, ref, atol=1e-5, rtol=0)


def test_bad_inputs(scorer, tmp_path):
    images = random_images(3)
    images[2, 1, 0, 0] = float("nan")
    assert scorer(images, ["a red cat", "a dog", "photo"]).isnan().tolist() == [False, False, True]
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        scorer(images * 2 - 1, ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="(?s)ImageReward checkpoint.*hf download THUDM/ImageReward ImageReward.pt"):
        locate("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"))
    with pytest.raises(FileNotFoundError, match="(?s)tokenizer \\(bert-base-uncased\\).*not in the Hugging Face cache"):
        locate("imagereward", checkpoint=str(DATA / "ImageReward.pt"), hf_cache_dir=tmp_path)
    state = torch.load(DATA / "ImageReward.pt", weights_only=True)
    torch.save({**state, "blip.extra.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint: 1 unknown keys"):
        ImageRewardScorer(tmp_path / "other.pt", processor=DATA / "vocab", configs=tiny_configs())
    vision, text = tiny_configs()
    vision.num_hidden_layers = 3                                            # the file has 2 ViT blocks
    with pytest.raises(ValueError, match="does not fit ImageReward's architecture"):
        ImageRewardScorer(DATA / "ImageReward.pt", processor=DATA / "vocab", configs=(vision, text))
