"""HPSv2 and CLIPScore on tiny open_clip configs: checkpoint formats, HF-cache lookup, error
messages, preprocessing against open_clip's own PIL transform, and the scoring formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image

from tests.rewards_fixtures import (PROMPTS, TINY_CLIP_CFG, random_images, save_hps_style, save_safetensors,
                                    tiny_clip, write_config)
from treegrpo_ray.rewards.open_clip_loader import load_state_dict, preprocess_images
from treegrpo_ray.rewards.scorers import ClipScoreScorer, HPSv2Scorer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    model = tiny_clip(seed=0)
    return {"model": model, "pt": save_hps_style(model, d / "HPS_v2.1_compressed.pt"),
            "st": save_safetensors(model, d / "open_clip_model.safetensors"),
            "cfg_json": write_config(d / "open_clip_config.json"),
            "cfg_wrapped": write_config(d / "wrapped.json", wrapped=True)}


def reference_hps(model, images, prompts):
    """hpsv2's formula on open_clip's own forward: diag(image_features @ text_features.T) with the
    model's (already L2-normalised) dict outputs; preprocessing from our tensor transform."""
    import open_clip

    x = preprocess_images(images, (32, 32), torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD))
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(prompts)
    model.output_dict = True
    with torch.no_grad():
        out = model(x, tokens)
    return torch.diagonal(out["image_features"] @ out["text_features"].T)


def test_hps_module_prefixed_pt_matches_open_clip_forward(ckpts):
    images = random_images(4, 40, 48)                      # non-square: resize short side 40 -> 32, crop 48 -> 38 -> 32
    scorer = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG, batch_size=3)   # 3 + 1: two chunks
    scores = scorer(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference_hps(ckpts["model"], images, PROMPTS), atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1.0 + 1e-6                  # a cosine, no logit scale
    # rows 0 and 2 are the same prompt; their scores differ only through the image
    assert scores[0] != scores[2]


def test_text_features_do_not_depend_on_the_other_prompts_in_the_call(ckpts):
    # a restarted reward actor scores a chunk whose prompt mix differs from its first life's
    scorer = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG)
    alone = torch.stack([scorer.clip.text_features([p])[0] for p in PROMPTS])
    fresh = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG)
    assert torch.equal(fresh.clip.text_features(PROMPTS[::-1]).flip(0), alone)


def test_hps_loads_the_weights_not_a_random_init(ckpts):
    images = random_images(4)
    a = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG)(images, PROMPTS)
    other = tiny_clip(seed=1)                               # same architecture, different weights
    b = reference_hps(other, images, PROMPTS)
    assert (a - b).abs().max() > 1e-3


def test_safetensors_and_json_configs_give_same_scores(ckpts):
    images = random_images(4)
    ref = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG)(images, PROMPTS)
    for cfg in (ckpts["cfg_json"], ckpts["cfg_wrapped"], str(ckpts["cfg_json"])):
        got = HPSv2Scorer(ckpts["st"], model_config=cfg)(images, PROMPTS)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_hps_found_in_hf_cache(ckpts, tmp_path):
    # Layout huggingface_hub uses: <cache>/models--xswu--HPSv2/{refs/main, snapshots/<rev>/<file>}
    repo = tmp_path / "models--xswu--HPSv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_hps_style(ckpts["model"], snap / "HPS_v2_compressed.pt")
    images = random_images(2)
    got = HPSv2Scorer(None, version="v2.0", model_config=TINY_CLIP_CFG, hf_cache_dir=tmp_path)(images, PROMPTS[:2])
    torch.testing.assert_close(got, reference_hps(ckpts["model"], images, PROMPTS[:2]), atol=1e-5, rtol=0)


def test_missing_hps_checkpoint_says_which_file_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        HPSv2Scorer(None, version="v2.1", model_config=TINY_CLIP_CFG, hf_cache_dir=tmp_path)
    msg = str(e.value)
    assert "HPS_v2.1_compressed.pt" in msg and "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt" in msg
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        HPSv2Scorer(tmp_path / "nope.pt", model_config=TINY_CLIP_CFG)
    with pytest.raises(ValueError, match="v2.0"):
        HPSv2Scorer(tmp_path / "nope.pt", version="v3", model_config=TINY_CLIP_CFG)
    with pytest.raises(FileNotFoundError, match="CLIPScore checkpoint"):
        ClipScoreScorer(None, model_config=TINY_CLIP_CFG)


class _NotATensor:
    pass


def test_pickles_with_objects_are_refused(tmp_path, ckpts):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": ckpts["model"].state_dict(), "payload": _NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_state_dict(tmp_path / "weights.npz")


def test_architecture_mismatch_is_a_clear_error(ckpts):
    bigger = {**TINY_CLIP_CFG, "embed_dim": 24}
    with pytest.raises(ValueError, match="does not match the open_clip architecture"):
        HPSv2Scorer(ckpts["pt"], model_config=bigger)


def test_preprocessing_matches_open_clip_pil_transform():
    # hpsv2 / open_clip inference preprocessing: PIL bicubic resize of the short side, center crop,
    # ToTensor, normalise. Ours runs on tensors; the gap is PIL's uint8 rounding after the resize
    # (<= 0.5/255) plus PIL-vs-torch antialiased bicubic (~0.5/255): bound it at 1.5/255 in pixels.
    std = torch.tensor(OPENAI_DATASET_STD)
    for h, w, size in ((40, 48, 32), (48, 40, 32), (20, 20, 32), (100, 130, 64)):
        img = (random_images(1, h, w, seed=h) * 255).round() / 255        # exactly representable in uint8
        pil = Image.fromarray(np.ascontiguousarray((img[0].permute(1, 2, 0) * 255).round().byte().numpy()))
        ref = image_transform(size, is_train=False)(pil)                   # (3, size, size)
        ours = preprocess_images(img, (size, size), torch.tensor(OPENAI_DATASET_MEAN), std)[0]
        assert ours.shape == ref.shape
        assert float(((ours - ref) * std.view(3, 1, 1)).abs().max()) <= 1.5 / 255


def test_clipscore_formula(ckpts):
    images = random_images(8)
    prompts = PROMPTS + ["a yellow circle", "dog", "night sky", "two cats"]   # some pairs have cos < 0 (asserted below)
    raw = ClipScoreScorer(ckpts["st"], model_config=TINY_CLIP_CFG, raw_cosine=True)(images, prompts)
    clip = ClipScoreScorer(ckpts["st"], model_config=TINY_CLIP_CFG)(images, prompts)
    # CLIPScore = 2.5 * max(cos, 0); e.g. cos = 0.3 -> 0.75, cos = -0.2 -> 0
    torch.testing.assert_close(clip, 2.5 * raw.clamp(min=0), atol=1e-6, rtol=0)
    # same weights, so the raw cosine is exactly the HPS-style score
    torch.testing.assert_close(raw, reference_hps(ckpts["model"], images, prompts), atol=1e-5, rtol=0)
    assert (raw < 0).any() and (raw > 0).any(), "test images should exercise both branches of max(cos, 0)"


def test_bf16_model_dtype_path(ckpts):
    # the dtype a GPU user picks; scores stay float32 and close to the float32 model's
    images = random_images(4)
    ref = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG)(images, PROMPTS)
    got = HPSv2Scorer(ckpts["pt"], model_config=TINY_CLIP_CFG, dtype=torch.bfloat16)(images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.03, rtol=0)
