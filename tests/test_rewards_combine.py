"""Multi-reward arithmetic by hand, non-finite drops, bad input, and RewardModel assembly."""
from __future__ import annotations

import pytest
import torch

from tests.rewards_fixtures import TINY_CLIP_CFG, random_images, save_hps_style, tiny_clip, tiny_vae
from treegrpo_ray.algo.advantages import finite_mask, leaf_advantages
from treegrpo_ray.rewards import REWARD_KINDS, JpegCompressibility, RewardModel, build_reward_model

torch.set_num_threads(1)

# Two prompts, two leaves each.
IDS = torch.tensor([0, 0, 1, 1])
RAW = {"a": torch.tensor([1.0, 3.0, 2.0, 2.0]), "b": torch.tensor([0.0, 2.0, 5.0, 1.0])}
W = {"a": 1.0, "b": 0.5}


def test_raw_mode_by_hand():
    # r = a + 0.5 b = [1 + 0, 3 + 1, 2 + 2.5, 2 + 0.5] = [1, 4, 4.5, 2.5]
    # prompt 0: mean 2.5, population std 1.5 -> [-1, 1]; prompt 1: mean 3.5, std 1 -> [1, -1]
    adv, m = leaf_advantages(RAW, W, IDS, mode="raw", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    assert m["reward/combined/mean"] == pytest.approx(3.0)       # (1 + 4 + 4.5 + 2.5) / 4
    assert m["reward/a/mean"] == pytest.approx(2.0) and m["reward/b/max"] == pytest.approx(5.0)
    assert m["reward/dropped"] == 0.0
    # eps = 1e-4: -1.5 / (1.5 + 1e-4) = -0.99993334
    adv, _ = leaf_advantages(RAW, W, IDS, mode="raw", eps=1e-4)
    assert float(adv[0]) == pytest.approx(-1.5 / 1.5001, abs=1e-7)


def test_advantage_mode_by_hand():
    # a per prompt: [1, 3] -> [-1, 1]; [2, 2] has zero spread -> [0, 0]
    # b per prompt: [0, 2] -> [-1, 1]; [5, 1] -> [1, -1]
    # A = 1 * [-1, 1, 0, 0] + 0.5 * [-1, 1, 1, -1] = [-1.5, 1.5, 0.5, -0.5]
    adv, _ = leaf_advantages(RAW, W, IDS, mode="advantage", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.5, 1.5, 0.5, -0.5]))
    # clip = 1 applies to the sum: [-1, 1, 0.5, -0.5]
    adv, _ = leaf_advantages(RAW, W, IDS, mode="advantage", eps=0.0, clip=1.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.5, -0.5]))
    # the modes differ: raw mode gave prompt 1 [1, -1], here it is [0.5, -0.5]


def test_nonfinite_leaf_is_counted_and_dropped():
    raw = {"a": torch.tensor([1.0, float("nan"), 2.0, 4.0, 6.0]), "b": torch.tensor([0.0, 1.0, float("inf"), 1.0, 3.0])}
    ids = torch.tensor([0, 0, 1, 1, 1])
    adv, m = leaf_advantages(raw, {"a": 1.0, "b": 1.0}, ids, mode="raw", eps=0.0)
    # leaf 1 (a NaN) and leaf 2 (b inf) dropped. Prompt 0 keeps one leaf -> 0.
    # prompt 1 keeps leaves 3, 4 with r = [4 + 1, 6 + 3] = [5, 9] -> mean 7, std 2 -> [-1, 1]
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, 0.0, -1.0, 1.0]))
    assert m["reward/a/nonfinite"] == 1.0 and m["reward/b/nonfinite"] == 1.0 and m["reward/dropped"] == 2.0
    assert torch.isfinite(adv).all()
    mask, _ = finite_mask(raw)
    assert mask.tolist() == [True, False, False, True, True]
    # everything dropped -> all-zero advantages, no NaN
    adv, m = leaf_advantages({"a": torch.full((3,), float("nan"))}, {"a": 1.0}, torch.zeros(3, dtype=torch.long))
    assert adv.tolist() == [0.0, 0.0, 0.0] and m["reward/dropped"] == 3.0


def test_combine_bad_input():
    with pytest.raises(ValueError, match=r"known rewards: \['a', 'b'\]"):
        leaf_advantages({**RAW, "hps": RAW["a"]}, W, IDS)
    with pytest.raises(ValueError, match="missing from the scores"):
        leaf_advantages({"a": RAW["a"]}, W, IDS)
    with pytest.raises(ValueError, match="shape"):
        leaf_advantages({"a": RAW["a"][:3], "b": RAW["b"]}, W, IDS)
    with pytest.raises(ValueError, match="mode"):
        leaf_advantages(RAW, W, IDS, mode="sum")
    with pytest.raises(ValueError, match="non-empty"):
        leaf_advantages({"a": torch.zeros(0)}, {"a": 1.0}, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        leaf_advantages(RAW, {"a": 1.0, "b": float("nan")}, IDS)


def test_scorer_bad_input():
    s = JpegCompressibility()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        s(torch.zeros(2, 1, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="empty batch"):
        s(torch.zeros(0, 3, 8, 8), [])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        s(torch.zeros(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[-1, 1\] image"):
        s(torch.full((1, 3, 8, 8), -0.5), ["a"])
    with pytest.raises(ValueError, match="floating point"):
        s(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"])
    with pytest.raises(ValueError, match="list of strings"):
        s(torch.zeros(1, 3, 8, 8), "a")


def test_build_reward_model_and_score_latents(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "pipe" / "vae")
    ckpt = save_hps_style(tiny_clip(), tmp_path / "hps.pt")
    specs = [{"name": "jpeg_compressibility", "weight": 0.5},
             {"name": "hpsv2", "weight": 1.0, "checkpoint": str(ckpt), "config": TINY_CLIP_CFG, "version": "v2.1",
              "model_name": None}]                              # None-valued fields are ignored
    rm = build_reward_model(specs, tmp_path / "pipe", "cpu")
    assert rm.names == ["jpeg_compressibility", "hpsv2"] and rm.weights == {"jpeg_compressibility": 0.5, "hpsv2": 1.0}
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))   # -> 32x32 images
    latents[2, 0, 0, 0] = float("nan")
    prompts = ["a", "b", "a"]
    scores, seconds = rm.score_latents_timed(latents, prompts)
    images = rm.decoder.decode(latents)
    torch.testing.assert_close(scores["jpeg_compressibility"][:2], JpegCompressibility()(images[:2], prompts[:2]))
    assert torch.isnan(scores["hpsv2"][2]) and torch.isnan(scores["jpeg_compressibility"][2])
    assert list(seconds) == ["decode", "jpeg_compressibility", "hpsv2"] and min(seconds.values()) > 0
    adv, m = leaf_advantages(scores, rm.weights, torch.tensor([0, 1, 0]))
    assert torch.isfinite(adv).all() and m["reward/dropped"] == 1.0
    with pytest.raises(ValueError, match="2 prompts for latents"):
        rm.score_latents(latents, prompts[:2])


def test_build_reward_model_errors(tmp_path):
    with pytest.raises(ValueError, match="known rewards") as e:
        build_reward_model([{"name": "aesthetics"}], None)
    assert all(k in str(e.value) for k in REWARD_KINDS)
    with pytest.raises(ValueError, match=r"does not take \['version'\]"):
        build_reward_model([{"name": "jpeg_compressibility", "version": "v2.1"}], None)
    with pytest.raises(ValueError, match="configured twice"):
        build_reward_model([{"name": "jpeg_compressibility"}, {"name": "jpeg_compressibility"}], None)
    rm = build_reward_model([{"name": "jpeg_incompressibility"}], None)
    with pytest.raises(ValueError, match="no decoder"):
        rm.score_latents(torch.zeros(1, 4, 8, 8), ["a"])
    with pytest.raises(ValueError, match="weights name"):
        RewardModel(None, {"a": JpegCompressibility()}, {"b": 1.0})


def test_score_images_without_decoder():
    rm = RewardModel(None, {"jpeg_compressibility": JpegCompressibility()})
    out = rm.score_images(random_images(2), ["a", "b"])
    assert set(out) == {"jpeg_compressibility"} and out["jpeg_compressibility"].shape == (2,)
    assert rm.weights == {"jpeg_compressibility": 1.0}             # default weight 1 per scorer
