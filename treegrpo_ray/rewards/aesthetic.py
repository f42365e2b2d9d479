"""The LAION "improved aesthetic predictor" (Schuhmann, github.com/christophschuhmann/
improved-aesthetic-predictor, file `sac+logos+ava1-l14-linearMSE.pth`): an MLP on the unit-norm
CLIP ViT-L/14 (OpenAI) image embedding, trained to predict a 1-10 rating (the TreeGRPO paper's
Aesthetic metric, r_max = 10; DDPO's aesthetic reward).

Published architecture (the checkpoint's keys): layers.0 Linear(768, 1024), Dropout(0.2),
layers.2 Linear(1024, 128), Dropout(0.2), layers.4 Linear(128, 64), Dropout(0.1), layers.6
Linear(64, 16), layers.7 Linear(16, 1); no activations; run in float32 on
image_features / ||image_features||. The widths are read from the checkpoint (a test's tiny CLIP
has a smaller embedding); the layer positions are the architecture and are checked.

The CLIP is open_clip's `ViT-L-14-quickgelu` (OpenAI's weights use QuickGELU) with its inference
preprocessing (bicubic resize of the short side to 224, centre crop, OpenAI mean/std): the same
transform as OpenAI's `clip.load` preprocess that the predictor was trained with.
"""
from __future__ import annotations

from pathlib import Path

import torch

from treegrpo_ray.rewards.open_clip_loader import (OPENAI_L14_FILES, OPENAI_L14_MODEL, OPENAI_L14_REPO, load_open_clip,
                                                  load_state_dict, locate_openai_l14, resolve_checkpoint)
from treegrpo_ray.rewards.scorers import Scorer

# the published weights as TRL's DDPO example fetches them (the same MLP, keys layers.N.*)
HEAD_REPO, HEAD_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"
LINEAR_AT = (0, 2, 4, 6, 7)  # nn.Sequential positions of the Linear layers (Dropouts between the first four)
DROPOUT_AT = {1: 0.2, 3: 0.2, 5: 0.1}

HEAD_HINT = (f"Download it once with `hf download {HEAD_REPO} {HEAD_FILE}` (the same weights as "
             "sac+logos+ava1-l14-linearMSE.pth of github.com/christophschuhmann/improved-aesthetic-predictor) and "
             "pass its path as the reward's checkpoint, or leave it in the Hugging Face cache.")
CLIP_HINT = (f"The predictor reads OpenAI's CLIP ViT-L/14 through open_clip: `hf download {OPENAI_L14_REPO} "
             f"{OPENAI_L14_FILES[0]}` and pass its path as clip_checkpoint, or leave it in the Hugging Face cache.")


def locate(checkpoint=None, clip_checkpoint=None, hf_cache_dir=None) -> tuple[Path, Path]:
    """(head file, CLIP file) or FileNotFoundError naming the missing one and how to get it."""
    head = resolve_checkpoint(checkpoint or None, what="LAION aesthetic predictor head", hint=HEAD_HINT,
                              hf_repo=HEAD_REPO, hf_filename=HEAD_FILE, hf_cache_dir=hf_cache_dir)
    return head, locate_openai_l14(clip_checkpoint, "CLIP ViT-L/14 (OpenAI) weights for the aesthetic predictor",
                             CLIP_HINT, hf_cache_dir)


def mlp_head(widths: tuple[int, ...]) -> torch.nn.Sequential:
    """The predictor's MLP layout (also ImageReward's head): Linear, Dropout 0.2, Linear, Dropout 0.2,
    Linear, Dropout 0.1, Linear, Linear; `widths` = input, the four hidden widths, 1."""
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < 3:
            layers.append(torch.nn.Dropout(DROPOUT_AT[2 * i + 1]))
    return torch.nn.Sequential(*layers)                                      # Linear at 0, 2, 4, 6, 7


def build_head(state: dict[str, torch.Tensor], source: str) -> torch.nn.Sequential:
    """The published MLP with the widths of `state`; a clear error if the file is another architecture."""
    want = {f"layers.{i}.{p}" for i in LINEAR_AT for p in ("weight", "bias")}
    if set(state) != want:
        raise ValueError(f"'{source}' is not an improved-aesthetic-predictor head: expected keys {sorted(want)}, "
                         f"got {sorted(state)[:6]}{' ...' if len(state) > 6 else ''}")
    widths = [state[f"layers.{LINEAR_AT[0]}.weight"].shape[1]]
    for i in LINEAR_AT:
        w = state[f"layers.{i}.weight"]
        if w.dim() != 2 or w.shape[1] != widths[-1]:
            raise ValueError(f"'{source}': layers.{i}.weight has shape {tuple(w.shape)}, which does not chain "
                             f"with the layer before it ({widths[-1]} outputs)")
        widths.append(w.shape[0])
    if widths[-1] != 1:
        raise ValueError(f"'{source}': the last layer has {widths[-1]} outputs; the predictor has 1")
    head = mlp_head(tuple(widths))
    head.load_state_dict({k.removeprefix("layers."): v.float() for k, v in state.items()})
    return head.eval().requires_grad_(False)


class AestheticScorer(Scorer):
    """Aesthetic score (about 1-10). `checkpoint`: the predictor head (.pth/.safetensors);
    `clip_checkpoint`: open_clip weights of `model_name` (default ViT-L-14-quickgelu, OpenAI's);
    either left empty is looked up in the Hugging Face cache, never downloaded."""

    name = "aesthetic"

    def __init__(self, checkpoint: str | Path | None = None, *, clip_checkpoint: str | Path | None = None,
                 model_name: str | None = None, model_config: dict | str | Path | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 32, hf_cache_dir: str | Path | None = None):
        super().__init__(batch_size)
        head_path, clip_path = locate(checkpoint, clip_checkpoint, hf_cache_dir)
        if model_name is None and model_config is None:
            model_name = OPENAI_L14_MODEL
        self.clip = load_open_clip(checkpoint=clip_path, model_name=model_name, config=model_config,
                                   device=device, dtype=dtype)
        self.head = build_head(load_state_dict(head_path), str(head_path)).to(self.clip.device)
        dim = getattr(self.clip.model.visual, "output_dim", None)
        if dim is not None and self.head[0].in_features != dim:
            raise ValueError(f"the aesthetic head '{head_path}' takes {self.head[0].in_features}-d embeddings but the "
                             f"CLIP '{clip_path}' gives {dim}-d: the predictor is for ViT-L/14 (768)")

    @torch.no_grad()
    def _score(self, images, prompts):
        return self.head(self.clip.image_features(images))[:, 0]              # (b,) features are unit-norm float32
