"""Video rewards from image rewards: score sampled frames of each clip, average per clip; and the
temporal-consistency metric evaluation reports for video runs.

* Frames scored (`frame_indices`): VIDEO_REWARD_FRAMES = 4 frames evenly spaced over the clip,
  first and last included (81 frames -> 0, 27, 53, 80). Peers that train Wan with image rewards
  (Flow-GRPO, DanceGRPO) score frames with the image model and average the scores; the fixed
  count keeps a clip's reward cost that of 4 images whatever its length, and even spacing sees the
  start, the middle and the end of the motion. A clip shorter than 4 frames scores all of them.
  A fixed choice, not a config field: nothing asks for another yet (STYLE habit 9).
* Temporal consistency (`temporal_consistency`), reported at evaluation only, never trained on:
  1 - mean over consecutive frame pairs (t, t+1) and pixels of |x_{t+1} - x_t|, pixels in [0, 1].
  1 is a static clip, lower means larger frame-to-frame change (flicker or fast motion: the metric
  cannot tell them apart, and a frozen clip scores best, so read it beside the reward). It needs no
  model, so it runs offline and in CPU tests; a CLIP-embedding version (mean cosine of consecutive
  frames' image embeddings, VBench's "subject consistency" in spirit) would need a CLIP checkpoint.
"""
from __future__ import annotations

import torch

VIDEO_REWARD_FRAMES = 4
TEMPORAL_CONSISTENCY = "temporal_consistency"  # its name among the evaluation's scores


def frame_indices(num_frames: int, count: int = VIDEO_REWARD_FRAMES) -> torch.Tensor:
    """(n,) long: `count` frame indices evenly spaced over [0, num_frames - 1], ends included."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    n = min(count, num_frames)
    return torch.linspace(0, num_frames - 1, n).round().long()


def temporal_consistency(clips: torch.Tensor) -> torch.Tensor:
    """clips (B, T, 3, H, W) in [0, 1] -> (B,) float32: 1 - mean |x_{t+1} - x_t| (1 for T = 1)."""
    if clips.dim() != 5:
        raise ValueError(f"clips must be (B, T, 3, H, W), got {tuple(clips.shape)}")
    if clips.shape[1] < 2:
        return torch.ones(clips.shape[0])
    diff = (clips[:, 1:].float() - clips[:, :-1].float()).abs()  # (B, T-1, 3, H, W)
    return 1.0 - diff.flatten(1).mean(1).cpu()


def frames_for_scoring(clips: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str], int]:
    """clips (B, T, 3, H, W) -> (B*n, 3, H, W) images of the sampled frames (clip-major), their
    prompts, and n (frames per clip); `per_clip` undoes the flattening of the scores."""
    idx = frame_indices(clips.shape[1])
    frames = clips[:, idx.to(clips.device)]                  # (B, n, 3, H, W)
    n = idx.numel()
    return frames.flatten(0, 1), [p for p in prompts for _ in range(n)], n


def per_clip(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B*n,) frame scores -> (B,) clip scores: the mean over the clip's frames (NaN stays NaN)."""
    return scores.reshape(-1, n).mean(1)
