"""Where each reward kind's files are, found without loading a model or touching the network: the
driver's preflight calls `locate` for every reward term and eval metric before any cluster is
allocated, so a missing checkpoint is one clear error naming the file and how to get it."""
from __future__ import annotations

from pathlib import Path

from treegrpo_ray.rewards import aesthetic, imagereward, pickscore
from treegrpo_ray.rewards.kinds import TAKES
from treegrpo_ray.rewards.scorers import DEFAULT_MINIATURE_DIR, locate_clipscore, locate_hps


def locate(name: str, *, checkpoint: str = "", clip_checkpoint: str = "", processor: str = "", version: str = "",
           hf_cache_dir=None) -> None:
    """Raise FileNotFoundError if a file reward kind `name` would load is missing (given paths, else
    the Hugging Face cache where the kind has a default there)."""
    if name == "hpsv2":
        locate_hps(checkpoint, version or "v2.1", hf_cache_dir)
    elif name == "clipscore":
        locate_clipscore(checkpoint, hf_cache_dir=hf_cache_dir)
    elif name == "aesthetic":
        aesthetic.locate(checkpoint, clip_checkpoint, hf_cache_dir)
    elif name == "pickscore":
        pickscore.locate(checkpoint, processor, hf_cache_dir)
    elif name == "imagereward":
        imagereward.locate(checkpoint, processor, hf_cache_dir)
    elif name == "miniature":
        if not Path(checkpoint or DEFAULT_MINIATURE_DIR).expanduser().is_dir():
            raise FileNotFoundError(f"miniature reward directory not found: '{checkpoint or DEFAULT_MINIATURE_DIR}'")
    elif name not in TAKES:
        raise ValueError(f"unknown reward kind {name!r}")
