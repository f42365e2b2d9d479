"""The miniature world: a synthetic coloured-shapes text-to-image domain (`world`: renderer,
prompts, splits) and the reward trained for it (`reward`), with the tiny SD3 pipeline built on it
(DESIGN.md §3). The trained assets ship in `treegrpo_ray/assets/miniature/` (this module names
their paths, the only place that does); `python -m tools.miniature.build` rebuilds them from a
checkout. Importing this package stays light (no diffusers / open_clip).
"""
from __future__ import annotations

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "miniature")
PIPELINE_DIR = os.path.join(ASSETS_DIR, "pipeline")   # StableDiffusion3Pipeline.from_pretrained(PIPELINE_DIR)
REWARD_DIR = os.path.join(ASSETS_DIR, "reward")       # MiniatureReward.from_dir(REWARD_DIR)
# Generation settings the base model was built and measured with (see MODEL_CARD.md).
MAX_SEQUENCE_LENGTH = 16
NUM_STEPS = 10
GUIDANCE_SCALE = 4.5
RESOLUTION = 32
