"""The reward side of an iteration: decode leaf latents once, run every scorer, and build all of
it from flat reward specs (the config's reward list). No ray here: the reward actor is a thin
shell around `RewardModel`.

A spec is a flat mapping (or dataclass) with `name` (the reward kind, one of REWARD_KINDS),
`weight`, and that kind's options; None-valued fields are ignored, any other field the kind does
not take is an error:
    hpsv2:                  checkpoint, version ("v2.0" | "v2.1"), model_name, config, batch_size, hf_cache_dir
    clipscore:              checkpoint, model_name, config, w, raw_cosine, batch_size
    aesthetic:              checkpoint (the MLP head), clip_checkpoint, model_name, config, batch_size, hf_cache_dir
    pickscore:              checkpoint (PickScore_v1 directory), processor (directory), batch_size, hf_cache_dir
    imagereward:            checkpoint (ImageReward.pt), processor (bert-base-uncased directory), batch_size,
                            hf_cache_dir
    jpeg_compressibility:   quality, batch_size          (likewise jpeg_incompressibility)
    miniature:              checkpoint (the reward directory; default the shipped one), batch_size
`config` is a custom open_clip config (dict or JSON path) used instead of `model_name`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from treegrpo_ray.rewards.aesthetic import AestheticScorer
from treegrpo_ray.rewards.decode import LatentDecoder, load_decoder
from treegrpo_ray.rewards.imagereward import ImageRewardScorer
from treegrpo_ray.rewards.kinds import REWARD_KINDS, TAKES
from treegrpo_ray.rewards.pickscore import PickScoreScorer
from treegrpo_ray.rewards.scorers import (ClipScoreScorer, HPSv2Scorer, JpegCompressibility, JpegIncompressibility,
                                          MiniatureColourScorer, MiniatureScorer, Scorer,
                                          check_batch)
from treegrpo_ray.rewards.video import TEMPORAL_CONSISTENCY, frames_for_scoring, per_clip, temporal_consistency

# kind -> (scorer class, spec field -> constructor argument, takes device, takes dtype)
_KINDS = {
    "hpsv2": (HPSv2Scorer, {"checkpoint": "checkpoint", "version": "version", "model_name": "model_name",
                            "config": "model_config", "batch_size": "batch_size", "hf_cache_dir": "hf_cache_dir"},
              True, True),
    "clipscore": (ClipScoreScorer, {"checkpoint": "checkpoint", "model_name": "model_name", "config": "model_config",
                                    "w": "w", "raw_cosine": "raw_cosine", "batch_size": "batch_size",
                                    "hf_cache_dir": "hf_cache_dir"}, True, True),
    "aesthetic": (AestheticScorer, {"checkpoint": "checkpoint", "clip_checkpoint": "clip_checkpoint",
                                    "model_name": "model_name", "config": "model_config", "batch_size": "batch_size",
                                    "hf_cache_dir": "hf_cache_dir"}, True, True),
    "pickscore": (PickScoreScorer, {"checkpoint": "checkpoint", "processor": "processor", "batch_size": "batch_size",
                                    "hf_cache_dir": "hf_cache_dir"}, True, True),
    "imagereward": (ImageRewardScorer, {"checkpoint": "checkpoint", "processor": "processor",
                                        "batch_size": "batch_size", "hf_cache_dir": "hf_cache_dir"}, True, True),
    "jpeg_compressibility": (JpegCompressibility, {"quality": "quality", "batch_size": "batch_size"}, False, False),
    "jpeg_incompressibility": (JpegIncompressibility, {"quality": "quality", "batch_size": "batch_size"}, False, False),
    "miniature": (MiniatureScorer, {"checkpoint": "reward_dir", "batch_size": "batch_size"}, True, False),
    "miniature_colour": (MiniatureColourScorer, {"batch_size": "batch_size"}, False, False),
}
if set(_KINDS) != set(REWARD_KINDS):  # one list of names for config validation and for building
    raise ImportError(f"reward kinds disagree: built {sorted(_KINDS)}, configurable {sorted(REWARD_KINDS)}")
if any(set(TAKES[k]) - set(_KINDS[k][1]) for k in _KINDS):  # the config admits only fields the kind takes
    raise ImportError("a reward kind's configurable fields (kinds.TAKES) include one its builder does not take")


class RewardModel:
    """`decoder` (LatentDecoder or None for image-only use) + named scorers + their weights
    (default 1.0 each). `score_*` return name -> (B,) CPU float32 scores, NaN kept visible."""

    def __init__(self, decoder: LatentDecoder | None, scorers: Mapping[str, Scorer],
                 weights: Mapping[str, float] | None = None, eval_only=()):
        if not scorers:
            raise ValueError("RewardModel needs at least one scorer")
        self.decoder = decoder
        self.scorers = dict(scorers)
        self.weights = {n: 1.0 for n in self.scorers} if weights is None else {n: float(w) for n, w in weights.items()}
        if set(self.weights) != set(self.scorers):
            raise ValueError(f"weights name {sorted(self.weights)} but the scorers are {sorted(self.scorers)}")
        self.eval_only = set(eval_only)  # scored only when evaluating (metrics the run does not train on)
        if self.eval_only - set(self.scorers):
            raise ValueError(f"eval_only names {sorted(self.eval_only - set(self.scorers))}, which are not scorers")

    @property
    def names(self) -> list[str]:
        return list(self.scorers)

    def score_images_timed(self, images: torch.Tensor, prompts: list[str],
                           evaluation: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """-> (scores, seconds each scorer took). evaluation: also the eval-only scorers."""
        check_batch(images, prompts)
        scores, seconds = {}, {}
        for name, scorer in self.scorers.items():
            if name in self.eval_only and not evaluation:
                continue
            t0 = time.perf_counter()
            scores[name] = scorer(images, prompts)                         # (B,)
            seconds[name] = time.perf_counter() - t0
        return scores, seconds

    def score_latents_timed(self, latents: torch.Tensor, prompts: list[str],
                            evaluation: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """-> (scores, seconds per part: "decode" and each scorer)."""
        if self.decoder is None:
            raise ValueError("this RewardModel has no decoder: build it with a pipeline path to score latents")
        if latents.dim() not in (4, 5) or len(prompts) != latents.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for latents of shape {tuple(latents.shape)}: "
                             f"expected (B, C, h, w) or video's (B, C, F, h, w) with B = len(prompts)")
        t0 = time.perf_counter()
        images = self.decoder.decode(latents)                              # (B, 3, H, W) or clips (B, T, 3, H, W)
        decode_s = time.perf_counter() - t0
        if latents.dim() == 5:
            scores, seconds = self.score_clips_timed(images, prompts, evaluation)
        else:
            scores, seconds = self.score_images_timed(images, prompts, evaluation)
        return scores, {"decode": decode_s, **seconds}

    def score_clips_timed(self, clips: torch.Tensor, prompts: list[str],
                          evaluation: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """clips (B, T, 3, H, W) in [0, 1]: each scorer's image reward on sampled frames, averaged
        per clip (`rewards/video.py`); evaluation adds `temporal_consistency` (B,), not trained on."""
        frames, frame_prompts, n = frames_for_scoring(clips, prompts)   # (B*n, 3, H, W)
        scores, seconds = self.score_images_timed(frames, frame_prompts, evaluation)
        scores = {name: per_clip(s, n) for name, s in scores.items()}   # (B,)
        if evaluation:
            scores[TEMPORAL_CONSISTENCY] = temporal_consistency(clips)
        return scores, seconds

    def score_images(self, images: torch.Tensor, prompts: list[str], evaluation: bool = False) -> dict[str, torch.Tensor]:
        return self.score_images_timed(images, prompts, evaluation)[0]

    def score_latents(self, latents: torch.Tensor, prompts: list[str],
                      evaluation: bool = False) -> dict[str, torch.Tensor]:
        return self.score_latents_timed(latents, prompts, evaluation)[0]


def _spec_dict(spec) -> dict:
    if dataclasses.is_dataclass(spec):
        spec = dataclasses.asdict(spec)
    elif not isinstance(spec, Mapping):
        raise ValueError(f"a reward spec must be a mapping or dataclass, got {type(spec).__name__}")
    return {k: v for k, v in spec.items() if v is not None}


def build_scorer(spec, *, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[Scorer, float]:
    """One flat spec -> (scorer, weight)."""
    spec = _spec_dict(spec)
    kind = spec.pop("name", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown reward '{kind}'; known rewards: {list(REWARD_KINDS)}")
    weight = float(spec.pop("weight", 1.0))
    cls, fields, takes_device, takes_dtype = _KINDS[kind]
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise ValueError(f"reward '{kind}' does not take {unknown}; it takes {sorted(fields)} (+ name, weight)")
    kwargs = {fields[k]: v for k, v in spec.items()}
    if takes_device:
        kwargs["device"] = device
    if takes_dtype:
        kwargs["dtype"] = dtype
    return cls(**kwargs), weight


def build_reward_model(specs, pipeline_path: str | Path | None, device="cpu", *, dtype: torch.dtype = torch.float32,
                       decode_batch_size: int = 16, eval_only=()) -> RewardModel:
    """Reward specs (see module docstring) + the pipeline whose VAE decodes the leaves -> RewardModel.
    pipeline_path None builds an image-only model (score_images)."""
    specs = list(specs)
    if not specs:
        raise ValueError(f"no rewards configured; known rewards: {list(REWARD_KINDS)}")
    scorers, weights = {}, {}
    for spec in specs:
        scorer, weight = build_scorer(spec, device=device, dtype=dtype)
        if scorer.name in scorers:
            raise ValueError(f"reward '{scorer.name}' is configured twice")
        scorers[scorer.name], weights[scorer.name] = scorer, weight
    decoder = None
    if pipeline_path is not None:
        decoder = load_decoder(pipeline_path, device=device, dtype=dtype, batch_size=decode_batch_size)
    return RewardModel(decoder, scorers, weights, eval_only)
